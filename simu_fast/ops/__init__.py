"""Ops: one file per op, each with its eager reference, input checks and backend dispatch."""
from .hessian_ema import hessian_ema, reference_hessian_ema
from .nonfinite_check import count_nonfinite, reference_count_nonfinite
from .sophia_step import reference_sophia_step, sophia_step
from .update_mask import COLS, DENSE, FULL, ROWS, UpdateMask, full_mask, make_mask

__all__ = [
    "sophia_step", "reference_sophia_step", "hessian_ema", "reference_hessian_ema", "count_nonfinite",
    "reference_count_nonfinite", "UpdateMask", "make_mask", "full_mask", "FULL", "ROWS", "COLS", "DENSE",
]
