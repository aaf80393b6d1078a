"""The registry of unlearning recipes: METHODS maps a name to its UnlearningMethod class, make_method builds
one with its defaults overridden by keyword arguments."""
from __future__ import annotations

import inspect

from .baselines import GA, NPO, GradDiff
from .imu import IMU
from .rmu import RMU
from .simnpo import SimNPO
from .simu import SIMU
from .soul import FOGradDiff, SOGradDiff
from .ssiuu import Ssiuu

METHODS = {"ga": GA, "graddiff": GradDiff, "npo": NPO, "so-graddiff": SOGradDiff, "fo-graddiff": FOGradDiff,
           "imu": IMU, "ssiuu": Ssiuu, "simu": SIMU, "simnpo": SimNPO, "rmu": RMU}


def _init_parameters(cls) -> list:
    """The keyword parameters of a recipe class's __init__, and those its **kwargs pass up the MRO (first
    definition wins)."""
    found = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                found.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(found.values())


def method_options(cls) -> list:
    """The keyword options a recipe class takes."""
    return [p.name for p in _init_parameters(cls)]


def method_defaults(cls) -> dict:
    """{option: default} of a recipe class's options that have one (None: the recipe decides inside)."""
    return {p.name: p.default for p in _init_parameters(cls) if p.default is not p.empty}


def make_method(name: str, **overrides):
    """METHODS[name](**overrides); a clear ValueError for an unknown name, TypeError naming the method's
    options for an unknown option."""
    key = str(name).lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[key]
    options = method_options(cls)
    unknown = [k for k in overrides if k not in options]
    if unknown:
        hint = ("; the optimizer steps are the loop's (--steps, RunConfig.max_steps)"
                + ("; SIMU's integrated-gradient steps are ig_steps" if "ig_steps" in options else "")
                if "steps" in unknown else "")
        raise TypeError(f"method {key!r} has no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(options)}{hint}")
    return cls(**overrides)

