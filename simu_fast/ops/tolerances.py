"""How closely a compiled backend must match an op's eager reference: one definition for the op tests
(tests/ops, tests/optim) and `simu-fast selftest` (simu_fast/selftest.py).

Each rule returns a Verdict instead of raising, so the selftest can print it as a row; a test asserts
`verdict.ok` with `verdict.detail` as its message.

- Optimizer state (float32: SophiaG's m and h, the Hessian EMA, AdamW's parameters): rtol 1e-5, atol 1e-6
  (a GPU kernel may contract a*b+c into an FMA).
- SophiaG parameters: float32 as the state; bfloat16 / float16 one unit in the last place of their dtype
  plus 1e-6 absolute (the float32 value before rounding may differ by a float32 ulp and round the other
  way; where p * decay and lr * min(q, 1) nearly cancel, the float32 error exceeds a 16-bit ulp of the tiny
  result). The unclipped count may differ only by the elements whose q lies within 1e-5 of 1.
- ig_accumulate: against a float64 oracle, per feature rtol * (|out0| + sum |terms|), rtol 1e-5 times
  sqrt(positions / 4096) past 4096 positions (same-sign float32 sums err like sqrt(n)).
- ssiuu_regularize: bit for bit, except Triton on a GPU (one ulp of g's dtype: its casts are not pinned down).
- Radix select and the non-finite count: exact.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

STATE_RTOL, STATE_ATOL = 1e-5, 1e-6
PARAM_ULPS, PARAM_ATOL = 1.0, 1e-6
Q_BORDERLINE = 1e-5  # |q - 1| below this: the unclipped count may go either way
IG_RTOL, IG_RTOL_POSITIONS = 1e-5, 4096


class Verdict(NamedTuple):
    ok: bool
    max_error: float  # the largest |actual - expected| (inf where a NaN or a shape/dtype mismatch stands)
    tolerance: str    # the rule, in words
    detail: str       # what went wrong ("" when ok)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _max_abs(diff: torch.Tensor) -> float:
    if diff.numel() == 0:
        return 0.0
    if bool(torch.isnan(diff).any()):
        return math.inf
    return float(diff.max())


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b|, 0 where they are equal (the same infinity, as torch.testing.assert_close takes it); NaN stays."""
    return torch.where(a == b, torch.zeros_like(a), (a - b).abs())


def _layout_error(actual: torch.Tensor, expected: torch.Tensor, tolerance: str, check_dtype: bool = True):
    if actual.shape != expected.shape:
        return Verdict(False, math.inf, tolerance, f"shape {list(actual.shape)}, expected {list(expected.shape)}")
    if check_dtype and actual.dtype != expected.dtype:
        return Verdict(False, math.inf, tolerance, f"dtype {actual.dtype}, expected {expected.dtype}")
    return None


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = STATE_RTOL, atol: float = STATE_ATOL) -> Verdict:
    """|actual - expected| <= atol + rtol * |expected| everywhere (torch.testing.assert_close's rule: equal
    infinities pass, NaN fails)."""
    tolerance = f"rtol {rtol:g} atol {atol:g}"
    bad_layout = _layout_error(actual, expected, tolerance)
    if bad_layout:
        return bad_layout
    a, b = actual.double(), expected.double().to(actual.device)
    diff = _diff(a, b)
    bad = ~(diff <= atol + rtol * b.abs())  # NaN counts as bad
    if not bool(bad.any()):
        return Verdict(True, _max_abs(diff), tolerance, "")
    return Verdict(False, _max_abs(diff), tolerance,
                   f"{int(bad.sum())}/{a.numel()} elements differ by more than {tolerance}; greatest difference "
                   f"{_max_abs(diff):.3g}")


def state_close(actual: torch.Tensor, expected: torch.Tensor) -> Verdict:
    """float32 optimizer state (and AdamW's parameters)."""
    return close(actual, expected, STATE_RTOL, STATE_ATOL)


