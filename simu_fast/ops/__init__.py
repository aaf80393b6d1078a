"""Ops: one file per op, each with its eager reference, input checks and backend dispatch."""
from .hessian_ema import hessian_ema, reference_hessian_ema
from .nonfinite_check import count_nonfinite, reference_count_nonfinite
from .ig_accumulate import ig_accumulate, reference_ig_accumulate
from .radix_select import kth_largest, reference_topk_mask, threshold_mask, topk_mask
from .sophia_step import reference_sophia_step, sophia_step
from .ssiuu_regularize import reference_ssiuu_regularize, ssiuu_regularize
from .update_mask import COLS, DENSE, FULL, ROWS, UpdateMask, full_mask, make_mask

__all__ = [
    "sophia_step", "reference_sophia_step", "hessian_ema", "reference_hessian_ema", "count_nonfinite",
    "reference_count_nonfinite", "ig_accumulate", "reference_ig_accumulate", "kth_largest", "topk_mask",
    "threshold_mask", "reference_topk_mask", "ssiuu_regularize", "reference_ssiuu_regularize", "UpdateMask", "make_mask", "full_mask", "FULL", "ROWS", "COLS", "DENSE",
]
