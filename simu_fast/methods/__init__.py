"""Unlearning objectives: pure loss functions on a model and batches (dicts input_ids, attention_mask, labels
with -100 on prompt and padding, as simu_fast.data.collate makes them)."""
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
)

__all__ = [
    "answer_nll", "ga_loss", "graddiff_loss", "npo_loss", "npo_reference_logprobs",
    "imu_influence", "imu_weights", "imu_loss", "per_example_grads",
]
