"""RunConfig: the options of one training run, checked once, here.

The Unlearner takes them (as keyword arguments or a RunConfig) and so does the command line, which maps a
RunConfigError's option to its flag: one set of rules, one wording, for both.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

PARALLEL = (None, "none", "ddp")
AUTOCAST = (None, "bf16", "fp16")


class RunConfigError(ValueError):
    """A run option with a bad value: `option` names it, `reason` says what is wrong ("must be ..., got ...")."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """max_steps / epochs: the stopping rule (at least one; both: whichever comes first). grad_accum: forget
    micro-batches per optimizer step. max_grad_norm: clipping (None: none). autocast_dtype: "bf16", "fp16"
    (CUDA) or None. eval_every: steps between evaluations (with an eval_fn). keep_best: "max:METRIC",
    "min:METRIC" or "METRIC" (max). save_every: steps between checkpoints. resume: continue from out_dir's
    checkpoint. seed: seeds python, torch and numpy at a fresh start (None: leave the RNGs as they are).
    parallel: "ddp" (the loop wraps the model), "none" or None."""
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    autocast_dtype: Optional[str] = None
    eval_every: Optional[int] = None
    keep_best: Optional[str] = None
    save_every: Optional[int] = None
    resume: bool = False
    seed: Optional[int] = 0
    parallel: Optional[str] = None

    def __post_init__(self):
        if self.max_steps is None and self.epochs is None:
            raise RunConfigError("max_steps", "or epochs is needed: the run has no stopping rule")
        for name in ("max_steps", "epochs", "grad_accum", "eval_every", "save_every"):
            _check_int(name, getattr(self, name), minimum=1, optional=name != "grad_accum")
        _check_int("seed", self.seed, minimum=0, optional=True)
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float))
                                 or not (math.isfinite(norm) and norm > 0)):
            raise RunConfigError("max_grad_norm", f"must be a positive number or None, got {norm!r}")
        if self.autocast_dtype not in AUTOCAST:
            raise RunConfigError("autocast_dtype", f"must be 'bf16', 'fp16' or None, got {self.autocast_dtype!r}")
        if self.parallel not in PARALLEL:
            raise RunConfigError("parallel", f"must be 'ddp', 'none' or None, got {self.parallel!r}")
        if not isinstance(self.resume, bool):
            raise RunConfigError("resume", f"must be True or False, got {self.resume!r}")
        self.keep_best_rule  # raises on a malformed rule

    @property
    def keep_best_rule(self) -> Optional[tuple[str, str]]:
        """keep_best as (mode, metric): "max:NAME" / "min:NAME" / "NAME" (max); None when not set."""
        if self.keep_best is None:
            return None
        mode, sep, name = str(self.keep_best).partition(":")
        if not sep:
            mode, name = "max", mode
        if mode not in ("min", "max") or not name:
            raise RunConfigError("keep_best", f"must be 'max:METRIC', 'min:METRIC' or 'METRIC' (max), got "
                                              f"{self.keep_best!r}")
        return mode, name

    @classmethod
    def from_options(cls, options: dict) -> "RunConfig":
        """A RunConfig from a dict of its fields; an unknown key is a TypeError that lists the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}; the options are {known}")
        return cls(**options)


def _check_int(name: str, value, minimum: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise RunConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise RunConfigError(name, f"must be at least {minimum}, got {value}")