def within_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0, atol: float = 0.0) -> Verdict:
    """|actual - expected| <= ulps units in the last place of actual's dtype (+ atol); expected may be wider
    (a float64 oracle)."""
    fi = torch.finfo(actual.dtype)
    name = str(actual.dtype).replace("torch.", "")
    tolerance = f"{ulps:g} ulp {name}" + (f" + {atol:g}" if atol else "")
    bad_layout = _layout_error(actual, expected, tolerance, check_dtype=False)
    if bad_layout:
        return bad_layout
    a, b = actual.double(), expected.double().to(actual.device)
    tol = ulps * (fi.eps * torch.maximum(a.abs(), b.abs()) + fi.smallest_normal * fi.eps) + atol
    diff = _diff(a, b)
    bad = ~(diff <= tol)
    if not bool(bad.any()):
        return Verdict(True, _max_abs(diff), tolerance, "")
    worst = float((diff - tol)[bad].nan_to_num(math.inf).max())
    return Verdict(False, _max_abs(diff), tolerance,
                   f"{int(bad.sum())}/{a.numel()} elements differ by more than {ulps:g} ulp of {actual.dtype}; "
                   f"worst {worst + 0.0:.3g} past tolerance")


def sophia_param(actual: torch.Tensor, expected: torch.Tensor, ulps: float = PARAM_ULPS) -> Verdict:
    """SophiaG's parameters: the state rule in float32, else ulps of the dtype plus PARAM_ATOL."""
    if actual.dtype == torch.float32 and expected.dtype == torch.float32:
        return state_close(actual, expected)
    return within_ulp(actual, expected, ulps, PARAM_ATOL)


def unclipped_count_slack(q: torch.Tensor, selected: torch.Tensor) -> int:
    """How far SophiaG's unclipped count may be off: the selected elements with q within Q_BORDERLINE of 1
    (q from a float64 oracle)."""
    return int((((q - 1).abs() < Q_BORDERLINE) & selected).sum())


def ig_rtol(positions: int) -> float:
    return IG_RTOL * max(1.0, math.sqrt(positions / IG_RTOL_POSITIONS))


def within_magnitude(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, rtol: float) -> Verdict:
    """|actual - expected| <= rtol * magnitude per element (ig_accumulate's rule, against a float64 oracle)."""
    tolerance = f"rtol {rtol:.1e} x sum|terms|"
    bad_layout = _layout_error(actual, expected, tolerance, check_dtype=False)
    if bad_layout:
        return bad_layout
    diff = (actual.double() - expected.double().to(actual.device)).abs()
    tol = rtol * magnitude.double().to(actual.device)
    bad = ~(diff <= tol)  # NaN counts as bad
    if not bool(bad.any()):
        return Verdict(True, _max_abs(diff), tolerance, "")
    return Verdict(False, _max_abs(diff), tolerance,
                   f"{int(bad.sum())}/{diff.numel()} features off; worst excess "
                   f"{float((diff - tol)[bad].nan_to_num(math.inf).max()):.3g} (rtol {rtol:.1e})")


def ssiuu_exact(backend: str, device: torch.device) -> bool:
    """Whether ssiuu_regularize's g must equal the reference bit for bit on this backend and device."""
    return not (backend == "triton" and torch.device(device).type == "cuda")


def exact_values(actual: torch.Tensor, expected: torch.Tensor) -> Verdict:
    """Equal as numbers (-0.0 == +0.0; NaN fails): kth_largest's values."""
    tolerance = "exact"
    bad_layout = _layout_error(actual, expected, tolerance, check_dtype=False)
    if bad_layout:
        return bad_layout
    a, b = actual.double(), expected.double().to(actual.device)
    differ = ~(a == b)
    if not bool(differ.any()):
        return Verdict(True, 0.0, tolerance, "")
    return Verdict(False, _max_abs((a - b).abs()[differ]), tolerance,
                   f"{int(differ.sum())}/{a.numel()} values differ from the reference: got "
                   f"{a[differ][:3].tolist()}, expected {b[differ][:3].tolist()}")


def bitwise(actual: torch.Tensor, expected: torch.Tensor) -> Verdict:
    """The same bits (NaN payloads included); booleans and integers: the same values."""
    tolerance = "exact"
    bad_layout = _layout_error(actual, expected, tolerance)
    if bad_layout:
        return bad_layout
    expected = expected.to(actual.device)
    differ = (_bits(actual) != _bits(expected)) if actual.dtype.is_floating_point else (actual != expected)
    count = int(differ.sum())
    if not count:
        return Verdict(True, 0.0, tolerance, "")
    diff = (actual.double() - expected.double()).abs()[differ]  # booleans: 1 per element that differs
    return Verdict(False, _max_abs(diff), tolerance, f"{count}/{actual.numel()} elements differ from the reference")
