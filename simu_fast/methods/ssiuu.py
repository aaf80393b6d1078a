"""Ssiuu ("Erase or Hide?", arXiv 2509.22263; docs/DESIGN.md, "Ssiuu"): GradDiff plus an attribution-guided
regularizer that keeps parameters from growing negative attribution (hiding knowledge) instead of erasing.

Attribution of parameter element i on examples b: A_i(b; theta) = phi_i * dF(b)/dphi_i, F(b) the sum over
the examples (x, y) of b of a target f(y|x), `attribution_target` (defined in attribution_target()). The
paper's f is the sequence probability P(y|x), the product of the answer tokens' probabilities ("prob"); the
default is its length-normalized form P(y|x)^(1/T), T the answer's token count ("normalized_prob": the
geometric mean of the answer tokens' probabilities, TOFU's normalized answer probability; why: below). The
loss (paper, Eq. 3):

    L = L_GD + lam * sum over i with A_i(b; theta^t) < 0 of | A_i(b; theta^(t-1)) - A_i(b; theta^t) |

on the SAME forget batch b at the previous parameters theta^(t-1) (the parameters before the last update,
kept here as a copy) and at the current ones theta^t; A(theta^(t-1)) is a constant (no gradient), and
dF/dphi is treated as a constant (the paper's Appendix B: no Hessian-vector product), so the added gradient
is lam * [A < 0] * sign(A - A_prev) * dF/dphi, element-wise, done by the fused ssiuu_regularize kernel (its
inputs are phi and d = dF/dphi at both parameters, whatever scalar F is: the target changes d only).
penalty="squared" uses the paper's Algorithm 1 / Eq. 6 form, (A_prev - A)^2 (gradient 2 lam [A<0] (A - A_prev)
dF/dphi). per_example=True takes the norm per example (Eq. 3's sum over (x, y) outside the norm), one
forward/backward pair per row; the default sums the attribution over the batch first (Algorithm 1), one pair
per batch. The first step has no previous parameters: only GradDiff.

Where the paper is ambiguous we follow Eq. 3 (same examples, norm) over Algorithm 1 (which compares with the
previous batch's stored attribution, squared): comparing different batches makes the difference mostly
data noise, and the squared difference of two nearly equal attributions is ~1e-9 of the GradDiff gradient
(an earlier version of this recipe did that; after 20 steps its parameters equalled GradDiff's to four
decimals).

Why P(y|x)^(1/T) and not the paper's P (bench/ssiuu_long_answers.py; bench/results/ssiuu_long_answers/report.md,
2-core CPU, one seed): P vanishes on long answers even when each token is well known, and its gradient with it.
On a tiny model that memorized answers of 77-94 tokens (per-token probability 0.84, P(y|x) 5e-8, as low as
6e-10: TOFU's regime, where P is ~3e-8), the paper's term is 1e-10 to 3e-9 of GradDiff's gradient and Ssiuu's
20 steps end 0.0000 of GradDiff's change away from GradDiff's, at any lam up to 0.3. The gradient of P^(1/T),
P^(1/T) * d(mean token log-probability)/dphi, has the scale of GradDiff's forget term at any length and still
falls as the answer is forgotten, as P does. Per example it is an increasing function of P, so the set
[A < 0] is exactly the paper's; summed over a batch, rows weigh P^(1/T)/T instead of P (87% of elements in the
same set on the tests' model of 12-32-token answers). There, where the paper's form works, the two terms agree
in sign on 72% of those elements (cosine 0.57), and both hold the paper's own penalty along the trajectory to
0.93 of GradDiff's. On long answers the paper's sign(A - A_prev) mostly records P's fall (96% of its negative
attributions rise towards 0 each step), not which parameters grow negative influence. Rejected: "logprob"
(alive, but its term grows with the answer's length and it takes over at lam 0.01 on long answers),
"mean_logprob" (as P^(1/T), without fading), "mean_token_prob" (not a function of P: another mask).

Defaults: attribution_target "normalized_prob", lam 0.1, gamma 1, AdamW lr 1e-5, weight decay 0.01
(GradDiff's). Measured (GradDiff at lr 1e-4, 20 steps, the same batches; reg_ratio = ||g_reg|| / ||g_GD||, the
median over the steps): at lam 0.1, reg_ratio 0.11 on the long answers, 0.23 on the short ones, 0.19 on the
demo's model, and the parameters end 7.6%, 12.8% and 17.5% of GradDiff's change away from GradDiff's, the
size of effect the former default (the paper's P at lam 0.01: 8.3% and 21% on the two short-answer models,
reg_ratio 0.08) had where it worked. lam 0.3 lets the regularizer take over (63%, reg_ratio 0.73, on the short
answers); at lam 0.03 it is 2-5%. The term is linear in lam. With attribution_target="prob" use lam ~0.01 (0.1
makes its reg_ratio 0.8-1 on short answers). The paper's lam (1e-4 TOFU, 1e-3 FaithUn) is for 3B models and
its own scale of P. Tune lam per model with reg_ratio in view; it fades as the forget answers' probability
falls.

Logged per step (`self.last_stats`; in the Unlearner's result and the CLI's metrics.json as "step_metrics",
through `step_metrics()`): reg_ratio = ||g_reg|| / ||g_GD|| and the fraction of elements with negative attribution.
Clipping: the regularizer's gradient is added in before_step, and the loop clips after before_step (the
Unlearner, and the transformers Trainer integration), so max_grad_norm clips the total, the gradient of the
whole loss L, as a framework that backpropagates L would: lam weighs the same against GradDiff whether or not
clipping acts. reg_ratio compares like with like: both norms are taken in before_step, before clipping, over
the same parameters (clipping scales both by one factor, so it is also their ratio in the step taken).
Costs per step: two extra forward/backward passes (F at theta^t and at theta^(t-1); 2 per row with
per_example) and one copy of the trainable parameters. Not supported under FSDP2 (sharded parameters).
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..distributed.dtensor import is_dtensor
from ..lm import answer_logprobs, answer_positions, logits_of, model_device, to_device
from ..ops.ssiuu_regularize import PENALTIES, ssiuu_regularize
from .baselines import GradDiff
from .objectives import _check_batch, answer_nll

# the scalar whose parameter gradient d makes the attribution A = phi * d (module docstring); the first is the default
ATTRIBUTION_TARGETS = ("normalized_prob", "prob", "mean_token_prob", "logprob", "mean_logprob")


def sequence_probability(model, batch) -> torch.Tensor:
    """Scalar: sum over the batch's rows of P(answer | prompt) (the product of the answer tokens' probabilities)."""
    return (-answer_nll(model, batch, "sum")).exp().sum()


def attribution_target(model, batch, target: str = "normalized_prob") -> torch.Tensor:
    """Scalar: the sum over the batch's rows of each row's target, T its number of answer tokens, p_t their
    probabilities, P = prod_t p_t:

        prob             P                       (the paper's)
        normalized_prob  P ** (1 / T)            (the geometric mean of p_t; the default)
        mean_token_prob  (1 / T) sum_t p_t
        logprob          log P
        mean_logprob     (1 / T) log P

    A row without answer tokens adds a constant (no gradient)."""
    if target not in ATTRIBUTION_TARGETS:
        raise ValueError(f"attribution_target must be one of {ATTRIBUTION_TARGETS}, got {target!r}")
    _check_batch(batch)
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    labels = batch["labels"].to(logits.device)
    logp = answer_logprobs(logits, labels)  # [rows, seq - 1], 0 where not scored
    scored = answer_positions(labels)
    total = logp.sum(dim=1)  # log P
    count = scored.sum(dim=1).clamp(min=1)
    if target == "prob":
        value = total.exp()
    elif target == "normalized_prob":
        value = (total / count).exp()
    elif target == "mean_token_prob":
        value = (logp.exp() * scored).sum(dim=1) / count
    elif target == "logprob":
        value = total
    else:
        value = total / count
    return value.sum()


@contextlib.contextmanager
def swapped_data(params, values):
    """Within the block each parameter holds `values[i]` (its storage swapped in, no copy), restored on exit."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, v in zip(params, saved):
            p.data = v


class Ssiuu(GradDiff):
    name = "ssiuu"
    uses_retain = True
    supports_fsdp2 = False  # swaps parameter storages for theta^(t-1), which DTensor shards do not allow

    def __init__(self, lam: float = 0.1, gamma: float = 1.0, lr: float = 1e-5, weight_decay: float = 0.01,
                 penalty: str = "norm", per_example: bool = False, log_every: int = 1, backend: str = "auto",
                 attribution_target: str = "normalized_prob", **kwargs):
        super().__init__(gamma=gamma, lr=lr, weight_decay=weight_decay, **kwargs)
        if not (math.isfinite(float(lam)) and float(lam) >= 0.0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if attribution_target not in ATTRIBUTION_TARGETS:
            raise ValueError(f"attribution_target must be one of {ATTRIBUTION_TARGETS}, got {attribution_target!r}")
        self.attribution_target = attribution_target
        if isinstance(log_every, bool) or int(log_every) < 0:
            raise ValueError(f"log_every must be an int >= 0 (0: never), got {log_every!r}")
        self.lam, self.penalty, self.per_example = float(lam), penalty, bool(per_example)
        self.log_every, self.backend = int(log_every), backend
        self.prev_params: dict = {}  # parameter name -> theta^(t-1), detached
        self.last_stats: dict = {}

    def setup(self, model, forget_loader, retain_loader=None):
        if any(is_dtensor(p) for p in model.parameters()):
            raise NotImplementedError("Ssiuu does not support FSDP2 (sharded) parameters yet: run it in one "
                                      "process or under DDP")

    def _prob_grads(self, model, batch, params) -> list:
        """d = d(target)/dphi for each parameter (attribution_target), detached, contiguous."""
        with torch.enable_grad():
            target = attribution_target(model, batch, self.attribution_target)
            grads = torch.autograd.grad(target, params, allow_unused=True)
        return [torch.zeros_like(p) if d is None else d.detach().contiguous() for p, d in zip(params, grads)]

    def before_step(self, model, optimizer, forget_batch, step):
        self.last_stats = {}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in named if id(p) in owned]
        if not named:
            return
        names, params = [n for n, _ in named], [p for _, p in named]
        prev = [self.prev_params.get(n) for n in names]
        prev = [q.to(device=p.device, dtype=p.dtype) if q is not None else None for q, p in zip(prev, params)]
        has_prev = all(q is not None and q.shape == p.shape for q, p in zip(prev, params))
        if has_prev and self.lam > 0.0:
            for p in params:
                if not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
            batch = to_device(forget_batch, model_device(model))
            rows = ([{k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                     for i in range(batch["input_ids"].shape[0])] if self.per_example else [batch])
            log = self.log_every and step % self.log_every == 0
            grads = [p.grad for p in params]
            if log:
                gd_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double()))
                reg = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
                negative = 0
            for row in rows:
                d = self._prob_grads(model, row, params)
                with swapped_data(params, prev):
                    d_prev = self._prob_grads(model, row, params)
                ssiuu_regularize(reg if log else grads, [p.detach() for p in params], d, prev, d_prev, lam=self.lam,
                                 penalty=self.penalty, backend=self.backend, names=names)
                if log:
                    negative += sum(int(((p.detach().float() * x.float()) < 0).sum()) for p, x in zip(params, d))
            if log:
                reg_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(reg)).double()))
                torch._foreach_add_(grads, [r.to(g.dtype) if g.dtype != torch.float32 else r
                                            for r, g in zip(reg, grads)])
                total = sum(p.numel() for p in params) * len(rows)
                self.last_stats = {"step": int(step), "reg_ratio": reg_norm / gd_norm if gd_norm > 0 else math.inf,
                                   "reg_norm": reg_norm, "gd_norm": gd_norm, "negative_fraction": negative / total}
        self.prev_params = {n: p.detach().clone() for n, p in zip(names, params)}

    def step_metrics(self) -> dict:
        """What the loop records for the last step: the regularizer's size relative to GradDiff's gradient."""
        return {k: self.last_stats[k] for k in ("reg_ratio", "negative_fraction")} if self.last_stats else {}

    def state_dict(self):
        return {"prev_params": {n: q.detach().cpu() for n, q in self.prev_params.items()}}

    def load_state_dict(self, state):
        # moved to each parameter's device and dtype at the next step
        self.prev_params = {n: q.contiguous() for n, q in state.get("prev_params", {}).items()}
