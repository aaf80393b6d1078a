"""`simu-fast selftest`: every compiled kernel of this build against its eager reference, on this machine.

The kernels are tested on CPUs and GPUs of other machines; this runs them where they will be used. On the
current device (CUDA if available, else the CPU; `device` overrides) each backend that is built and usable
there ("cuda" and "triton" on a GPU; "cpu", and "triton" under TRITON_INTERPRET=1, on the CPU) runs each
kernel family at a few sizes, odd ones included, in every dtype the op takes, and is compared with the op's
eager reference under the tolerance its tests use (simu_fast/ops/tolerances.py, the one definition):

    sophia_step, hessian_ema, count_nonfinite    SophiaG's fused step, its Hessian EMA, the non-finite check
    adamw_step                                   AdamW's masked step (eager torch; its kernel is the check)
    ig_accumulate                                against a float64 run of the reference
    topk_mask, kth_largest, threshold_mask       radix select: exact
    ssiuu_regularize                             bit for bit (one ulp for Triton on a GPU)
    neuron_slices                                SophiaG on a compact slice against the dense masked step

Each row also times the backend against the eager reference (median of a few runs; informational), and
one line per op adds torch.compile of the reference (not on the CPU, where compiling takes long). An
exception, a NaN or a mismatch is a FAIL row with its message, never a crash of the selftest.

Failures are recorded per (op, backend) for this device (_extension.selftest_record_path), so that
backend="auto" stops choosing a failing kernel there (see _extension's docstring); per op rather than per
backend so that one broken kernel does not take the others off the device. A pass clears the pair again.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import _extension
from .io import write_atomic
from .ops import tolerances as tol
from .ops.hessian_ema import hessian_ema, reference_hessian_ema
from .ops.ig_accumulate import ig_accumulate, reference_ig_accumulate
from .ops.nonfinite_check import count_nonfinite, reference_count_nonfinite
from .ops.radix_select import (kth_largest, reference_kth_largest, reference_topk_mask, threshold_mask,
                               topk_mask)
from .ops.sophia_step import reference_sophia_step, sophia_step
from .ops.ssiuu_regularize import reference_ssiuu_regularize, ssiuu_regularize
from .ops.update_mask import COLS, DENSE, ROWS, full_mask, make_mask
from .optim import AdamW, SophiaG
from .select.neuron_slices import COLUMNS, NeuronSlices

DEFAULT_JSON = "simu_fast_selftest.json"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("full", "rows", "cols", "dense")
# No torch.compile timing starts after this many seconds of the run (they come after every check): a full run
# on one GPU stays under 3 minutes even with a cold Triton cache.
COMPILE_DEADLINE_S = 110.0
SOPHIA_HP = dict(lr=0.05, beta1=0.9, rho=0.05, bs=20.0, weight_decay=0.1, eps=1e-15)
# (maximize, hessian_beta2, stochastic rounding seed): rotated over sizes and dtypes, as the op's tests do
SOPHIA_OPTIONS = [(False, None, None), (True, None, 12345), (False, 0.99, 777), (True, 0.99, None)]
SSIUU_SETTINGS = [(1e-3, "norm"), (1e-4, "squared"), (10.0, "norm"), (10.0, "squared")]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- sizes: tiny for --quick (and Triton's CPU interpreter), larger on a GPU ------------------------------

def _sizes(kind: str, quick: bool, gpu: bool) -> list:
    """Sizes of one family; the last one is timed against torch.compile."""
    table = {
        "elementwise": ([(7,), (5, 33)],
                        [(1,), (7,), (33, 17), (5, 3, 11), (1031, 1027)],
                        [(1,), (7,), (33, 17), (5, 3, 11), (129, 1031), (4097, 4099)]),
        "ig": ([(3, 5, 7), (2, 9, 33)],
               [(1, 1, 1), (3, 5, 7), (7, 13, 129), (9, 130, 5), (16, 128, 1031)],
               [(1, 1, 1), (3, 5, 7), (7, 13, 129), (5, 999, 300), (16, 512, 4104)]),
        # 1 << 18 and more: topk_mask's and kth_largest's one-pass bracket route
        "radix": ([7, 1000], [1, 7, 4099, 100003, (1 << 18) + 3], [1, 7, 4099, 1_000_003, 16_777_259]),
        # (H, F, k, tokens): a down projection's [H, F] weight, k selected columns
        "slices": ([(8, 24, 3, 5), (6, 40, 17, 9)], [(8, 24, 3, 5), (33, 130, 17, 21), (257, 1031, 64, 64)],
                   [(8, 24, 3, 5), (33, 130, 17, 21), (1024, 4099, 409, 256)]),
    }[kind]
    return table[0] if quick else table[2] if gpu else table[1]


def _size_text(size) -> str:
    return "x".join(map(str, size)) if isinstance(size, tuple) else str(size)


# ---- data ---------------------------------------------------------------------------------------------------

def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _mask(kind: str, p: torch.Tensor, gen: torch.Generator):
    if kind == "cols" and p.dim() != 2:
        kind = "rows"
    if kind == "full" or p.dim() == 0:
        return full_mask(p)
    if kind == "rows":
        n = p.shape[0]
        return make_mask(p, rows=torch.randperm(n, generator=gen)[:_randint(gen, 1, max(1, n // 2))])
    if kind == "cols":
        n = p.shape[1]
        return make_mask(p, cols=torch.randperm(n, generator=gen)[:_randint(gen, 1, max(1, n // 2))])
    return make_mask(p, mask=(torch.rand(p.shape, generator=gen) < 0.3).to(p.device))


def _kind(index: int, dtype_index: int, timed: bool) -> str:
    """Mask kinds rotate over sizes and dtypes; the timed size (full mode) updates every element."""
    return "full" if timed else KINDS[(index + dtype_index) % len(KINDS)]


def _paired_dtype(dtype: torch.dtype, index: int, shift: int, timed: bool) -> torch.dtype:
    """The dtype of a second input that may differ from the row's (SophiaG's gradient, Ssiuu's parameters):
    rotated over the sizes, so that every pair meets; the timed size keeps the row's dtype."""
    if timed:
        return dtype
    return DTYPES[(DTYPES.index(dtype) + shift * index) % len(DTYPES)]


