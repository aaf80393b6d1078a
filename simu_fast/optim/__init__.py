"""Optimizers with neuron masks: SophiaG (fused multi-tensor step) and AdamW."""
from .adamw import AdamW
from .decay_groups import weight_decay_groups
from .gnb_hessian import GNBHessianSchedule, gnb_hessian_estimate, gnb_hessian_update
from .masked_optimizer import MaskedOptimizer, NonFiniteGradientError
from .sophia import SophiaG

__all__ = ["SophiaG", "AdamW", "MaskedOptimizer", "NonFiniteGradientError", "gnb_hessian_update",
           "gnb_hessian_estimate", "GNBHessianSchedule", "weight_decay_groups"]
