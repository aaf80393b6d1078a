"""finetune: plain next-token training of a causal LM on answer tokens (AdamW, warmup + cosine or constant lr,
clipping), with periodic evaluation and an early stop.

Used to make a model memorize data before unlearning (the demo, the LUME benchmark) and by the relearning
attack (simu_fast.eval.relearning), which trains an unlearned model on forget or unrelated data and watches
the forget score. Not an unlearning method: see simu_fast.methods for those.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..lm import model_device, to_device
from ..methods.objectives import answer_nll


def finetune(model: torch.nn.Module, loader, *, lr: float, max_steps: Optional[int] = None,
             max_epochs: Optional[int] = None, weight_decay: float = 0.0, warmup_steps: int = 0,
             schedule: str = "constant", max_grad_norm: Optional[float] = 1.0,
             eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None, eval_every: Optional[int] = None,
             until: Optional[Callable[[dict], bool]] = None, progress: bool = False, desc: str = "training") -> dict:
    """Train `model` in place on the answer-token NLL (per-token mean per row, rows averaged) of the batches of
    `loader` for max_steps optimizer steps or max_epochs passes (whichever comes first). eval_fn(model) runs
    every eval_every steps (and at the end) in eval mode; its dicts form "history" ({"step", ...}); `until`
    (metrics -> bool) stops the run early. Returns {"steps", "epochs", "losses", "history", "stopped_early"}."""
    if max_steps is None and max_epochs is None:
        raise ValueError("finetune needs max_steps or max_epochs")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if (until is not None or eval_every is not None) and eval_fn is None:
        raise ValueError("until and eval_every need an eval_fn")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader is empty")
    total = min(x for x in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if x is not None)
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    lr_at = _schedule(lr, total, warmup_steps, schedule)

    history, losses, step, stopped = [], [], 0, False
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, leave=False)

    def evaluate() -> bool:
        was_training = model.training
        model.eval()
        try:
            metrics = dict(eval_fn(model))
        finally:
            model.train(was_training)
        history.append({"step": step, **metrics})
        return bool(until(metrics)) if until is not None else False

    model.train()
    try:
        while step < total and not stopped:
            for batch in loader:
                batch = to_device(batch, device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                loss = answer_nll(model, batch, reduction="mean").mean()
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if eval_every is not None and step % eval_every == 0 and evaluate():
                    stopped = True
                    break
                if step >= total:
                    break
    finally:
        if bar is not None:
            bar.close()
    if eval_fn is not None and (not history or history[-1]["step"] != step):
        stopped = evaluate() or stopped
    model.eval()
    # completed passes: every pass has len(loader) steps
    return {"steps": step, "epochs": step // steps_per_epoch, "losses": losses, "history": history,
            "stopped_early": stopped}


def _schedule(lr: float, total: int, warmup: int, kind: str):
    warmup = max(0, int(warmup))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if kind == "constant":
            return lr
        progress = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return lr_at