def _dtype_note(**dtypes) -> str:
    return "".join(f" {name}={_dtype_name(d)}" for name, d in dtypes.items())


def _with_specials(g: torch.Tensor, gen: torch.Generator, fraction: float = 0.1) -> torch.Tensor:
    u = torch.rand(g.shape, generator=gen)
    g = g.clone()
    g[u < fraction / 3] = float("nan")
    g[(u >= fraction / 3) & (u < 2 * fraction / 3)] = float("inf")
    g[(u >= 2 * fraction / 3) & (u < fraction)] = float("-inf")
    return g


def _combine(parts: list) -> tol.Verdict:
    """One verdict from (label, Verdict) pairs: ok if all are; the first failure's detail."""
    bad = [(label, v) for label, v in parts if not v.ok]
    rules = list(dict.fromkeys(v.tolerance for _, v in parts))
    max_error = max((v.max_error for _, v in parts), default=0.0)
    detail = "; ".join(f"{label}: {v.detail}" for label, v in bad[:2])
    return tol.Verdict(not bad, max_error, "; ".join(rules), detail)


def _unchanged(new: torch.Tensor, old: torch.Tensor, keep: torch.Tensor, label: str) -> tuple:
    """Elements outside the update must keep their bits (labelled verdict, the rule reads "exact")."""
    v = tol.bitwise(new[keep], old[keep])
    return (f"{label} outside the mask", v._replace(tolerance="exact outside"))


