"""finetune: plain next-token training of a causal LM on answer tokens, run by the same loop as unlearning
(the Unlearner driving methods.finetune.FineTune: AdamW, warmup then a constant or cosine rate, clipping),
with periodic evaluation and an early stop.

Used to make a model memorize data before unlearning (the demo, the benchmark protocol) and by the relearning
attack (simu_fast.eval.relearning), which trains an unlearned model on forget or unrelated data and watches
the forget score. Not an unlearning method: see simu_fast.methods for those.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..methods.finetune import FineTune
from .unlearner import Unlearner


def finetune(model: torch.nn.Module, loader, *, lr: float, max_steps: Optional[int] = None,
             max_epochs: Optional[int] = None, weight_decay: float = 0.0, warmup_steps: int = 0,
             schedule: str = "constant", max_grad_norm: Optional[float] = 1.0,
             eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None, eval_every: Optional[int] = None,
             until: Optional[Callable[[dict], bool]] = None, progress: bool = False, desc: str = "training") -> dict:
    """Train `model` in place on the answer-token NLL (per-token mean per row, rows averaged) of the batches of
    `loader` for max_steps optimizer steps or max_epochs passes (whichever comes first). eval_fn(model) runs
    every eval_every steps (and at the end) in eval mode; its dicts form "history" ({"step", ...}); `until`
    (metrics -> bool) stops the run early. The RNGs are left as the caller set them (no seeding).
    Returns {"steps", "epochs", "losses", "history", "stopped_early"}; the model is left in eval mode."""
    if max_steps is None and max_epochs is None:
        raise ValueError("finetune needs max_steps or max_epochs")
    if (until is not None or eval_every is not None) and eval_fn is None:
        raise ValueError("until and eval_every need an eval_fn")
    if len(loader) == 0:
        raise ValueError("the training loader is empty")
    method = FineTune(lr, weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule)
    result = Unlearner(model, method, loader, max_steps=max_steps, epochs=max_epochs, max_grad_norm=max_grad_norm,
                       eval_fn=eval_fn, eval_every=eval_every, stop_when=until, seed=None, progress=progress,
                       progress_desc=desc).run()
    model.eval()
    # completed passes: every pass has len(loader) steps
    return {"steps": result["step"], "epochs": result["step"] // len(loader), "losses": result["train_loss"],
            "history": result["history"], "stopped_early": result["stopped_early"]}
