"""simu_fast: fused kernels and recipes for selective unlearning of causal language models."""
from ._extension import backends
from .optim import AdamW, SophiaG
from .training import RunConfig, Unlearner

__version__ = "0.1.0"
__all__ = ["backends", "SophiaG", "AdamW", "Unlearner", "RunConfig", "__version__"]