# ---- cases --------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One op on one input. call(name, x) runs backend `name` on x (a copy of `inputs`, changed in place) and
    returns what is compared; judge(out, expected, name) gives the verdict; expected() the reference's result
    (default: the op through backend "reference"); reference: (the raw eager reference function, how to
    call it on x) for the torch.compile timing, or None; bench(name): a callable timed for backend `name`."""
    size: str
    inputs: Any
    call: Callable
    judge: Callable
    expected: Optional[Callable] = None
    reference: Optional[tuple] = None
    bench: Optional[Callable] = None

    def run(self, name: str):
        return self.call(name, _clone(self.inputs))

    def want(self):
        return self.expected() if self.expected is not None else self.run("reference")

    def timed(self, name: str) -> Callable:
        if self.bench is not None:
            return self.bench(name)
        x = _clone(self.inputs)
        return lambda: self.call(name, x)


def _sophia_case(shape, dtype, index, dtype_index, timed, gen, device) -> Case:
    """dtype: the parameter's; the gradient's rotates (every pair); state float32."""
    g_dtype = _paired_dtype(dtype, index, 1, timed)
    p = torch.randn(shape, generator=gen).to(dtype)
    g = (torch.randn(shape, generator=gen) * 0.5).to(g_dtype)
    m = torch.randn(shape, generator=gen) * 0.2
    h = torch.rand(shape, generator=gen).pow(2) * 0.5 + 1e-3
    p, g, m, h = (t.to(device) for t in (p, g, m, h))
    kind = _kind(index, dtype_index, timed)
    mask = _mask(kind, p, gen)
    maximize, beta2, seed = SOPHIA_OPTIONS[(index + dtype_index) % len(SOPHIA_OPTIONS)]
    kw = dict(SOPHIA_HP, maximize=maximize, hessian_beta2=beta2, sr_seeds=[seed] if seed is not None else None)
    sel = mask.element_mask(p)

    def call(name, x):
        count = sophia_step([x[0]], [x[1]], [x[2]], [x[3]], [mask], backend=name, **kw)
        return x[0], x[2], x[3], count

    def judge(out, ref, name):
        g64 = -g.double() if maximize else g.double()
        h64 = h.double() * beta2 + g64 * g64 * (1 - beta2) if beta2 is not None else h.double()
        q = (m.double() * SOPHIA_HP["beta1"] + g64 * (1 - SOPHIA_HP["beta1"])).abs() / (
            h64 * SOPHIA_HP["rho"] * SOPHIA_HP["bs"] + SOPHIA_HP["eps"])
        slack = tol.unclipped_count_slack(q, sel)
        off = abs(int(out[3].sum()) - int(ref[3].sum()))
        count = tol.Verdict(off <= slack, float(off), f"count +-{slack}",
                            f"unclipped count {int(out[3].sum())}, reference {int(ref[3].sum())}")
        return _combine([("p", tol.sophia_param(out[0], ref[0])), ("exp_avg", tol.state_close(out[1], ref[1])),
                         ("hessian", tol.state_close(out[2], ref[2])), ("unclipped", count),
                         _unchanged(out[0], p, ~sel, "p"), _unchanged(out[1], m, ~sel, "exp_avg"),
                         _unchanged(out[2], h, ~sel, "hessian")])

    ref_call = lambda fn, x: fn([x[0]], [x[1]], [x[2]], [x[3]], [mask], **kw)  # noqa: E731
    return Case(f"{_size_text(shape)} {kind}{_dtype_note(g=g_dtype) if g_dtype != dtype else ''}", [p, g, m, h], call,
                judge, reference=(reference_sophia_step, ref_call))


def _hessian_case(shape, dtype, index, dtype_index, timed, gen, device) -> Case:
    g = (torch.randn(shape, generator=gen) * 0.5).to(dtype).to(device)
    h = (torch.rand(shape, generator=gen).pow(2) * 0.5 + 1e-3).to(device)
    kind = _kind(index, dtype_index, timed)
    mask = _mask(kind, h, gen)
    beta2 = (0.99, 0.5)[index % 2]

    def call(name, x):
        hessian_ema([x[0]], [x[1]], [mask], beta2=beta2, backend=name)
        return x[0]

    def judge(out, ref, name):
        return _combine([("hessian", tol.state_close(out, ref)), _unchanged(out, h, ~mask.element_mask(h), "hessian")])

    ref_call = lambda fn, x: fn([x[0]], [x[1]], [mask], beta2=beta2)  # noqa: E731
    return Case(f"{_size_text(shape)} {kind}", [h, g], call, judge, reference=(reference_hessian_ema, ref_call))


def _nonfinite_case(shape, dtype, index, dtype_index, timed, gen, device) -> Case:
    g = _with_specials(torch.randn(shape, generator=gen), gen).to(dtype).to(device)
    kind = _kind(index, dtype_index, timed)
    mask = _mask(kind, g, gen)

    def call(name, x):
        return count_nonfinite([x], [mask], backend=name)

    def judge(out, ref, name):
        return tol.bitwise(out, ref)

    ref_call = lambda fn, x: fn([x], [mask])  # noqa: E731
    return Case(f"{_size_text(shape)} {kind}", g, call, judge, reference=(reference_count_nonfinite, ref_call))


ADAMW_HP = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)


def _adamw_case(shape, dtype, index, dtype_index, timed, gen, device) -> Case:
    """AdamW's masked step against torch.optim.AdamW on the selected elements (as tests/optim/test_adamw.py)."""
    p0 = torch.randn(shape, generator=gen).to(device)
    grads = [torch.randn(shape, generator=gen).to(device) for _ in range(3)]
    kind = _kind(index, dtype_index, timed)
    mask = _mask(kind, p0, gen)
    sel = mask.element_mask(p0)

    def optimizer(name, p):
        opt = AdamW([p], backend=name, **ADAMW_HP)
        if mask.kind == ROWS:
            opt.set_mask(p, rows=mask.index)
        elif mask.kind == COLS:
            opt.set_mask(p, cols=mask.index)
        elif mask.kind == DENSE:
            opt.set_mask(p, mask=sel)
        return opt

    def call(name, x):
        p = torch.nn.Parameter(x)
        opt = optimizer(name, p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    def expected():
        q = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([q], **ADAMW_HP)
        for g in grads:
            q.grad = g.clone()
            opt.step()
        return q.detach()

    def judge(out, ref, name):
        return _combine([("p", tol.state_close(out[sel], ref[sel])), _unchanged(out, p0, ~sel, "p")])

    def bench(name):
        p = torch.nn.Parameter(p0.clone())
        opt = optimizer(name, p)
        p.grad = grads[0].clone()
        return opt.step

    return Case(f"{_size_text(shape)} {kind}", p0, call, judge, expected=expected, bench=bench)


def _ig_case(shape, dtype, index, dtype_index, timed, gen, device) -> Case:
    """Random act, grad, weight (zeros and negatives), mask (an all-zero row); the reference in float64 is the
    oracle (tests/ops/test_ig_accumulate.py)."""
    rows, seq, features = shape
    act = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(rows, generator=gen)
    weight[0] = weight[0].abs() + 0.1
    if rows > 3:
        weight[3] = 0.0
    mask = torch.rand(rows, seq, generator=gen) < 0.7
    mask[0, 0] = True
    if rows > 2:
        mask[2] = False
    out = torch.randn(features, generator=gen)
    inputs = [t.to(device) for t in (out, act, grad, weight, mask)]

    def call(name, x):
        return ig_accumulate(*x, backend=name)

    def expected():
        out0, a, g, w, msk = (t.double() if t.is_floating_point() else t for t in inputs)
        want = reference_ig_accumulate(out0.clone(), a, g, w, msk)
        magnitude = reference_ig_accumulate(out0.abs(), a.abs(), g.abs(), w.abs(), msk)
        return want, magnitude

    def judge(out, ref, name):
        return tol.within_magnitude(out, ref[0], ref[1], tol.ig_rtol(rows * seq))

    ref_call = lambda fn, x: fn(*x)  # noqa: E731
    return Case(_size_text(shape), inputs, call, judge, expected=expected,
                reference=(reference_ig_accumulate, ref_call))


def _radix_values(n: int, dtype, index: int, gen, device) -> torch.Tensor:
    """Random values with +-inf and signed zeros, or a few tied values (x and -x), or mostly signed zeros."""
    kind = ("random", "ties", "zeros")[index % 3]
    if kind == "random":
        x = torch.randn(n, generator=gen) * 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=gen))
        specials = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
        pos = torch.randint(n, (min(n // 50, 40),), generator=gen)
        x[pos] = specials[torch.randint(4, (pos.numel(),), generator=gen)]
    elif kind == "ties":
        pool = torch.tensor([-2.5, 2.5, -1.0, 1.0, -0.0, 0.0, 0.75, 3.0])
        x = pool[torch.randint(len(pool), (n,), generator=gen)]
    else:
        x = torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0)
        other = torch.rand(n, generator=gen) < 0.1
        x[other] = torch.randn(int(other.sum()), generator=gen)
    return x.to(dtype).to(device)


def _ks(n: int, gen) -> list:
    return sorted({1, n, _randint(gen, 1, n)})


def _topk_case(n, dtype, index, dtype_index, timed, gen, device) -> Case:
    x = _radix_values(n, dtype, index + dtype_index, gen, device)
    absolute = bool((index + dtype_index) % 2)
    ks = _ks(n, gen)

    def call(name, x):
        return [topk_mask(x, k, absolute=absolute, backend=name) for k in ks]

    def expected():
        return [reference_topk_mask(x, k, absolute) for k in ks]

    def judge(out, ref, name):
        parts = []
        for k, mask, want in zip(ks, out, ref):
            parts.append((f"k={k}", tol.bitwise(mask, want)))
            picked = int(mask.sum())
            parts.append((f"k={k}", tol.Verdict(picked == k, float(abs(picked - k)), "exact",
                                                f"{picked} selected, wanted {k}")))
        return _combine(parts)

    k_mid = ks[len(ks) // 2]
    return Case(f"{n} {'abs' if absolute else 'signed'}", x, call, judge, expected=expected,
                reference=(reference_topk_mask, lambda fn, x: fn(x, k_mid, absolute)),
                bench=lambda name: (lambda: topk_mask(x, k_mid, absolute=absolute, backend=name)))


def _kth_case(n, dtype, index, dtype_index, timed, gen, device) -> Case:
    x = _radix_values(n, dtype, index + dtype_index + 1, gen, device)
    absolute = bool((index + dtype_index + 1) % 2)
    ks = _ks(n, gen)

    def call(name, x):
        return torch.stack([kth_largest(x, k, absolute=absolute, backend=name).double().cpu() for k in ks])

    def expected():
        return torch.stack([reference_kth_largest(x, k, absolute).double().cpu() for k in ks])

    def judge(out, ref, name):
        return tol.exact_values(out, ref)

    k_mid = ks[len(ks) // 2]
    return Case(f"{n} {'abs' if absolute else 'signed'}", x, call, judge, expected=expected,
                reference=(reference_kth_largest, lambda fn, x: fn(x, k_mid, absolute)),
                bench=lambda name: (lambda: kth_largest(x, k_mid, absolute=absolute, backend=name)))


def _threshold_reference(x: torch.Tensor, value: float, absolute: bool) -> torch.Tensor:
    """The definition: x > value compared exactly (float64 holds every float32/bfloat16/float16 value)."""
    exact = x.double().abs() if absolute else x.double()
    return exact > value


def _threshold_case(n, dtype, index, dtype_index, timed, gen, device) -> Case:
    x = _radix_values(n, dtype, index + dtype_index + 2, gen, device)
    absolute = bool((index + dtype_index) % 2)
    flat = x.reshape(-1).double().cpu()
    values = [0.0, -0.0, float("inf"), float("-inf"), 1e300]
    for _ in range(2):  # values of x and values just beside them
        v = float(flat[_randint(gen, 0, n - 1)])
        values += [v, v * (1 + 2**-30) + 2**-200, v * (1 - 2**-30) - 2**-200]

    def call(name, x):
        return [threshold_mask(x, v, absolute=absolute, backend=name) for v in values]

    def expected():
        return [_threshold_reference(x, v, absolute) for v in values]

    def judge(out, ref, name):
        return _combine([(f"value={v!r}", tol.bitwise(a, b)) for v, a, b in zip(values, out, ref)])

    v_mid = values[5]
    return Case(f"{n} {'abs' if absolute else 'signed'}", x, call, judge, expected=expected,
                reference=(_threshold_reference, lambda fn, x: fn(x, v_mid, absolute)),
                bench=lambda name: (lambda: threshold_mask(x, v_mid, absolute=absolute, backend=name)))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0) * x.abs().clamp(min=1e-3)


def _ssiuu_case(shape, dtype, index, dtype_index, timed, gen, device) -> Case:
    """dtype: the gradient's; the parameters' and probability gradients' rotate. g, phi, d, phi_prev, d_prev
    never zero, attributions of both signs, delta exactly 0 for about 1 in 8 (tests/ops/test_ssiuu_regularize.py)."""
    phi = _nonzero(torch.randn(shape, generator=gen))
    d = _nonzero(torch.randn(shape, generator=gen) * 0.5)
    g = _nonzero(torch.randn(shape, generator=gen) * 0.1)
    phi_prev = _nonzero(phi + torch.randn(shape, generator=gen) * 0.3)
    d_prev = _nonzero(d + torch.randn(shape, generator=gen) * 0.2)
    same = torch.rand(shape, generator=gen) < 0.125
    phi_prev, d_prev = torch.where(same, phi, phi_prev), torch.where(same, d, d_prev)
    p_dtype, d_dtype = _paired_dtype(dtype, index, 1, timed), _paired_dtype(dtype, index, 2, timed)
    inputs = [t.to(dt).to(device) for t, dt in zip((g, phi, d, phi_prev, d_prev),
                                                    (dtype, p_dtype, d_dtype, p_dtype, d_dtype))]
    lam, penalty = SSIUU_SETTINGS[(index + dtype_index) % len(SSIUU_SETTINGS)]

    def call(name, x):
        ssiuu_regularize(*[[t] for t in x], lam=lam, penalty=penalty, backend=name)
        return x

    def judge(out, ref, name):
        rule = tol.bitwise if tol.ssiuu_exact(name, device) else tol.within_ulp
        parts = [("grad", rule(out[0], ref[0]))]
        for t, orig, label in zip(out[1:], inputs[1:], ("params", "prob_grads", "prev_params", "prev_prob_grads")):
            parts.append((f"{label} (read only)", tol.bitwise(t, orig)._replace(tolerance="inputs untouched")))
        return _combine(parts)

    ref_call = lambda fn, x: fn(*[[t] for t in x], lam=lam, penalty=penalty)  # noqa: E731
    note = _dtype_note(p=p_dtype, d=d_dtype) if (p_dtype, d_dtype) != (dtype, dtype) else ""
    return Case(f"{_size_text(shape)} {penalty}{note}", inputs, call, judge,
                reference=(reference_ssiuu_regularize, ref_call))


SLICES_HP = dict(lr=3e-2, weight_decay=0.1, rho=0.04, hessian="squared_grad")


def _slices_case(size, dtype, index, dtype_index, timed, gen, device) -> Case:
    """A down projection's k selected columns trained through NeuronSlices and SophiaG on the compact [H, k]
    state, against SophiaG on the full weight with a column mask, on the same backend and the same
    gradients (tests/select/test_neuron_slices.py); the slice's own gradient against the dense gradient's
    columns in float32."""
    hidden, features, k, tokens = size
    weight = (torch.randn(hidden, features, generator=gen) * 0.1).to(dtype).to(device)
    idx = torch.randperm(features, generator=gen)[:k].sort().values.to(device)
    xs = [torch.randn(tokens, features, generator=gen).to(dtype).to(device) for _ in range(2)]
    w_out = torch.randn(tokens, hidden, generator=gen).to(device)

    def call(name, w):
        linear = torch.nn.Linear(features, hidden, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
        linear.weight.requires_grad_(False)
        dense = torch.nn.Parameter(w.clone())
        slices = NeuronSlices()
        slices.add("down_proj", linear, idx, COLUMNS, with_bias=False)
        compact = slices.parameters()[0]
        opt_c = SophiaG([compact], backend=name, **SLICES_HP)
        slices.attach(opt_c)
        opt_d = SophiaG([dense], backend=name, **SLICES_HP)
        opt_d.set_mask(dense, cols=idx)
        grad_parts = []
        try:
            for x in xs:
                (linear(x).float() * w_out).sum().backward()
                (torch.nn.functional.linear(x, dense).float() * w_out).sum().backward()
                if dtype == torch.float32:
                    grad_parts.append(("slice gradient", tol.state_close(compact.grad, dense.grad[:, idx])))
                compact.grad = dense.grad[:, idx].contiguous()  # the steps compared see the same gradient
                opt_c.step()
                opt_d.step()
                compact.grad, dense.grad = None, None
        finally:
            slices.remove()
        state_c, state_d = opt_c.state[compact], opt_d.state[dense]
        return dict(weight=linear.weight.detach(), dense=dense.detach(), compact=compact.detach(),
                    m=(state_c["exp_avg"], state_d["exp_avg"][:, idx]),
                    h=(state_c["hessian"], state_d["hessian"][:, idx]), grads=grad_parts)

    def judge(out, ref, name):
        others = torch.ones(features, dtype=torch.bool, device=device)
        others[idx] = False
        outside = [(f"{label} outside the slice", tol.bitwise(w[:, others], weight[:, others])
                    ._replace(tolerance="exact outside")) for label, w in (("dense", out["dense"]),
                                                                           ("sliced", out["weight"]))]
        return _combine([("p", tol.sophia_param(out["compact"], out["dense"][:, idx])),
                         ("written back", tol.bitwise(out["weight"][:, idx], out["compact"])),
                         ("exp_avg", tol.state_close(*out["m"])), ("hessian", tol.state_close(*out["h"]))]
                        + outside + out["grads"])

    def bench(name):
        compact = torch.nn.Parameter(weight[:, idx].clone())
        opt = SophiaG([compact], backend=name, **SLICES_HP)
        compact.grad = torch.randn(hidden, k, generator=gen).to(dtype).to(device)
        return opt.step

    return Case(f"{hidden}x{features} k={k}", weight, call, judge, expected=lambda: None, bench=bench)


@dataclass
class Family:
    op: str                 # the row's name
    kernels: tuple          # the ops (resolve_backend's names) whose kernels the rows exercise: quarantined on failure
    make: Callable
    sizes: str
    dtypes: tuple = DTYPES


FAMILIES = [
    Family("sophia_step", ("sophia_step",), _sophia_case, "elementwise"),
    Family("hessian_ema", ("hessian_ema",), _hessian_case, "elementwise"),
    Family("count_nonfinite", ("count_nonfinite",), _nonfinite_case, "elementwise"),
    Family("adamw_step", ("count_nonfinite",), _adamw_case, "elementwise", (torch.float32,)),
    Family("ig_accumulate", ("ig_accumulate",), _ig_case, "ig"),
    Family("topk_mask", ("topk_mask",), _topk_case, "radix"),
    Family("kth_largest", ("kth_largest",), _kth_case, "radix"),
    Family("threshold_mask", ("threshold_mask",), _threshold_case, "radix"),
    Family("ssiuu_regularize", ("ssiuu_regularize",), _ssiuu_case, "elementwise"),
    Family("neuron_slices", ("sophia_step", "count_nonfinite"), _slices_case, "slices"),
]


# ---- running ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (a Triton kernel may compile here)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def usable_backends(device: torch.device) -> tuple[list, list]:
    """(the compiled backends that can run on `device`, [(backend, why not)] for the others)."""
    info = _extension.backends()
    usable, skipped = [], []
    if device.type == "cpu":
        if info["cpu"]:
            usable.append("cpu")
        else:
            skipped.append(("cpu", f"the extension is not built: {info['extension_error']}"))
        if info["triton"] and os.environ.get("TRITON_INTERPRET") == "1":
            usable.append("triton")
        else:
            skipped.append(("triton", "Triton on the CPU runs only under TRITON_INTERPRET=1"))
        return usable, skipped
    if device.type != "cuda":
        return [], [("all", f"no kernels for device type {device.type}")]
    skipped.append(("cpu", "CPU kernels: run `simu-fast selftest --device cpu`"))
    arch = _extension.device_arch(device)
    if not info["cuda_built"]:
        skipped.append(("cuda", "the extension was built without CUDA"))
    elif _extension.cuda_archs() and not _extension.cuda_kernels_run_on(arch, _extension.cuda_archs()):
        skipped.append(("cuda", f"built for {', '.join(_extension.cuda_archs())}, not for this GPU "
                                f"(sm_{arch[0]}{arch[1]})"))
    else:
        usable.append("cuda")
    if info["triton"]:
        usable.append("triton")
    else:
        skipped.append(("triton", "triton is not installed"))
    return usable, skipped


def _compiled_ms(case: Case, device: torch.device, repeats: int, started: float) -> tuple:
    """(ms of torch.compile of the eager reference, or None, and why not)."""
    if case.reference is None:
        return None, "n/a (no single reference function)"
    if device.type == "cpu":
        return None, "n/a (CPU: compiling takes long)"
    if time.perf_counter() - started > COMPILE_DEADLINE_S:
        return None, "n/a (time budget)"
    fn, caller = case.reference
    try:
        compiled = torch.compile(fn, dynamic=False)
        x = _clone(case.inputs)
        return _median_ms(lambda: caller(compiled, x), device, repeats), ""
    except Exception as exc:  # an informational number: a failing compile is not the kernels' failure
        return None, f"n/a (torch.compile failed: {type(exc).__name__})"


def _fmt_ms(ms) -> str:
    return "n/a" if ms is None else f"{ms:.3g} ms"


def _fmt_error(x: float) -> str:
    return "inf" if math.isinf(x) else "nan" if x != x else f"{x:.3g}"


def _row_line(row: dict) -> str:
    speed = ""
    if row["time_ms"] is not None and row["eager_ms"] is not None:
        speed = f"{row['time_ms']:.3g}/{row['eager_ms']:.3g} ms ({row['eager_ms'] / max(row['time_ms'], 1e-9):.2g}x)"
    return (f"{row['op']:<17} {row['backend']:<9} {row['dtype']:<9} {row['size']:<32} {_fmt_error(row['max_error']):>9}  "
            f"{row['tolerance'].split(';')[0][:26]:<26} {row['status']:<5} {speed}")


def _header() -> str:
    return (f"{'op':<17} {'backend':<9} {'dtype':<9} {'size':<32} {'max err':>9}  {'tolerance':<26} {'':<5} "
            "time backend/eager")


def _update_record(device: torch.device, rows: list, report_path: Optional[str]) -> dict:
    """Merge this run into the device's record: failed (op, backend) pairs added, passed ones removed."""
    path = _extension.selftest_record_path(device)
    kernels = {f.op: f.kernels for f in FAMILIES}
    tested, failed = set(), set()
    for row in rows:
        for op in kernels.get(row["op"], ()):
            if row["backend"] == "reference":
                continue
            tested.add((op, row["backend"]))
            if row["status"] != "PASS":
                failed.add((op, row["backend"]))
    record = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
    pairs = {(op, name) for op, names in record.get("failed", {}).items() for name in names}
    pairs = (pairs - tested) | failed
    merged: dict = {}
    for op, name in sorted(pairs):
        merged.setdefault(op, []).append(name)
    record = {"identity": _extension.device_identity(device), "failed": merged,
              "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "report": os.path.abspath(report_path) if report_path else None}
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    _extension.clear_quarantine_cache()
    return {"path": path, "failed": merged}


def _device_alive(device: torch.device) -> bool:
    """False when a failure left the GPU unusable (a sticky CUDA error): nothing after it can be judged."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return bool(torch.ones(1, device=device).sum().item() == 1)
    except Exception:
        return False


def _check_backend(case: Case, expected, name: str, eager_ms, device, repeats) -> tuple:
    """(verdict, ms of the backend, ms of the eager reference): the check, then the timing (informational:
    its failure is noted, never the row's)."""
    try:
        out = case.run(name)
        _sync(device)
        verdict = case.judge(out, expected, name)
    except Exception as exc:
        return tol.Verdict(False, math.inf, "", f"{type(exc).__name__}: {exc}"), None, eager_ms
    try:
        if eager_ms is None:
            eager_ms = _median_ms(case.timed("reference"), device, repeats)
        return verdict, _median_ms(case.timed(name), device, repeats), eager_ms
    except Exception as exc:
        note = f"timing: {type(exc).__name__}: {exc}"
        return verdict._replace(detail=f"{verdict.detail}; {note}" if verdict.detail else note), None, eager_ms


def _json_safe(x):
    """inf / NaN as strings: the report stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_selftest(device=None, quick: bool = False, json_path: Optional[str] = None, log: Callable = print,
                 backends: Optional[list] = None, record: bool = True, seed: int = 0) -> dict:
    """Check every kernel family on every usable backend of `device` (see the module docstring); returns the
    report (report["ok"], report["exit_code"], report["rows"], report["timings"], ...), also written to
    json_path when given. backends: only these (of those usable here). record: update this device's record
    of failing kernels (which backend="auto" reads). Raises ValueError only for a bad device or backend name."""
    started = time.perf_counter()
    device = _pick_device(device)
    usable, skipped = usable_backends(device)
    if backends is not None:
        wanted = [b.strip() for b in backends if b.strip()]
        unknown = sorted(set(wanted) - set(_extension.BACKENDS))
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose among {', '.join(_extension.BACKENDS)}")
        if not any(b in usable for b in wanted):
            why = "; ".join(f"{b}: {reason}" for b, reason in skipped if b in wanted)
            raise ValueError(f"none of {', '.join(wanted)} can run on {device}" + (f" ({why})" if why else ""))
        skipped = [(b, why) for b, why in skipped if b in wanted]
        skipped += [(b, "not asked for (--backends)") for b in usable if b not in wanted]
        usable = [b for b in usable if b in wanted]
    ident = _extension.device_identity(device)
    gpu = device.type == "cuda"
    repeats = 1 if quick else 10 if gpu else 3
    log(f"simu_fast {ident['simu_fast']} selftest on {device} ({ident['device_name']}"
        f"{', sm_' + ident['capability'].replace('.', '') if ident['capability'] else ''}), torch {ident['torch']}, "
        f"triton {ident['triton'] or 'not installed'}; {'quick' if quick else 'full'} mode")
    for name, why in skipped:
        log(f"  not checked: {name}: {why}")
    rows, timed, aborted = [], [], None
    if usable:
        log(_header())
    else:
        log("  no compiled backend to check here: only the eager reference runs on this device")
    for family_index, family in enumerate(FAMILIES if usable else []):
        sizes = _sizes(family.sizes, quick, gpu)
        for dtype_index, dtype in enumerate(family.dtypes):
            for index, size in enumerate(sizes):
                last = index == len(sizes) - 1
                gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * index + 104729 * dtype_index
                                                    + 31 * family_index)
                base = dict(op=family.op, dtype=_dtype_name(dtype), size=_size_text(size))
                try:
                    case = family.make(size, dtype, index, dtype_index, last and not quick, gen, device)
                    base["size"] = case.size
                    expected = case.want()
                    _sync(device)
                except Exception as exc:  # the inputs or the reference itself: no backend can be judged
                    row = dict(base, backend="reference", max_error=math.inf, tolerance="", status="FAIL",
                               message=f"reference: {type(exc).__name__}: {exc}", time_ms=None, eager_ms=None)
                    rows.append(row)
                    log(_row_line(row) + f"\n    {row['message']}")
                    if not _device_alive(device):
                        aborted = f"the device is unusable after {family.op} {base['size']} {base['dtype']}"
                        break
                    continue
                eager_ms = None
                for name in usable:
                    verdict, ms, eager_ms = _check_backend(case, expected, name, eager_ms, device, repeats)
                    row = dict(base, backend=name, max_error=verdict.max_error, tolerance=verdict.tolerance,
                               status="PASS" if verdict.ok else "FAIL", message=verdict.detail, time_ms=ms,
                               eager_ms=eager_ms)
                    rows.append(row)
                    log(_row_line(row) + (f"\n    {row['message']}" if row["status"] != "PASS" else ""))
                    if not verdict.ok and not _device_alive(device):
                        aborted = f"the device is unusable after {family.op} on {name} ({base['size']} {base['dtype']})"
                        break
                if aborted:
                    break
                if last and dtype_index == 0:  # the op's timing line: the largest size, float32
                    timed.append((case, dict(op=family.op, dtype=base["dtype"], size=case.size, eager_ms=eager_ms,
                                             backends={r["backend"]: r["time_ms"] for r in rows[-len(usable):]})))
                del case, expected
            if aborted:
                break
        if aborted:
            log(f"STOPPED: {aborted}; the checks after it did not run")
            break
    timings = []
    for case, timing in timed:  # after every check: torch.compile never delays them (COMPILE_DEADLINE_S)
        timing["compiled_ms"], timing["compiled_note"] = (None, "n/a (not run)") if aborted else \
            _compiled_ms(case, device, repeats, started)
        timings.append(timing)
    del timed
    if timings:
        log("timing (median; informational):")
        for t in timings:
            parts = "  ".join(f"{b} {_fmt_ms(ms)}" for b, ms in t["backends"].items())
            compiled = _fmt_ms(t["compiled_ms"]) if t["compiled_ms"] is not None else t["compiled_note"]
            log(f"  {t['op']:<17} {t['size']} {t['dtype']}: {parts} | eager {_fmt_ms(t['eager_ms'])} | "
                f"torch.compile(eager) {compiled}")
    failures = [r for r in rows if r["status"] != "PASS"]
    report = {
        "ok": not failures and not aborted, "exit_code": 1 if failures or aborted else 0, "device": str(device),
        "device_name": ident["device_name"], "capability": ident["capability"], "simu_fast": ident["simu_fast"],
        "torch": ident["torch"], "cuda": torch.version.cuda, "triton": ident["triton"],
        "extension": ident["extension"], "mode": "quick" if quick else "full", "seed": seed,
        "backends_tested": usable, "backends_skipped": [{"backend": b, "reason": why} for b, why in skipped],
        "build": _extension.backends(), "aborted": aborted, "rows": rows, "timings": timings, "quarantine": None,
    }
    if record and usable:
        try:
            report["quarantine"] = _update_record(device, rows, json_path)
        except OSError as exc:
            report["quarantine"] = {"error": f"could not write the record: {exc}"}
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    if failures:
        pairs = sorted({(r["op"], r["backend"]) for r in failures})
        log(f"FAIL: {len(failures)} of {len(rows)} checks failed: " + ", ".join(f"{op} on {b}" for op, b in pairs))
        if report["quarantine"] and report["quarantine"].get("failed"):
            log("backend='auto' will not use the failing kernels on this device (an explicit backend= or "
                "SIMU_FAST_BACKEND still does).")
        log("Please report the JSON file below at the project's issue tracker.")
    elif not aborted:
        log(f"PASS: {len(rows)} checks on {', '.join(usable) if usable else 'no compiled backend'} "
            f"in {report['elapsed_s']:.0f}s")
    if json_path:
        write_atomic(json_path, json.dumps(_json_safe(report), indent=1, default=str) + "\n")
        log(f"report: {os.path.abspath(json_path)}")
    return report


# ---- command line (the lead's `simu-fast selftest` subcommand calls these) ------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="DEVICE", help="device to check (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes only (seconds)")
    parser.add_argument("--json", metavar="FILE", default=DEFAULT_JSON,
                        help=f"write the report here (default {DEFAULT_JSON}; '' for none)")
    parser.add_argument("--backends", metavar="LIST", help="comma-separated backends to check (default: every "
                                                           "usable one: cuda,triton on a GPU, cpu on the CPU)")
    parser.add_argument("--no-record", action="store_true",
                        help="do not update this device's record of failing kernels (which backend='auto' reads)")


def main_from_args(args: argparse.Namespace) -> int:
    """Run the selftest from parsed add_arguments() options; the exit code: 0 all passed, 1 a failure, 2 a bad
    option (--device, --backends)."""
    backends = args.backends.split(",") if getattr(args, "backends", None) else None
    try:
        report = run_selftest(device=args.device, quick=args.quick, json_path=args.json or None, backends=backends,
                              record=not getattr(args, "no_record", False))
    except (ValueError, RuntimeError) as exc:
        print(f"simu-fast selftest: error: {exc}", file=sys.stderr)
        return 2
    return report["exit_code"]
