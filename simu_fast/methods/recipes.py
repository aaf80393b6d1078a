"""The registry of unlearning recipes: METHODS maps a name to its UnlearningMethod class, make_method builds
one with its defaults overridden by keyword arguments."""
from __future__ import annotations

from .baselines import GA, NPO, GradDiff
from .imu import IMU
from .simu import SIMU
from .soul import FOGradDiff, SOGradDiff
from .ssiuu import Ssiuu

METHODS = {"ga": GA, "graddiff": GradDiff, "npo": NPO, "so-graddiff": SOGradDiff, "fo-graddiff": FOGradDiff,
           "imu": IMU, "ssiuu": Ssiuu, "simu": SIMU}


def make_method(name: str, **overrides):
    """METHODS[name](**overrides); a clear ValueError for an unknown name, TypeError for an unknown option."""
    key = str(name).lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[key]
    try:
        return cls(**overrides)
    except TypeError as e:
        raise TypeError(f"method {key!r} ({cls.__name__}): {e}") from e
