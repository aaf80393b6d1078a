"""`simu-fast unlearn`'s options from three places, later ones winning: built-in defaults, a YAML --config file
(keys are the option names, with '-' or '_', plus a `method_args:` mapping passed to make_method), explicit
flags. Method arguments: config `method_args`, then `lr` (config or --lr), then --set key=value pairs (values
parsed with yaml.safe_load)."""
from __future__ import annotations

import math
import os

from ..data.load import FORMATS
from .errors import UsageError
from .inputs import DTYPES

DEFAULTS = {"retain": None, "steps": None, "epochs": None, "batch_size": 8, "lr": None, "max_length": None,
            "grad_accum": 1, "seed": 0, "resume": False, "format": "auto", "save_every": None, "stop_rouge": None,
            "eval_every": None, "eval": False, "holdout": None, "parallel": None, "keep_best": None,
            "overwrite": False, "prompt_field": None, "answer_field": None, "dtype": "auto"}
DEFAULT_MAX_LENGTH = 512  # tokens per example, when neither the user nor the model's position limit says less
CONFIG_KEYS = set(DEFAULTS) | {"model", "forget", "method", "out", "method_args"}
KEEP_BEST_METRICS = ("forget_rougeL", "forget_answer_prob", "retain_rougeL", "retain_answer_prob")
RUN_FLAGS = {"max_steps": "steps", "keep_best": "--keep-best"}  # RunConfig's names that differ from the flags'
DEFAULT_EVAL_EVERY = 10
PARALLEL_CHOICES = ("ddp", "fsdp2", "none")


def load_config(path: str) -> dict:
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML: {' '.join(str(e).split())}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a YAML mapping of option names to values")
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in CONFIG_KEYS:
            raise UsageError(f"config {path}: unknown key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS))}")
        out[k] = value
    if out.get("method_args") is None:
        out["method_args"] = {}
    if not isinstance(out["method_args"], dict):
        raise UsageError(f"config {path}: method_args must be a mapping")
    if out.get("steps") is not None and out.get("epochs") is not None:
        raise UsageError(f"config {path}: give steps or epochs, not both")
    return out


def parse_set(items) -> dict:
    import yaml
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            result[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--set {key}: cannot parse value {value!r}")
    return result


def resolve_options(args) -> dict:
    cfg = load_config(args.config) if args.config else {"method_args": {}}
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in cfg.items() if k != "method_args"})
    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "config", "set") and v is not None}
    if "steps" in explicit or "epochs" in explicit:  # a stopping rule on the command line replaces the config's
        opts["steps"] = opts["epochs"] = None
    opts.update(explicit)
    for key in ("model", "forget", "method", "out"):
        if not opts.get(key):
            raise UsageError(f"--{key} is required (on the command line or in --config)")
    opts["max_length_given"] = opts["max_length"] is not None
    if opts["max_length"] is None:
        opts["max_length"] = DEFAULT_MAX_LENGTH
    for key, minimum in (("batch_size", 1), ("max_length", 2)):
        v = opts.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise UsageError(f"{key.replace('_', '-')} must be an integer, got {v!r}")
        if v < minimum:
            raise UsageError(f"{key.replace('_', '-')} must be at least {minimum}, got {v}")
    if opts["stop_rouge"] is not None:
        try:
            opts["stop_rouge"] = float(opts["stop_rouge"])
        except (TypeError, ValueError):
            raise UsageError(f"stop-rouge must be a number, got {opts['stop_rouge']!r}")
        if not 0.0 <= opts["stop_rouge"] <= 1.0:
            raise UsageError(f"stop-rouge must be in [0, 1], got {opts['stop_rouge']}")
    if opts["stop_rouge"] is not None or opts["keep_best"] is not None:
        if opts["eval_every"] is None:
            opts["eval_every"] = DEFAULT_EVAL_EVERY
    elif opts["eval_every"] is not None:
        raise UsageError("eval-every needs --stop-rouge or --keep-best (it says when they are checked)")
    if opts["lr"] is not None:
        try:
            opts["lr"] = float(opts["lr"])
        except (TypeError, ValueError):
            raise UsageError(f"lr must be a number, got {opts['lr']!r}")
        if not (math.isfinite(opts["lr"]) and opts["lr"] > 0):
            raise UsageError(f"lr must be a positive finite number, got {opts['lr']}")
    if opts["parallel"] is not None and opts["parallel"] not in PARALLEL_CHOICES:
        raise UsageError(f"unknown parallel {opts['parallel']!r}; choose one of {', '.join(PARALLEL_CHOICES)}")
    if opts["dtype"] not in DTYPES:
        raise UsageError(f"unknown dtype {opts['dtype']!r}; choose one of {', '.join(DTYPES)}")
    if opts["format"] not in FORMATS:
        raise UsageError(f"unknown format {opts['format']!r}; choose one of {', '.join(FORMATS)}")
    if opts["steps"] is None and opts["epochs"] is None:
        opts["epochs"] = 1
    for flag in ("resume", "overwrite", "eval"):
        opts[flag] = bool(opts[flag])
    if opts["resume"] and opts["overwrite"]:
        raise UsageError("--resume continues the run in --out and --overwrite removes it: give one of them")
    opts["run"] = _run_config(opts)
    if opts["holdout"] and not opts["eval"]:
        raise UsageError("--holdout is used by --eval; add --eval")
    method_args = dict(cfg["method_args"])
    if opts["lr"] is not None:
        method_args["lr"] = opts["lr"]
    given = parse_set(args.set)
    method_args.update(given)
    opts["method_args"] = method_args
    opts["set_keys"] = sorted(given)
    from ..methods.recipes import METHODS
    key = str(opts["method"]).lower().replace("_", "-")
    if key not in METHODS:
        raise UsageError(f"unknown method {opts['method']!r}; choose one of {', '.join(sorted(METHODS))}")
    opts["method"] = key
    return opts


def _run_config(opts):
    """The training loop's options, checked by RunConfig itself (its errors name the flag)."""
    from ..training.run_config import RunConfig, RunConfigError
    try:
        run = RunConfig(max_steps=opts["steps"], epochs=opts["epochs"], grad_accum=opts["grad_accum"],
                        eval_every=opts["eval_every"], keep_best=opts["keep_best"], save_every=opts["save_every"],
                        resume=opts["resume"], seed=opts["seed"])
    except RunConfigError as e:
        raise UsageError(f"{RUN_FLAGS.get(e.option, e.option.replace('_', '-'))} {e.reason}")
    if run.keep_best_rule is not None:
        name = run.keep_best_rule[1]
        if name not in KEEP_BEST_METRICS:
            raise UsageError(f"--keep-best: unknown metric {name!r}; choose one of {', '.join(KEEP_BEST_METRICS)}")
        if name.startswith("retain") and not opts["retain"]:
            raise UsageError(f"--keep-best {name} needs --retain FILE")
    return run


def make_recipe(name: str, method_args: dict, set_keys=()):
    """make_method(name, **method_args); an error names the option that caused it (`--set ratio=abc` says
    ratio), found by building the recipe with each given option alone."""
    from ..methods.recipes import make_method
    try:
        return make_method(name, **method_args)
    except (TypeError, ValueError, FileNotFoundError) as e:
        message = " ".join(str(e).split())
        for key, value in method_args.items():
            try:
                make_method(name, **{key: value})
            except (TypeError, ValueError, FileNotFoundError):
                source = "--set" if key in set_keys else "method argument"
                raise UsageError(f"{source} {key}={value!r}: {message}")
        raise UsageError(message)
