"""SO-GradDiff and FO-GradDiff as SOUL (arXiv 2404.18239) runs them: GradDiff driven by the second-order
SophiaG optimizer, and its first-order (AdamW) baseline.

Defaults are the official code's TOFU configs (OPTML-Group/SOUL, configs/TOFU/{SO,FO}_GradDiff.json and
src/model/unlearn.py):
- SO-GradDiff: SophiaG betas (0.9, 0.95), weight decay 0.1, lr 5e-6, gamma 2 (the loss is
  -NLL_forget + gamma NLL_retain), hessian="squared_grad": h updated from the real gradient inside every step
  (SOUL's estimator; hessian="gnb" selects Sophia's Gauss-Newton-Bartlett estimate refreshed every
  `hessian_every` steps instead, the one SIMU uses).
- FO-GradDiff: AdamW lr 5e-6, weight decay 0.1, betas (0.9, 0.999), gamma 0.3.
- Both: linear schedule with warmup over the first `warmup` = 10% of the step budget (transformers'
  get_linear_schedule_with_warmup: lr 0 at step 0, the full rate after warmup, then linear decay to 0 at the
  budget), gradient clipping at 1.0 (the Unlearner's default max_grad_norm).

Sophia as the runs need it (docs/DESIGN.md, "Sophia in the runs users make"):
- bs, the scale in the clip denominator rho * bs * h. bs="auto" (the default): with hessian="gnb", the number
  of tokens the GNB estimate averages over (optim/gnb_hessian.py: the non-padding tokens of the batches it
  ran on, summed over gradient accumulation and all-reduced over the ranks), written into every param
  group's bs at each estimate. Why that count: Sophia's Algorithm 2 scales the squared sampled-label gradient
  by the batch size B of the estimate, and the official train_sophiag.py passes
  `optimizer.step(bs=total_bs * block_size)`, the tokens of the step, which there ARE the tokens of its GNB
  pass (it runs over as many micro-batches as a training step); here the estimate runs on the step's
  batches, so the two agree at every refresh, and between refreshes bs stays the count h was estimated
  with. With hessian="squared_grad", bs="auto" is SOUL's 5120: SOUL's HF Trainer calls optimizer.step()
  without bs and its SophiaG.step defaults to bs=5120 whatever the batch holds (h there is the squared real
  gradient, not a sampled one: no token count makes it a GNB estimate, so the official run's number is kept).
  A number fixes bs.
- The first Hessian. hessian="gnb": estimated in before_step at steps 0, k, 2k, ... (k = hessian_every), so
  step 1 is already preconditioned (the official loop estimates after steps k-1, 2k-1, ...: its first k
  steps have h = 0 and are pure sign steps, |m| / eps clipped at 1). On the batches the step trains on:
  hessian_data="step" (the default) the forget and the retain inputs of every micro-batch of the step,
  "forget" the forget inputs only. The official code estimates on training batches of the same size as a
  step (the next micro-batches of its one data stream, not the ones it just trained on): for GradDiff the
  training data are forget and retain together, so "step" is the analogue. hessian="squared_grad": SOUL's
  step updates h from the step's own gradient before its update (SophiaG's kernel does the same), so step 1
  is preconditioned there too. The estimate draws only from its own generator (seed, step) and forks the
  global RNG, so runs stay paired (the loaders' order does not change).
- rho, chosen by the win rate (Sophia's authors keep it in 0.1-0.5; near 0 the run is sign descent, and the
  second-order claim is untested). bench/sophia_health.py, on the quick protocol's model at the protocol's lr
  3e-4, seeds 0 and 100 (bench/results/sophia_health): SO-GradDiff (squared gradient, bs 5120) at SOUL's rho
  0.04 has a median win rate of 0.10 / 0.08 with 48% / 32% of the steps in 0.1-0.5 (its first steps near 0);
  rho 0.1 gives 0.26 / 0.20 with 87% / 72% in the band, matched forget at step 25 / 25 (rho 0.04: 25 / 20)
  and retain there 0.858 / 0.839 (0.829 / 0.824); rho 0.3 overshoots (0.68 / 0.58, slower). So SO-GradDiff's
  default rho is 0.1, a deviation from SOUL's 0.04 (rho=0.04 restores it). SIMU (GNB, bs = the estimate's
  tokens, about 460) at rho 0.04 is sign descent (median 0.025 / 0.021); its default is rho 0.5 (simu.py).
  The EMA of h starts at 0 (both official codes), so h carries a (1 - beta2^n) bias over its n updates.
- Weight decay in two param groups, none on norms, biases and embeddings (optim/decay_groups.py: SOUL's
  create_sophia_optimizer drops norms and biases; Sophia's configure_optimizers also embeddings).
- stochastic_rounding="auto": bfloat16 / float16 parameters round stochastically. At lr 5e-6 a
  round-to-nearest update of a bf16 weight is mostly lost; stochastic rounding was chosen over an fp32 master
  copy (4 more bytes per trainable parameter) because it already tracks the fp32 run: on a tiny model 20
  steps of SO-GradDiff at lr 5e-6 move 65% of the bf16 weights (6.5% with round to nearest) and over 100
  steps the forget / retain NLL stay within 3.1% of the fp32 run's change (round to nearest misses by 94-97%:
  tests/optim/test_low_precision.py); on the protocol's model 20 steps move 45% (3% with round to nearest)
  and change forget / retain NLL within 1e-4 of the fp32 run's change (bench/results/sophia_health).
- step_metrics(): the step's win rate (SophiaG's fraction of selected coordinates not clipped; over every
  rank's shards under FSDP2), the bs it used, and at each GNB estimate the sampled-label gradient's norm.
  Sophia's authors keep the win rate in 0.1-0.5; near 0 the run is sign descent.

Not copied: the official SophiaG also updates exp_avg a second time inside each step (a quirk of that code);
simu_fast's SophiaG follows the Sophia paper's code (Liuhong99/Sophia), one update per step. The official
Sophia loop clips the sampled-label gradient at grad_clip before update_hessian; the GNB estimate here does
not clip it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..lm import model_device, to_device
from ..optim.decay_groups import weight_decay_groups
from ..optim.gnb_hessian import gnb_generator, gnb_hessian_estimate
from ..optim.sophia import SophiaG
from .baselines import GradDiff, trainable_named

SOUL_BS = 5120  # SOUL's SophiaG.step default, the bs its TOFU runs use (module docstring)
SO_GRADDIFF_RHO = 0.1  # SOUL's is 0.04; chosen by the win rate (module docstring, bench/results/sophia_health)
HESSIAN_DATA = ("step", "forget")


def linear_warmup_factor(step: int, total_steps: Optional[int], warmup: float) -> float:
    """transformers' linear schedule with warmup, as a factor of the initial lr at 0-based `step`:
    step / w during the w = max(1, floor(total * warmup)) warmup steps, then (total - step) / (total - w),
    floored at 0. With total_steps None (an unknown budget) or warmup 0: 1.0 after warmup, no decay."""
    if total_steps is None:
        return 1.0
    w = max(1, math.floor(total_steps * warmup)) if warmup > 0 else 0
    if step < w:
        return step / w
    return max(0.0, (total_steps - step) / max(1, total_steps - w))


class _SoulSchedule:
    """SOUL's linear schedule with `warmup` (a fraction of the step budget; 0 and schedule="constant" turn
    it off)."""

    def _init_schedule(self, schedule: str, warmup: float) -> None:
        if schedule not in ("linear", "constant"):
            raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}")
        if not 0.0 <= float(warmup) < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
        self.schedule, self.warmup = schedule, float(warmup)

    def lr_factor(self, step, total_steps):
        if self.schedule == "constant":
            return 1.0
        return linear_warmup_factor(step, total_steps, self.warmup)


class FOGradDiff(_SoulSchedule, GradDiff):
    """SOUL's first-order baseline: GradDiff with AdamW at SOUL's TOFU settings (module docstring)."""
    name = "fo-graddiff"

    def __init__(self, gamma: float = 0.3, lr: float = 5e-6, weight_decay: float = 0.1, schedule: str = "linear",
                 warmup: float = 0.1, **kwargs):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, **kwargs)
        self._init_schedule(schedule, warmup)


class SOGradDiff(_SoulSchedule, GradDiff):
    name = "so-graddiff"
    uses_retain = True
    before_step_changes_gradients = False  # the GNB estimate puts the training gradients back as they were

    def __init__(self, gamma: float = 2.0, lr: float = 5e-6, betas=(0.9, 0.95), rho: float = SO_GRADDIFF_RHO,
                 weight_decay: float = 0.1, bs: float | str = "auto", hessian: str = "squared_grad",
                 hessian_every: int = 10, hessian_data: str = "step", schedule: str = "linear", warmup: float = 0.1,
                 seed: int = 0, reduction: str = "mean", eps: float = 1e-15, nonfinite: str = "raise",
                 stochastic_rounding: bool | str = "auto", backend: str = "auto"):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, reduction=reduction,
                         nonfinite=nonfinite, stochastic_rounding=stochastic_rounding, seed=seed, backend=backend)
        if hessian not in ("gnb", "squared_grad"):
            raise ValueError(f"hessian must be 'gnb' or 'squared_grad', got {hessian!r}")
        if int(hessian_every) < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        if hessian_data not in HESSIAN_DATA:
            raise ValueError(f"hessian_data must be one of {HESSIAN_DATA}, got {hessian_data!r}")
        if bs != "auto" and (isinstance(bs, (bool, str)) or not float(bs) > 0):
            raise ValueError(f"bs must be 'auto' or a number > 0, got {bs!r}")
        self.rho, self.hessian = float(rho), hessian
        self.bs = bs if bs == "auto" else float(bs)
        self.hessian_every, self.hessian_data = int(hessian_every), hessian_data
        self._init_schedule(schedule, warmup)
        self._step_batches: list = []  # (forget, retain) micro-batches loss() saw since the last step
        self._estimate: dict | None = None
        self._metrics: dict = {}

    def _initial_bs(self) -> float:
        """bs until a GNB estimate sets it (module docstring)."""
        return float(SOUL_BS) if self.bs == "auto" else float(self.bs)

    def _sophia(self, params):
        return SophiaG(params, lr=self.lr, betas=self.betas, rho=self.rho, weight_decay=self.weight_decay,
                       bs=self._initial_bs(), hessian=self.hessian, eps=self.eps, nonfinite=self.nonfinite,
                       stochastic_rounding=self.stochastic_rounding, seed=self.seed, backend=self.backend)

    def make_optimizer(self, model):
        return self._sophia(weight_decay_groups(trainable_named(model), self.weight_decay, model))

    def loss(self, model, forget_batch, retain_batch=None):
        if self.hessian == "gnb" and torch.is_grad_enabled():  # a training micro-batch (not an evaluation's):
            self._step_batches.append((forget_batch, retain_batch))  # the step's, for before_step's estimate
        return super().loss(model, forget_batch, retain_batch)

    def _hessian_batches(self, model, forget_batch) -> list:
        """The inputs the GNB estimate runs on: the step's micro-batches (the forget batch given when loss()
        saw none), forget and, with hessian_data="step", retain."""
        pairs = self._step_batches or [(forget_batch, None)]
        device = model_device(model)
        out = []
        for forget, retain in pairs:
            for batch in (forget, retain if self.hessian_data == "step" else None):
                if batch is not None:
                    batch = to_device(batch, device)
                    out.append({"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")})
        return out

    def before_step(self, model, optimizer, forget_batch, step):
        """GNB: estimate the Hessian on this step's batches at steps 0, k, 2k, ... (module docstring) and,
        with bs="auto", set every param group's bs to the tokens it averaged over. No reference to the model
        is kept: a recipe that held on to a DDP wrapper would keep its process group alive after the run."""
        self._estimate = None
        try:
            if self.hessian == "gnb" and step % self.hessian_every == 0:
                batches = self._hessian_batches(model, forget_batch)
                generator = gnb_generator(batches[0]["input_ids"].device, self.seed, step)
                self._estimate = gnb_hessian_estimate(model, optimizer, batches, generator=generator)
                if self.bs == "auto":
                    for group in optimizer.param_groups:
                        group["bs"] = self._estimate["tokens"]
        finally:
            self._step_batches = []

    def after_step(self, model, optimizer, forget_batch, step):
        """Record the step's win rate and bs (step_metrics)."""
        self._step_batches = []
        metrics = {}
        if isinstance(optimizer, SophiaG):
            rate = optimizer.global_win_rate()  # all ranks' shards under FSDP2 (a collective: every rank is here)
            metrics["win_rate"] = rate if math.isfinite(rate) else None
            metrics["bs"] = float(optimizer.param_groups[0]["bs"])
        if self._estimate is not None:
            metrics["hessian_grad_norm"] = self._estimate["grad_norm"]
        self._metrics = metrics

    def step_metrics(self) -> dict:
        """The last step's win_rate (None for a skipped step), bs and, at a GNB estimate, hessian_grad_norm."""
        return dict(self._metrics)
