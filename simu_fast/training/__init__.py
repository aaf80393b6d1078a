"""Training: the loop that drives a recipe (Unlearner), its options (RunConfig), checkpoints and RNG state, and
plain fine-tuning through the same loop (simu_fast.training.finetune)."""
from .checkpoints import latest_checkpoint
from .run_config import RunConfig, RunConfigError
from .unlearner import Unlearner

__all__ = ["Unlearner", "RunConfig", "RunConfigError", "latest_checkpoint"]
