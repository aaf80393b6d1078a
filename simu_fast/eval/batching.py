"""Small pieces every evaluation pass shares: eval mode, an optional tqdm bar."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def in_eval_mode(model):
    """model.eval() for the block, then the train/eval mode the model had (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class _NoBar:
    def update(self, n=1):
        pass


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, leave=False)
    try:
        yield bar
    finally:
        bar.close()
