"""Unlearner: the training loop that drives an UnlearningMethod (methods/base.py).

A plain loop: forget batches in epochs, a retain batch beside each forget batch when the method uses one
(the retain loader cycles: it is re-iterated when exhausted), gradient accumulation over `grad_accum`
micro-batches, clipping, the method's learning-rate schedule (each param group's lr = its initial_lr x
`method.lr_factor(step, total_steps)`), `method.before_step`, `optimizer.step`, `zero_grad`,
`method.after_step`; periodic evaluation with an optional early-stopping rule; atomic checkpoints with an exact resume.

Determinism. `run()` seeds python's `random`, torch (CPU and CUDA) and numpy (when installed) with `seed`
on a fresh start (seed=None leaves them as the caller set them). Shuffling is the loaders' own (make_loader(shuffle=True, seed=...) uses a torch
Generator); the loop records each loader's RNG state at the start of every epoch (its generator(s) and
torch's global RNG, which a DataLoader without a generator draws from), so a resume re-creates the same
epoch order and skips the batches already consumed.

Checkpoints (training/checkpoints.py): `out_dir/checkpoint`, written atomically every `save_every` steps and at
the end of such a run (and of a resumed one); none otherwise (a checkpoint holds the optimizer state too, 8 bytes per
parameter for SophiaG or AdamW, which a finished run rarely needs). RNG state: training/rng_state.py.

Best model. keep_best="max:METRIC" (or "min:METRIC"; a bare name means max) keeps, after every evaluation
that improves METRIC of eval_fn, that model in out_dir/best (weights only, replaced atomically) with
best.json {step, metric, mode, value}; result["best"] says which evaluation it was. It works with several
processes like the evaluation itself (every rank evaluates; rank 0's metrics decide; rank 0 writes).

Resume. `resume=True` calls `method.setup` on the model as given (the original model, as in the first
run), makes the optimizer, then loads model weights, optimizer, method state, data positions and RNG
states from the checkpoint; the run then continues so that its final model equals an uninterrupted run bit
for bit. With resume=True and no checkpoint in out_dir, run() raises FileNotFoundError (it does not
silently start over).

Distributed (torchrun / accelerate launch; simu_fast.distributed, simu_fast.data.sharding). Every rank runs the same
Unlearner on its share of the data (make_distributed_loader: the same number of batches on every rank).
- The model: pass the plain model with parallel="ddp" and the loop wraps it in DistributedDataParallel after
  method.setup and make_optimizer (so parameters a recipe freezes, as SIMU does, never enter DDP's reducer);
  or pass a model already wrapped in DDP (built with find_unused_parameters=True if the recipe freezes
  parameters) or sharded with FSDP2 fully_shard. The recipe sees: setup(module) with loaders of each rank's
  examples without the sampler's padding duplicates (unpadded_shard_loader; SIMU's attribution all-reduces its
  scores, so every rank selects the same mask), make_optimizer(module), loss(root) (the wrapper: gradients are
  averaged across ranks; with grad_accum > 1 only the last micro-batch synchronizes, the others run under
  no_sync), before_step(module) (gradient changes it makes to replicated parameters are then averaged across
  ranks, one all-reduce), after_step(root) (a forward/backward there, SophiaG's GNB Hessian refresh, is
  synchronized like any training step), eval_fn(module) on every rank, rank 0's metrics kept by all.
- Rank 0 alone shows progress (bar or lines), issues warnings and writes files. A checkpoint is a collective
  (training/checkpoints.py). Resume: every rank loads the same checkpoint and its own RNG state.
- At the end of a run of a replicated model the loop checks that every rank holds the same parameters and
  warns if not (a recipe whose hooks change parameters rank by rank).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .. import distributed as _dist
from ..data.loader_rng import loader_rng_kept
from ..data.sharding import unpadded_shard_loader
from ..distributed.collectives import all_reduce_sum
from ..distributed.dtensor import local, sharded_mesh
from ..lm import model_device, to_device
from ..ops.update_mask import COLS, FULL, ROWS
from ..optim.masked_optimizer import MaskedOptimizer
from .checkpoints import latest_checkpoint, load_checkpoint, save_best_model, save_checkpoint
from .progress import check_every_s, make_progress, progress_mode
from .run_config import RunConfig
from .rng_state import loader_rng_state, rng_state, seed_everything, set_loader_rng_state, set_rng_state

if TYPE_CHECKING:  # not imported at run time, so `import simu_fast` does not pull in every recipe
    from ..methods.base import UnlearningMethod

def _warn(message: str) -> None:
    """warnings.warn on rank 0 only (every rank would say the same)."""
    if _dist.is_main_process():
        warnings.warn(message, stacklevel=3)


class Unlearner:
    def __init__(self, model: torch.nn.Module, method: "UnlearningMethod", forget_loader, retain_loader=None, *,
                 config: Optional[RunConfig] = None, eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
                 stop_when: Optional[Callable[[dict], bool]] = None, out_dir: Optional[str] = None,
                 progress: bool | str = True, progress_desc: str = "unlearning", progress_every_s: float = 30.0,
                 ddp_kwargs: Optional[dict] = None, **options):
        """The run options (max_steps, epochs, grad_accum, max_grad_norm, autocast_dtype, eval_every,
        keep_best, save_every, resume, seed, parallel: training/run_config.py) come as a RunConfig or as
        keyword arguments (which then override the config's).

        progress (shown by rank 0 only; training/progress.py): True or "bar" a tqdm bar, "lines" a line to
        stderr at the first step, every `progress_every_s` seconds and at the end (step, loss, the latest
        forget score evaluated, the method's step metrics, elapsed and estimated time left), "auto" a bar
        when stderr is a terminal and lines otherwise (CI logs, nohup, pipes), False nothing."""
        run = RunConfig.from_options(options) if config is None else dataclasses.replace(config, **options)
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
            _warn(f"method {getattr(method, 'name', type(method).__name__)!r} does not use a retain set; retain_loader is ignored")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError("eval_fn must be callable(model) -> dict")
        if stop_when is not None and not callable(stop_when):
            raise TypeError("stop_when must be callable(metrics) -> bool")
        if stop_when is not None and eval_fn is None:
            raise ValueError("stop_when needs an eval_fn to produce the metrics it checks")
        self.keep_best = run.keep_best_rule
        if self.keep_best is not None and (eval_fn is None or out_dir is None):
            raise ValueError("keep_best needs an eval_fn (the metric) and an out_dir (where out_dir/best goes)")
        if (run.save_every is not None or run.resume) and out_dir is None:
            raise ValueError("save_every and resume need an out_dir")
        if run.parallel == "ddp":
            if not _dist.is_initialized():
                raise ValueError("parallel='ddp' needs an initialized torch.distributed process group (start with "
                                 "torchrun and call simu_fast.distributed.init_from_env())")
            if _dist.is_ddp(model):
                raise ValueError("parallel='ddp' wraps the model itself: pass the unwrapped model")
            if _dist.is_fsdp2(model):
                raise ValueError("parallel='ddp' with an FSDP2-sharded model: pass parallel=None")
        elif (_dist.is_initialized() and _dist.world_size() > 1 and not _dist.is_ddp(model)
              and not _dist.is_fsdp2(model)):
            _warn("torch.distributed is initialized but the model is neither wrapped in DDP nor sharded with FSDP2 "
                  "and parallel is not 'ddp': gradients are not synchronized, every rank trains its own copy")

        self.config = run
        self.model, self.method = model, method
        self.forget_loader = forget_loader
        self.retain_loader = retain_loader if uses_retain else None
        self.max_steps, self.epochs, self.grad_accum = run.max_steps, run.epochs, run.grad_accum
        self.max_grad_norm = None if run.max_grad_norm is None else float(run.max_grad_norm)
        self.autocast_dtype = run.autocast_dtype
        self.eval_fn, self.eval_every, self.stop_when = eval_fn, run.eval_every, stop_when
        self.out_dir, self.save_every, self.resume = out_dir, run.save_every, run.resume
        self.seed, self.progress, self.progress_desc = run.seed, progress_mode(progress), str(progress_desc)
        self.progress_every_s = check_every_s(progress_every_s)
        self.parallel, self.ddp_kwargs = (None if run.parallel == "none" else run.parallel), dict(ddp_kwargs or {})
        self.module = _dist.unwrap_model(model)  # what recipes set up, make optimizers for and evaluate
        self.root = model  # what the loss is computed through (the DDP wrapper once run() has made it)

        self.device = model_device(model)
        if self.autocast_dtype == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 autocast needs a CUDA model; on CPU use autocast_dtype='bf16' or None")
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == "fp16" else None
        # loop state (all of it goes into the checkpoint)
        self.step = 0
        self.history: list[dict] = []
        self.best: Optional[dict] = None  # keep_best: the best evaluation so far {"step", "metric", "mode", "value"}
        self.train_loss: list[float] = []
        self.step_metrics: list[dict] = []  # what the method reports per step (method.step_metrics())
        self.stop_reason: Optional[str] = None
        self._pos = {"forget": _new_pos(), "retain": _new_pos()}
        self._iters = {"forget": None, "retain": None}

    # ---- public ------------------------------------------------------------------------------------
    def run(self) -> dict:
        method, module = self.method, self.module
        if self.resume:
            ckpt = _dist.broadcast_object(latest_checkpoint(self.out_dir))  # rank 0's view decides
            if ckpt is None:
                raise FileNotFoundError(f"resume=True but no checkpoint in {self.out_dir!r}")
        elif self.seed is not None:
            seed_everything(self.seed)
        with loader_rng_kept(self.forget_loader, self.retain_loader):  # setup never moves training's batches
            method.setup(module, unpadded_shard_loader(self.forget_loader),
                         None if self.retain_loader is None else unpadded_shard_loader(self.retain_loader))
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = method.make_optimizer(module)
        for g in self.optimizer.param_groups:  # the rate method.lr_factor scales (as torch's LR schedulers)
            g.setdefault("initial_lr", g["lr"])
        try:
            return self._run_steps(trainable, ckpt if self.resume else None)
        finally:
            method.finish(module)  # whatever happened: the recipe's patches come off the model

    def _run_steps(self, trainable: list, ckpt) -> dict:
        method, module = self.method, self.module
        self.root = self._wrap(trainable)
        model = self.root
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        if self.stop_reason == "stop_when":
            return self._result()  # a resumed run that had already met its stopping rule

        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        shown = make_progress(self.progress if _dist.is_main_process() else None, self._total_steps(), self.step,
                              self.progress_desc, self.progress_every_s)
        try:
            while self.max_steps is None or self.step < self.max_steps:
                group = self._next_group()
                if not group:
                    self.stop_reason = "epochs"
                    break
                loss = self._train_step(group)
                self.step += 1
                self.train_loss.append(loss)
                reported = method.step_metrics()
                if reported:
                    self.step_metrics.append({"step": self.step, **reported})
                stop = False
                if self.eval_every is not None and self.step % self.eval_every == 0:
                    stop = self._evaluate()
                if shown is not None:  # after the evaluation: a line at an evaluated step shows its score
                    shown.step(self.step, loss, self._latest_evaluation(), lambda: self._shown_metrics(reported))
                if stop:
                    self.stop_reason = "stop_when"
                    break
                if self.save_every is not None and self.step % self.save_every == 0:
                    self.save_checkpoint()
            else:
                self.stop_reason = "max_steps"
        finally:
            if shown is not None:
                shown.close()
        if self.eval_fn is not None and (not self.history or self.history[-1]["step"] != self.step):
            self._evaluate()  # the run ends here anyway; stop_when has nothing left to stop
        if shown is not None:  # the last line, with the final evaluation
            last = self.step_metrics[-1] if self.step_metrics and self.step_metrics[-1]["step"] == self.step else {}
            shown.finish(self.step, self.train_loss[-1] if self.train_loss else None, self._latest_evaluation(),
                         lambda: self._shown_metrics(last))
        if self.out_dir is not None and (self.save_every is not None or self.resume):  # opt-in: a run that
            self.save_checkpoint()  # checkpoints (or resumed from one) ends with one
        if _dist.world_size() > 1 and not _dist.is_fsdp2(module) and not _dist.params_in_sync(module):
            _warn("the ranks' parameters differ after unlearning: a hook of the method changed them rank by rank "
                  "(rank 0's model is what was saved)")
        return self._result()

    def _wrap(self, trainable_before: list):
        """The model the loss goes through: DDP around the module for parallel='ddp', else the model as given."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            kwargs = dict(self.ddp_kwargs)
            if self.device.type == "cuda":
                kwargs.setdefault("device_ids", [self.device.index])
            return DistributedDataParallel(self.module, **kwargs)
        model = self.model
        if _dist.is_ddp(model) and not getattr(model, "find_unused_parameters", True):
            frozen = [p for p in trainable_before if not p.requires_grad]
            if frozen:
                raise ValueError(f"the method froze {len(frozen)} parameter tensors after the model was wrapped in "
                                 "DistributedDataParallel, whose reducer would wait for their gradients: pass the "
                                 "unwrapped model with parallel='ddp' (the loop wraps it after make_optimizer), or "
                                 "build DDP with find_unused_parameters=True")
        return model

    def save_checkpoint(self) -> str:
        """Write out_dir/checkpoint atomically; returns its path. Distributed: a collective (every rank calls it);
        rank 0 writes, and every rank returns only once the write succeeded (or raises if it failed)."""
        if self.out_dir is None:
            raise ValueError("save_checkpoint needs an out_dir")
        return save_checkpoint(self.out_dir, self.module, self.optimizer, self.method, self._loop_state())

    # ---- the step ----------------------------------------------------------------------------------
    def _train_step(self, group) -> float:
        model, module, opt, method = self.root, self.module, self.optimizer, self.method
        n = len(group)
        total = 0.0
        for i, (forget_batch, retain_batch) in enumerate(group):
            # DDP: only the last micro-batch's backward all-reduces the (accumulated) gradients
            sync = model.no_sync() if i < n - 1 and _dist.is_ddp(model) else contextlib.nullcontext()
            with sync:
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
        last_forget = group[-1][0]
        factor = float(method.lr_factor(self.step, self._total_steps()))
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        method.before_step(module, opt, last_forget, self.step)
        changes_grads = _changes_gradients(method)
        if _dist.world_size() > 1 and changes_grads and not _dist.is_fsdp2(module):
            _dist.average_gradients(module)  # what before_step did from this rank's batch, averaged as DDP does
        norm = None
        if self.max_grad_norm is not None:  # after before_step: what the optimizer steps on (a regularizer's part too)
            norm = clip_gradients([p for p in module.parameters() if p.grad is not None],
                                  [p for p in method.detached_parameters() if p.grad is not None], self.max_grad_norm,
                                  optimizer=opt)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        elif norm is not None and isinstance(opt, MaskedOptimizer) and not changes_grads \
                and bool(torch.isfinite(norm)):
            opt.step(grads_finite=True)  # a finite norm: every gradient is finite, the optimizer need not look
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
        was_training, rng = self.module.training, rng_state()
        self.module.eval()
        try:
            metrics = self.eval_fn(self.module)
        finally:
            self.module.train(was_training)
            set_rng_state(rng)
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
        metrics = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in metrics.items()}
        metrics = _dist.broadcast_object(metrics)  # every rank records (and stops on) rank 0's metrics
        self.history.append({"step": self.step, **metrics})
        if self.keep_best is not None:
            self._keep_if_best(metrics)
        return bool(self.stop_when(metrics)) if self.stop_when is not None else False

    def _latest_evaluation(self) -> Optional[dict]:
        return self.history[-1] if self.history else None

    def _shown_metrics(self, reported: dict) -> dict:
        """The step's numbers worth a progress line: the method's (step_metrics) and the optimizer's win_rate
        (SophiaG's fraction of unclipped updates), where it has one."""
        shown = {k: float(v) for k, v in reported.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        value = getattr(self.optimizer, "win_rate", None)  # a property of SophiaG (reading it synchronises)
        if isinstance(value, float) and math.isfinite(value):
            shown["win_rate"] = value
        return shown

    def _keep_if_best(self, metrics: dict) -> None:
        mode, name = self.keep_best
        if name not in metrics:
            raise ValueError(f"keep_best: the evaluation has no metric {name!r}; it gives {sorted(metrics)}")
        value = float(metrics[name])
        best = self.best
        if best is None or (value < best["value"] if mode == "min" else value > best["value"]):
            self.best = {"step": self.step, "metric": name, "mode": mode, "value": value}
            save_best_model(self.out_dir, self.module, self.best)

    # ---- data --------------------------------------------------------------------------------------
    def _next_group(self) -> list:
        """Up to grad_accum (forget, retain) micro-batches; fewer at the end of the last epoch; [] when done."""
        group = []
        while len(group) < self.grad_accum:
            forget = self._next_forget()
            if forget is None:
                break
            retain = self._next_batch("retain") if self.retain_loader is not None else None
            group.append((to_device(forget, self.device), to_device(retain, self.device)))
        return group

    def _next_forget(self):
        pos = self._pos["forget"]
        if self.epochs is not None and pos["epoch"] >= self.epochs:
            return None
        return self._next_batch("forget")

    def _next_batch(self, which: str):
        loader = self.forget_loader if which == "forget" else self.retain_loader
        pos = self._pos[which]
        for attempt in range(2):
            if self._iters[which] is None:
                pos["start_rng"] = loader_rng_state(loader)
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
        set_loader_rng_state(loader, pos["start_rng"])
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
    def _loop_state(self) -> dict:
        """What the loop needs to continue exactly (the RNG states are added by save_checkpoint)."""
        return {"step": self.step, "positions": copy.deepcopy(self._pos),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": self.history, "train_loss": self.train_loss, "step_metrics": self.step_metrics,
                "stop_reason": self.stop_reason, "grad_accum": self.grad_accum, "seed": self.seed, "best": self.best}

    def _load_checkpoint(self, path: str) -> None:
        state = load_checkpoint(path, self.module, self.optimizer, self.method)
        if state["grad_accum"] != self.grad_accum:
            _warn(f"resuming with grad_accum={self.grad_accum}, the checkpoint used {state['grad_accum']}: "
                  "the result will not match an uninterrupted run")
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.train_loss = list(state["train_loss"])
        self.step_metrics = list(state.get("step_metrics", []))
        self.stop_reason = state["stop_reason"]
        self.best = state.get("best")
        self._pos = state["positions"]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._restore_iterator("forget")
        self._restore_iterator("retain")
        rng = state["rng"]
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == _dist.world_size():
            rng = ranks[_dist.rank()]
        elif _dist.world_size() > 1 or state.get("world_size", 1) != 1:
            _warn(f"resuming with world size {_dist.world_size()}, the checkpoint was written by "
                  f"{state.get('world_size', 1)} ranks: every rank continues from rank 0's RNG state")
        set_rng_state(rng)  # last: re-creating the iterators may draw from the global RNG

    def _result(self) -> dict:
        return {"step": self.step, "metrics": dict(self.history[-1]) if self.history else {},
                "history": list(self.history), "train_loss": list(self.train_loss),
                "step_metrics": list(self.step_metrics), "best": self.best,
                "stop_reason": self.stop_reason, "stopped_early": self.stop_reason == "stop_when"}


def clip_gradients(params: list, detached: list, max_norm: float, optimizer=None) -> Optional[torch.Tensor]:
    """Scale the gradients so that the 2-norm of what trains is at most max_norm; returns that norm before
    clipping (None without gradients).

    What trains: `params` (the model's parameters with a gradient) and `detached` (the recipe's own trainable
    tensors, UnlearningMethod.detached_parameters: SIMU's compact neuron slices), and of a parameter that
    `optimizer` (a MaskedOptimizer) updates under a mask, only the elements the mask selects: the gradient of a
    frozen down-projection column in SIMU's dense masked path (sparse=False) counts no more than in its
    compact-slice path (sparse=True), which has none, so both paths clip alike (docs/DESIGN.md, "Gradient
    clipping sees only what trains"). Every gradient is scaled by the one coefficient (a frozen element's is
    read by nothing). The masked norm reads only the selected rows/columns of a gradient (one gather of their
    size per masked parameter; a dense element mask reads its selected elements), on each rank's local shard of a
    DTensor gradient, the shards' squares summed over their mesh. Without masks it is torch's clip_grad_norm_ over
    `params` and `detached` together (DTensor model parameters and plain detached tensors: the two norms combined
    by hand)."""
    masks = _update_masks(params, optimizer)
    if masks:
        return _clip_trained(params + detached, masks, max_norm)
    if not detached or not any(_dist.is_dtensor(p) for p in params):
        if not (params or detached):
            return None
        norm = torch.nn.utils.clip_grad_norm_(params + detached, max_norm)
        return norm.full_tensor() if _dist.is_dtensor(norm) else norm
    inf = float("inf")
    norms = [torch.nn.utils.clip_grad_norm_(group, inf) for group in (params, detached) if group]  # norms only
    norms = [n.full_tensor() if _dist.is_dtensor(n) else n for n in norms]
    total = torch.stack([n.to(norms[-1].device, torch.float32) for n in norms]).norm()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params + detached:
        p.grad.mul_(coef.to(p.grad.device) if not _dist.is_dtensor(p.grad) else float(coef))
    return total


def _update_masks(params: list, optimizer) -> dict:
    """{parameter: the UpdateMask `optimizer` applies to it (its local shard's part)} for the parameters it
    updates under a mask that is not FULL; {} for any other optimizer."""
    if not isinstance(optimizer, MaskedOptimizer):
        return {}
    out = {}
    for p in params:
        mask = optimizer.mask_of(p)
        if mask.kind != FULL:
            out[p] = mask
    return out


def _selected(grad: torch.Tensor, mask) -> torch.Tensor:
    """The elements of a (local) gradient that `mask` selects: a gather of their size, no full-size temporary."""
    if mask.kind == ROWS:
        return grad.reshape(-1, mask.row_len).index_select(0, mask.index)
    if mask.kind == COLS:
        return grad.reshape(-1, mask.row_len).index_select(1, mask.index)
    return grad.reshape(-1)[mask.dense.view(torch.bool)]  # DENSE: uint8 0/1 read as bool, no copy of the mask


@torch.no_grad()
def _clip_trained(params: list, masks: dict, max_norm: float) -> Optional[torch.Tensor]:
    """clip_gradients with update masks: the norm over the selected elements (local shards; a Shard(0) DTensor's
    squares summed over its mesh, one all-reduce per mesh), then every gradient scaled by the one coefficient."""
    if not params:
        return None
    grads = [local(p.grad) for p in params]
    pieces = [g if p not in masks else _selected(g, masks[p]) for p, g in zip(params, grads)]
    by_device: dict = {}
    for i, piece in enumerate(pieces):
        by_device.setdefault(piece.device, []).append(i)
    squares = [None] * len(pieces)
    for device, index in by_device.items():
        norms = torch._foreach_norm([pieces[i] for i in index])
        for i, n in zip(index, norms):
            squares[i] = n.float().square()
    home = squares[0].device
    total_sq = torch.zeros((), dtype=torch.float32, device=home)
    per_mesh: dict = {}
    for p, sq in zip(params, squares):
        mesh = sharded_mesh(p)
        if mesh is None:
            total_sq = total_sq + sq.to(home)
        else:
            key = id(mesh)
            per_mesh.setdefault(key, [mesh, []])[1].append(sq)
    for mesh, parts in per_mesh.values():  # the same meshes, in the same order, on every rank
        local_sum = torch.stack([s.to(parts[0].device) for s in parts]).sum()
        total_sq = total_sq + all_reduce_sum(local_sum, mesh).to(home)
    total = total_sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_grad_device: dict = {}
    for g in grads:
        by_grad_device.setdefault(g.device, []).append(g)
    for device, group in by_grad_device.items():
        torch._foreach_mul_(group, coef.to(device))
    return total


def _changes_gradients(method) -> bool:
    """Whether the method's before_step may change the gradients: it overrides before_step and does not
    declare `before_step_changes_gradients = False` (SO-GradDiff / SIMU: the GNB Hessian estimate puts the
    gradients back as they were and averages its own sampled-label gradients over the ranks)."""
    return _overrides(method, "before_step") and bool(getattr(method, "before_step_changes_gradients", True))


def _overrides(method, name: str) -> bool:
    from ..methods.base import UnlearningMethod
    return getattr(type(method), name, None) is not getattr(UnlearningMethod, name)


def _new_pos() -> dict:
    return {"epoch": 0, "index": 0, "start_rng": None}


def _known_len(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None
