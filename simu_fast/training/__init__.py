"""Training: the loop that drives a recipe (Unlearner), its checkpoints and RNG state, and plain fine-tuning
(simu_fast.training.finetune)."""
from .checkpoints import latest_checkpoint
from .unlearner import Unlearner

__all__ = ["Unlearner", "latest_checkpoint"]
