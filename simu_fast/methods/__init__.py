"""Unlearning objectives: pure loss functions on a model and batches (dicts input_ids, attention_mask, labels
with -100 on prompt and padding, as simu_fast.data.collate makes them), and the recipes built on them
(UnlearningMethod subclasses; METHODS and make_method)."""
from .objectives import (
    answer_nll,
    ga_loss,
    graddiff_loss,
    imu_influence,
    imu_loss,
    imu_weights,
    npo_loss,
    npo_reference_logprobs,
    per_example_grads,
    streaming_imu_influence,
)
from .base import UnlearningMethod
from .baselines import GA, NPO, GradDiff
from .imu import IMU
from .recipes import METHODS, make_method
from .rmu import RMU
from .simnpo import SimNPO
from .simu import SIMU
from .soul import FOGradDiff, SOGradDiff
from .ssiuu import Ssiuu

__all__ = [
    "answer_nll", "ga_loss", "graddiff_loss", "npo_loss", "npo_reference_logprobs",
    "imu_influence", "imu_weights", "imu_loss", "per_example_grads", "streaming_imu_influence",
    "UnlearningMethod", "GA", "GradDiff", "FOGradDiff", "NPO", "SOGradDiff", "IMU", "Ssiuu", "SIMU",
    "SimNPO", "RMU", "METHODS", "make_method",
]
