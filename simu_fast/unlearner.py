"""Unlearner: the training loop that drives an UnlearningMethod (methods/base.py).

A plain loop: forget batches in epochs, a retain batch beside each forget batch when the method uses one
(the retain loader cycles: it is re-iterated when exhausted), gradient accumulation over `grad_accum`
micro-batches, clipping, `method.before_step`, `optimizer.step`, `zero_grad`, `method.after_step`;
periodic evaluation with an optional early-stopping rule; atomic checkpoints with an exact resume.

Determinism. `run()` seeds python's `random`, torch (CPU and CUDA) and numpy (when installed) with `seed`
on a fresh start. Shuffling is the loaders' own (make_loader(shuffle=True, seed=...) uses a torch
Generator); the loop records each loader's RNG state at the start of every epoch (its generator(s) and
torch's global RNG, which a DataLoader without a generator draws from), so a resume re-creates the same
epoch order and skips the batches already consumed.

Checkpoints. `out_dir/checkpoint` holds
    model/               model.save_pretrained(...) (safetensors) or model.safetensors (safetensors.torch.save_model)
    optimizer.pt         optimizer.state_dict() (simu_fast optimizers include their masks)
    method.pt            method.state_dict()
    trainer_state.pt     step, forget/retain epoch positions, RNG states, GradScaler state, history
    history.json         the evaluation history, for people
A checkpoint is first written to a temporary directory inside out_dir; then the old checkpoint is renamed
to `checkpoint.old`, the new one renamed to `checkpoint`, and the old one deleted. (A directory cannot be
os.replace'd over a non-empty one, hence the two renames; should the process die between them,
`checkpoint.old` is still complete and resume() uses it.) A failed write removes its temporary directory
and leaves the previous checkpoint untouched.

Resume. `resume=True` calls `method.setup` on the model as given (the original model, as in the first
run), makes the optimizer, then loads model weights, optimizer, method state, data positions and RNG
states from the checkpoint; the run then continues so that its final model equals an uninterrupted run bit
for bit. With resume=True and no checkpoint in out_dir, run() raises FileNotFoundError (it does not
silently start over).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import inspect
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:  # not imported at run time, so `import simu_fast` does not pull in every recipe
    from .methods.base import UnlearningMethod

try:  # numpy is optional here
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

CHECKPOINT = "checkpoint"
_OLD = "checkpoint.old"
_TMP_PREFIX = ".checkpoint.tmp-"


class Unlearner:
    def __init__(self, model: torch.nn.Module, method: "UnlearningMethod", forget_loader, retain_loader=None, *,
                 max_steps: Optional[int] = None, epochs: Optional[int] = None, grad_accum: int = 1,
                 max_grad_norm: Optional[float] = 1.0, autocast_dtype: Optional[str] = None,
                 eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None, eval_every: Optional[int] = None,
                 stop_when: Optional[Callable[[dict], bool]] = None, out_dir: Optional[str] = None,
                 save_every: Optional[int] = None, resume: bool = False, seed: int = 0, progress: bool = True):
        missing = [a for a in ("setup", "make_optimizer", "loss", "before_step", "after_step", "state_dict",
                               "load_state_dict") if not callable(getattr(method, a, None))]
        if missing:
            raise TypeError(f"method must be an UnlearningMethod; {type(method).__name__} lacks {missing}")
        if forget_loader is None:
            raise ValueError("forget_loader is required")
        if _known_len(forget_loader) == 0:
            raise ValueError("forget_loader is empty")
        uses_retain = bool(getattr(method, "uses_retain", False))
        if uses_retain:
            if retain_loader is None:
                raise ValueError(f"method {getattr(method, 'name', type(method).__name__)!r} uses a retain set but no retain_loader was given")
            if _known_len(retain_loader) == 0:
                raise ValueError("retain_loader is empty")
        elif retain_loader is not None:
            warnings.warn(f"method {getattr(method, 'name', type(method).__name__)!r} does not use a retain set; retain_loader is ignored")
        if max_steps is None and epochs is None:
            raise ValueError("no stopping rule: give max_steps, epochs, or both")
        max_steps = _opt_int(max_steps, "max_steps", minimum=0)
        epochs = _opt_int(epochs, "epochs", minimum=0)
        grad_accum = _opt_int(grad_accum, "grad_accum", minimum=1)
        if grad_accum is None:
            raise ValueError("grad_accum must be a positive int, got None")
        eval_every = _opt_int(eval_every, "eval_every", minimum=1)
        save_every = _opt_int(save_every, "save_every", minimum=1)
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if autocast_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast_dtype must be 'bf16', 'fp16' or None, got {autocast_dtype!r}")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError("eval_fn must be callable(model) -> dict")
        if stop_when is not None and not callable(stop_when):
            raise TypeError("stop_when must be callable(metrics) -> bool")
        if stop_when is not None and eval_fn is None:
            raise ValueError("stop_when needs an eval_fn to produce the metrics it checks")
        if (save_every is not None or resume) and out_dir is None:
            raise ValueError("save_every and resume need an out_dir")

        self.model, self.method = model, method
        self.forget_loader = forget_loader
        self.retain_loader = retain_loader if uses_retain else None
        self.max_steps, self.epochs, self.grad_accum = max_steps, epochs, grad_accum
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.autocast_dtype = autocast_dtype
        self.eval_fn, self.eval_every, self.stop_when = eval_fn, eval_every, stop_when
        self.out_dir, self.save_every, self.resume = out_dir, save_every, bool(resume)
        self.seed, self.progress = int(seed), bool(progress)

        self.device = _model_device(model)
        if autocast_dtype == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 autocast needs a CUDA model; on CPU use autocast_dtype='bf16' or None")
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler = torch.amp.GradScaler("cuda") if autocast_dtype == "fp16" else None
        # loop state (all of it goes into the checkpoint)
        self.step = 0
        self.history: list[dict] = []
        self.train_loss: list[float] = []
        self.stop_reason: Optional[str] = None
        self._pos = {"forget": _new_pos(), "retain": _new_pos()}
        self._iters = {"forget": None, "retain": None}

    # ---- public ------------------------------------------------------------------------------------
    def run(self) -> dict:
        model, method = self.model, self.method
        if self.resume:
            ckpt = latest_checkpoint(self.out_dir)
            if ckpt is None:
                raise FileNotFoundError(f"resume=True but no checkpoint in {self.out_dir!r}")
        else:
            _seed_everything(self.seed)
        method.setup(model, self.forget_loader, self.retain_loader)
        self.optimizer = method.make_optimizer(model)
        if self.resume:
            self._load_checkpoint(ckpt)
        if self.stop_reason == "stop_when":
            return self._result()  # a resumed run that had already met its stopping rule

        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        bar = _progress_bar(self._total_steps(), self.step, self.progress)
        try:
            while self.max_steps is None or self.step < self.max_steps:
                group = self._next_group()
                if not group:
                    self.stop_reason = "epochs"
                    break
                loss = self._train_step(group)
                self.step += 1
                self.train_loss.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                stop = False
                if self.eval_every is not None and self.step % self.eval_every == 0:
                    stop = self._evaluate()
                if stop:
                    self.stop_reason = "stop_when"
                    break
                if self.save_every is not None and self.step % self.save_every == 0:
                    self.save_checkpoint()
            else:
                self.stop_reason = "max_steps"
        finally:
            if bar is not None:
                bar.close()
        if self.eval_fn is not None and (not self.history or self.history[-1]["step"] != self.step):
            self._evaluate()  # the run ends here anyway; stop_when has nothing left to stop
        if self.out_dir is not None:
            self.save_checkpoint()
        return self._result()

    def save_checkpoint(self) -> str:
        """Write out_dir/checkpoint atomically; returns its path."""
        if self.out_dir is None:
            raise ValueError("save_checkpoint needs an out_dir")
        os.makedirs(self.out_dir, exist_ok=True)
        final, old = os.path.join(self.out_dir, CHECKPOINT), os.path.join(self.out_dir, _OLD)
        if os.path.isdir(final) and os.path.isdir(old):
            shutil.rmtree(old)  # leftover of an earlier swap that completed the rename but not the cleanup
        tmp = tempfile.mkdtemp(dir=self.out_dir, prefix=_TMP_PREFIX)
        try:
            self._write_checkpoint(tmp)
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(final) and os.path.isdir(old):
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ---- the step ----------------------------------------------------------------------------------
    def _train_step(self, group) -> float:
        model, opt, method = self.model, self.optimizer, self.method
        n = len(group)
        total = 0.0
        for forget_batch, retain_batch in group:
            with self._autocast():
                loss = method.loss(model, forget_batch, retain_batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"method.loss must return a scalar tensor, got {loss!r}")
            scaled = loss / n
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            total += float(loss.detach())
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.max_grad_norm is not None:
            params = [p for p in model.parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        last_forget = group[-1][0]
        method.before_step(model, opt, last_forget, self.step)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model, opt, last_forget, self.step)
        return total / n

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast_dtype == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _evaluate(self) -> bool:
        # evaluation leaves the RNG streams as it found them, so adding evaluations never changes training
        was_training, rng = self.model.training, _rng_state()
        self.model.eval()
        try:
            metrics = self.eval_fn(self.model)
        finally:
            self.model.train(was_training)
            _set_rng_state(rng)
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
        metrics = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in metrics.items()}
        self.history.append({"step": self.step, **metrics})
        return bool(self.stop_when(metrics)) if self.stop_when is not None else False

    # ---- data --------------------------------------------------------------------------------------
    def _next_group(self) -> list:
        """Up to grad_accum (forget, retain) micro-batches; fewer at the end of the last epoch; [] when done."""
        group = []
        while len(group) < self.grad_accum:
            forget = self._next_forget()
            if forget is None:
                break
            retain = self._next_batch("retain", cycle=True) if self.retain_loader is not None else None
            group.append((_to_device(forget, self.device), _to_device(retain, self.device)))
        return group

    def _next_forget(self):
        pos = self._pos["forget"]
        if self.epochs is not None and pos["epoch"] >= self.epochs:
            return None
        return self._next_batch("forget", cycle=True)

    def _next_batch(self, which: str, cycle: bool):
        loader = self.forget_loader if which == "forget" else self.retain_loader
        pos = self._pos[which]
        for attempt in range(2):
            if self._iters[which] is None:
                pos["start_rng"] = _loader_rng_state(loader)
                self._iters[which] = iter(loader)
            try:
                batch = next(self._iters[which])
            except StopIteration:
                self._iters[which] = None
                if pos["index"] == 0:
                    raise ValueError(f"the {which} loader yielded no batches in epoch {pos['epoch']}")
                pos["epoch"] += 1
                pos["index"] = 0
                pos["start_rng"] = None
                if which == "forget" and self.epochs is not None and pos["epoch"] >= self.epochs:
                    return None
                continue
            pos["index"] += 1
            return batch
        raise RuntimeError("unreachable")  # pragma: no cover

    def _restore_iterator(self, which: str) -> None:
        loader = self.forget_loader if which == "forget" else self.retain_loader
        pos = self._pos[which]
        self._iters[which] = None
        if loader is None or pos["start_rng"] is None:
            return
        _set_loader_rng_state(loader, pos["start_rng"])
        it = iter(loader)
        for i in range(pos["index"]):
            try:
                next(it)
            except StopIteration:
                raise ValueError(f"resume: the {which} loader has fewer batches ({i}) than the checkpoint's "
                                 f"position ({pos['index']}); was it built the same way?") from None
        self._iters[which] = it

    def _total_steps(self) -> Optional[int]:
        total = self.max_steps
        n = _known_len(self.forget_loader)
        if self.epochs is not None and n is not None:
            by_epochs = math.ceil(self.epochs * n / self.grad_accum)
            total = by_epochs if total is None else min(total, by_epochs)
        return total

    # ---- checkpoints -------------------------------------------------------------------------------
    def _write_checkpoint(self, path: str) -> None:
        model_dir = os.path.join(path, "model")
        os.makedirs(model_dir)
        _save_model(self.model, model_dir)
        torch.save(self.optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
        torch.save(self.method.state_dict(), os.path.join(path, "method.pt"))
        state = {
            "step": self.step,
            "positions": copy.deepcopy(self._pos),
            "rng": _rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": self.history,
            "train_loss": self.train_loss,
            "stop_reason": self.stop_reason,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
        }
        torch.save(state, os.path.join(path, "trainer_state.pt"))
        with open(os.path.join(path, "history.json"), "w") as f:
            json.dump({"step": self.step, "history": self.history}, f, indent=1, default=str)

    def _load_checkpoint(self, path: str) -> None:
        _load_model(self.model, os.path.join(path, "model"))
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                                  weights_only=False))
        self.method.load_state_dict(torch.load(os.path.join(path, "method.pt"), map_location="cpu",
                                               weights_only=False))
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        if state["grad_accum"] != self.grad_accum:
            warnings.warn(f"resuming with grad_accum={self.grad_accum}, the checkpoint used {state['grad_accum']}: "
                          "the result will not match an uninterrupted run")
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.train_loss = list(state["train_loss"])
        self.stop_reason = state["stop_reason"]
        self._pos = state["positions"]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._restore_iterator("forget")
        self._restore_iterator("retain")
        _set_rng_state(state["rng"])  # last: re-creating the iterators may draw from the global RNG

    def _result(self) -> dict:
        return {"step": self.step, "metrics": dict(self.history[-1]) if self.history else {},
                "history": list(self.history), "train_loss": list(self.train_loss),
                "stop_reason": self.stop_reason, "stopped_early": self.stop_reason == "stop_when"}


def latest_checkpoint(out_dir: Optional[str]) -> Optional[str]:
    """out_dir/checkpoint, or out_dir/checkpoint.old if a save died between its two renames; else None."""
    if out_dir is None:
        return None
    for name in (CHECKPOINT, _OLD):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, "trainer_state.pt")):
            return path
    return None


# ---- helpers ---------------------------------------------------------------------------------------
def _new_pos() -> dict:
    return {"epoch": 0, "index": 0, "start_rng": None}


def _opt_int(value, name: str, minimum: int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _known_len(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch, device):
    if batch is None:
        return None
    if isinstance(batch, dict):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def _progress_bar(total, initial, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="unlearning", unit="step", dynamic_ncols=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if _np is not None:
        _np.random.seed(seed % 2**32)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": None, "numpy": None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:
        state["numpy"] = _np.random.get_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy") is not None and _np is not None:
        _np.random.set_state(state["numpy"])


def _loader_generators(loader) -> list:
    """The torch Generators an iteration of `loader` may draw from (deduplicated, in a fixed order)."""
    candidates = [getattr(loader, "generator", None)]
    sampler = getattr(loader, "sampler", None)
    candidates.append(getattr(sampler, "generator", None))
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
    out, seen = [], set()
    for g in candidates:
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            out.append(g)
    return out


def _loader_rng_state(loader) -> dict:
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in _loader_generators(loader)]}


def _set_loader_rng_state(loader, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gens = _loader_generators(loader)
    if len(gens) != len(state["generators"]):
        raise ValueError("resume: the loader's generators differ from the checkpoint's; was it built the same way?")
    for g, s in zip(gens, state["generators"]):
        g.set_state(s)


def _save_model(model, directory: str) -> None:
    if hasattr(model, "save_pretrained"):
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True
        model.save_pretrained(directory, **kwargs)
    else:
        from safetensors.torch import save_model

        save_model(model, os.path.join(directory, "model.safetensors"))


def _load_model(model, directory: str) -> None:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    loaded = {}
    for f in files:
        loaded.update(load_file(f))
    current = model.state_dict()
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint weights do not fit the model: unexpected keys {sorted(unexpected)[:5]}")
    loaded_ptrs = {current[k].data_ptr() for k in loaded if k in current}
    untied = [k for k in missing if current[k].data_ptr() not in loaded_ptrs]  # tied weights are saved once
    if untied:
        raise ValueError(f"checkpoint weights do not fit the model: missing keys {sorted(untied)[:5]}")
