"""The simu-fast command line: `simu-fast unlearn --model DIR --forget FILE --method NAME --out DIR ...`.

Options come from three places, later ones winning: built-in defaults, a YAML --config file (keys are the
option names, with '-' or '_', plus a `method_args:` mapping passed to make_method), explicit flags. Method
arguments: config `method_args`, then `lr` (config or --lr), then --set key=value pairs (values parsed with
yaml.safe_load). User errors (missing files, unknown method, bad config) exit with code 2 and one line on
stderr.

Several processes: `torchrun --nproc-per-node N -m simu_fast unlearn ...` (or `accelerate launch`). Each
process initializes the process group from the launcher's environment (gloo on the CPU; nccl on CUDA, one
device per process, cuda:LOCAL_RANK), reads the data, takes its share (the same examples in every epoch,
make_distributed_loader(fixed_shards=True); --batch-size is per process: one step sees N x batch-size forget
examples) and runs the Unlearner with --parallel ddp (the default when WORLD_SIZE
> 1: the model is wrapped in DistributedDataParallel after the recipe's setup; SIMU's attribution is split
across the processes and all-reduced) or --parallel fsdp2 (fully_shard on every decoder layer and the root;
the full weights are gathered to rank 0 to save; --eval then runs on every rank, as a sharded forward is a
collective). Rank 0 alone prints, shows progress and writes --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Optional

from .data.load import FORMATS
from .io import write_atomic

PROG = "simu-fast"
ABLATION_EXAMPLES = 256  # the neuron-mask check after a SIMU run scores at most this many forget / retain rows
DEFAULTS = {"retain": None, "steps": None, "epochs": None, "batch_size": 8, "lr": None, "max_length": 512,
            "grad_accum": 1, "seed": 0, "resume": False, "format": "auto", "save_every": None, "stop_rouge": None,
            "eval_every": None, "eval": False, "holdout": None, "parallel": None, "keep_best": None}
CONFIG_KEYS = {"model", "forget", "retain", "method", "out", "steps", "epochs", "batch_size", "lr", "max_length",
               "grad_accum", "seed", "resume", "format", "save_every", "stop_rouge", "eval_every", "eval", "holdout",
               "parallel", "keep_best", "method_args"}
KEEP_BEST_METRICS = ("forget_rougeL", "forget_answer_prob", "retain_rougeL", "retain_answer_prob")
RUN_FLAGS = {"max_steps": "steps", "keep_best": "--keep-best"}  # RunConfig's names that differ from the flags'
DEFAULT_EVAL_EVERY = 10
PARALLEL_CHOICES = ("ddp", "fsdp2", "none")


class UsageError(Exception):
    """A mistake in what the user gave (reported as one line, exit code 2)."""


def _method_names():
    from .methods.recipes import METHODS
    return sorted(METHODS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Selective unlearning of causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    u = sub.add_parser("unlearn", help="unlearn a forget set from a local model and save the result",
                       description="Unlearn the examples of a forget set from a local transformers causal LM and "
                                   "write the unlearned model, tokenizer, masks, metrics.json and report.md to --out. "
                                   "Explicit flags override values from --config.")
    u.add_argument("--model", metavar="DIR", help="local directory of a transformers causal LM and its tokenizer "
                                                  "(loaded with local_files_only=True; required)")
    u.add_argument("--forget", metavar="FILE", help="forget-set data file (required)")
    u.add_argument("--retain", metavar="FILE", help="retain-set data file (needed by methods that use a retain set)")
    u.add_argument("--method", metavar="NAME", help=f"unlearning method (required): one of {', '.join(_method_names())}")
    u.add_argument("--config", metavar="FILE.yaml", help="YAML file of option values (keys = these option names) "
                                                         "and a 'method_args:' mapping passed to the method")
    u.add_argument("--out", metavar="DIR", help="output directory for the model, masks, metrics.json, report.md "
                                                "and checkpoints (required)")
    stop = u.add_mutually_exclusive_group()
    stop.add_argument("--steps", type=int, metavar="N", help="number of optimizer steps (default: 1 epoch if "
                                                             "neither --steps nor --epochs is given)")
    stop.add_argument("--epochs", type=int, metavar="N", help="number of passes over the forget set")
    u.add_argument("--batch-size", type=int, metavar="N", help=f"batch size of the forget and retain loaders "
                                                               f"(default {DEFAULTS['batch_size']})")
    u.add_argument("--lr", type=float, metavar="X", help="learning rate (default: the method's own)")
    u.add_argument("--max-length", type=int, metavar="N", help=f"maximum tokens per example "
                                                               f"(default {DEFAULTS['max_length']})")
    u.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches accumulated per optimizer step "
                                                               f"(default {DEFAULTS['grad_accum']})")
    u.add_argument("--seed", type=int, metavar="N", help=f"random seed (default {DEFAULTS['seed']})")
    u.add_argument("--stop-rouge", type=float, metavar="TAU",
                   help="also stop as soon as the ROUGE-L recall of greedy answers on the forget set is <= TAU "
                        "(checked every --eval-every steps; --steps/--epochs remain the budget)")
    u.add_argument("--eval-every", type=int, metavar="N",
                   help=f"evaluate forget (and retain) ROUGE-L every N steps (default {DEFAULT_EVAL_EVERY} with "
                        "--stop-rouge or --keep-best)")
    u.add_argument("--keep-best", metavar="METRIC",
                   help="keep the best evaluated model in --out/best: METRIC is one of forget_rougeL, "
                        "forget_answer_prob, retain_rougeL, retain_answer_prob, with 'min:' or 'max:' before it "
                        "(default max), e.g. max:retain_rougeL")
    u.add_argument("--eval", action="store_true", default=None,
                   help="after unlearning, evaluate the model on the forget and retain sets (and --holdout) as "
                        "`simu-fast eval` does; the results go into metrics.json and report.md")
    u.add_argument("--holdout", metavar="FILE", help="holdout data file for --eval (membership inference)")
    u.add_argument("--save-every", type=int, metavar="N", help="write a checkpoint to DIR/checkpoint every N steps "
                                                               "(what --resume continues from)")
    u.add_argument("--resume", action="store_true", default=None,
                   help="continue from the checkpoint in --out (written with --save-every)")
    u.add_argument("--format", choices=FORMATS, help="data file format (default auto: from the file extension)")
    u.add_argument("--parallel", choices=PARALLEL_CHOICES,
                   help="how several processes (torchrun --nproc-per-node N) share the work: ddp (default when "
                        "WORLD_SIZE > 1) replicates the model and averages gradients; fsdp2 shards parameters, "
                        "gradients and optimizer state (fully_shard on every decoder layer and the root); none "
                        "trains independent copies")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra method argument (repeatable); VALUE is parsed as YAML, e.g. --set fraction=0.05")
    e = sub.add_parser("eval", help="evaluate a local model on forget / retain / holdout sets",
                       description="Evaluate a local transformers causal LM: ROUGE-L recall, exact match, answer "
                                   "probability and NLL per split (and per task), TOFU truth ratio where the data "
                                   "has paraphrased/perturbed answers, membership inference (forget vs holdout), "
                                   "utility, and relearning attacks. Writes metrics.json, report.md and plots to --out.")
    e.add_argument("--model", metavar="DIR", required=True, help="local directory of the model and its tokenizer")
    e.add_argument("--forget", metavar="FILE", required=True, help="forget-set data file")
    e.add_argument("--retain", metavar="FILE", help="retain-set data file")
    e.add_argument("--holdout", metavar="FILE", help="holdout (never trained on) data file: the non-members of the "
                                                     "membership-inference attacks")
    e.add_argument("--original", metavar="DIR", help="the model before unlearning: adds the erase-or-hide "
                                                     "diagnostic (D+ / D- of the forget answers' attributions)")
    e.add_argument("--reference", metavar="DIR", help="a reference model (e.g. trained on retain data only): enables "
                                                      "the reference MIA attack and TOFU forget quality")
    e.add_argument("--utility-text", metavar="FILE", help="general text for perplexity: a .txt file (one text per "
                                                          "non-empty line) or JSON Lines with a 'text' field")
    e.add_argument("--multiple-choice", metavar="FILE", help="multiple-choice JSON / JSON Lines: {question, "
                                                             "choices, answer}")
    e.add_argument("--relearn", action="append", choices=("harmful", "benign"), default=[],
                   help="run a relearning attack of this kind (repeatable)")
    e.add_argument("--relearn-fraction", type=float, default=0.5, metavar="P",
                   help="harmful relearning trains on this fraction of the forget set (default 0.5)")
    e.add_argument("--relearn-steps", type=int, default=20, metavar="N", help="relearning steps (default 20)")
    e.add_argument("--relearn-lr", type=float, default=1e-5, metavar="X", help="relearning lr (default 1e-5)")
    e.add_argument("--benign", metavar="FILE", help="data file for benign relearning (default: --retain)")
    e.add_argument("--batch-size", type=int, default=16, metavar="N", help="evaluation batch size (default 16)")
    e.add_argument("--max-length", type=int, default=512, metavar="N", help="maximum tokens per example (default 512)")
    e.add_argument("--format", choices=FORMATS, default="auto", help="data file format (default: from the extension)")
    e.add_argument("--name", default="model", help="the model's row name in the report (default 'model')")
    e.add_argument("--out", metavar="DIR", required=True, help="output directory for metrics.json, report.md, plots")

    d = sub.add_parser("demo", help="the unlearning protocol in miniature on built-in synthetic people: SIMU "
                                     "against the baselines at matched forget",
                       description="Pretrain a small Llama on synthetic people, countries and filler text, fine-tune it "
                                   "on new people (both cached), unlearn the forget people with SIMU and the baselines, "
                                   "each at its own tuned lr, until forget falls to the level of people the model never "
                                   "saw, and print forget / retain / paraphrase / never-seen / world-fact scores and "
                                   "time per method.")
    d.add_argument("--methods", metavar="LIST", help="comma-separated methods (default: " +
                   ",".join(_demo().DEFAULT_METHODS) + ")")
    d.add_argument("--lr", type=float, metavar="X", help="one unlearning lr for every method (default: each "
                                                         "method's own, chosen by the protocol's lr rule)")
    d.add_argument("--max-steps", type=int, metavar="N", help=f"step budget per method "
                                                              f"(default {_demo().demo_settings().max_steps})")
    d.add_argument("--seed", type=int, metavar="N", help="the split of the new people, the data order and the run "
                                                         "(default 0)")
    d.add_argument("--cache", metavar="DIR", help="where the base and fine-tuned models are cached (default "
                                                  "$SIMU_FAST_CACHE/protocol or ~/.cache/simu_fast/protocol)")
    d.add_argument("--out", metavar="DIR", help="also write report.md and metrics.json here")
    return parser


def _demo():
    from .workloads import demo
    return demo


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "unlearn":
            return unlearn(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "eval":
            return evaluate(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return 0


# ---- option resolution ----------------------------------------------------------------------------------
def _load_config(path: str) -> dict:
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


def _parse_set(items) -> dict:
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
    cfg = _load_config(args.config) if args.config else {"method_args": {}}
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in cfg.items() if k != "method_args"})
    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "config", "set") and v is not None}
    if "steps" in explicit or "epochs" in explicit:  # a stopping rule on the command line replaces the config's
        opts["steps"] = opts["epochs"] = None
    opts.update(explicit)
    for key in ("model", "forget", "method", "out"):
        if not opts.get(key):
            raise UsageError(f"--{key} is required (on the command line or in --config)")
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
    _check_out_dir(opts["out"])
    if opts["parallel"] is not None and opts["parallel"] not in PARALLEL_CHOICES:
        raise UsageError(f"unknown parallel {opts['parallel']!r}; choose one of {', '.join(PARALLEL_CHOICES)}")
    if opts["format"] not in FORMATS:
        raise UsageError(f"unknown format {opts['format']!r}; choose one of {', '.join(FORMATS)}")
    if opts["steps"] is None and opts["epochs"] is None:
        opts["epochs"] = 1
    opts["resume"] = bool(opts["resume"])
    opts["run"] = _run_config(opts)
    opts["eval"] = bool(opts["eval"])
    if opts["holdout"] and not opts["eval"]:
        raise UsageError("--holdout is used by --eval; add --eval")
    method_args = dict(cfg["method_args"])
    if opts["lr"] is not None:
        method_args["lr"] = opts["lr"]
    method_args.update(_parse_set(args.set))
    opts["method_args"] = method_args
    from .methods.recipes import METHODS
    key = str(opts["method"]).lower().replace("_", "-")
    if key not in METHODS:
        raise UsageError(f"unknown method {opts['method']!r}; choose one of {', '.join(sorted(METHODS))}")
    opts["method"] = key
    return opts


def _run_config(opts):
    """The training loop's options, checked by RunConfig itself (its errors name the flag)."""
    from .training.run_config import RunConfig, RunConfigError
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


def _check_out_dir(out: str) -> None:
    """UsageError unless --out is a directory there, or one that can be made (its nearest existing ancestor
    a writable directory)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a directory")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, so the directory cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


# ---- the command ------------------------------------------------------------------------------------------
def _load_model(path: str):
    if not os.path.isdir(path):
        raise UsageError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{path} is not a transformers model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {' '.join(str(e).split())}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a causal LM from {path}: {' '.join(str(e).split())}")
    return model, tokenizer


def _load_data(path, fmt, tokenizer, max_length, role):
    from .data import load_examples, tokenize_examples
    try:
        examples = load_examples(path, format=fmt)
    except FileNotFoundError:
        raise UsageError(f"{role} file not found: {path}")
    except (ValueError, IsADirectoryError, KeyError) as e:
        raise UsageError(f"cannot read the {role} file {path}: {' '.join(str(e).split())}")
    try:
        features = tokenize_examples(examples, tokenizer, max_length=max_length)
    except ValueError as e:
        raise UsageError(f"{role} file {path}: {' '.join(str(e).split())}")
    if not features:
        raise UsageError(f"{role} file {path}: no example fits in max-length {max_length}")
    return examples, features


def _save_staged(out: str, write) -> None:
    """write(directory) into a fresh staging directory inside `out`, then each file moved into `out` with
    os.replace: an interrupted save (Ctrl-C, a full disk) leaves no half-written file in `out`, and the
    staging directory is removed either way."""
    import shutil
    import tempfile
    staging = tempfile.mkdtemp(prefix=".saving-", dir=out)
    try:
        write(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def unlearn(args) -> int:
    opts = resolve_options(args)
    from .methods.recipes import make_method
    try:
        method = make_method(opts["method"], **opts["method_args"])
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise UsageError(' '.join(str(e).split()))
    uses_retain = bool(getattr(method, "uses_retain", False))
    if uses_retain and not opts["retain"]:
        raise UsageError(f"method {opts['method']!r} uses a retain set: give --retain FILE")
    for role in ("forget", "retain", "holdout"):  # check the files before the (slower) model load
        if opts[role] and not os.path.isfile(opts[role]):
            raise UsageError(f"{role} file not found: {opts[role]}")
    if opts["resume"]:
        from .training.checkpoints import latest_checkpoint
        if latest_checkpoint(opts["out"]) is None:
            raise UsageError(f"--resume: no checkpoint in {opts['out']}")

    from . import distributed as dist
    parallel = opts["parallel"] or ("ddp" if dist.launched_distributed() else "none")
    if parallel == "fsdp2" and not dist.fsdp2_available():
        raise UsageError("--parallel fsdp2 needs FSDP2 (fully_shard), which this torch lacks; use --parallel ddp")
    if parallel == "fsdp2" and not method.supports_fsdp2:
        raise UsageError(f"method {opts['method']!r} does not support --parallel fsdp2 yet; use --parallel ddp")
    started_group = dist.launched_distributed() and not dist.is_initialized()
    try:
        code = _unlearn(opts, method, uses_retain, parallel)
    except BaseException:
        if started_group:
            dist.leave_process_group(ok=False)
        raise
    # Nothing may still hold the DDP wrapper (the recipe could): its reducer holds the process group, which
    # would then outlive destroy_process_group and be torn down at interpreter exit, where gloo's threads
    # can abort the process (SIGABRT). Every rank leaves once all are done (rank 0 writes the outputs).
    del method
    if started_group:
        dist.leave_process_group()
    return code


def _unlearn(opts, method, uses_retain, parallel) -> int:
    import dataclasses

    from . import distributed as dist
    device = dist.init_from_env() if dist.launched_distributed() else None
    world = dist.world_size()
    main = dist.is_main_process()
    if world == 1:
        parallel = "none"
    if not main:  # one set of progress bars and notices: rank 0's
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass
    inputs = _Inputs(opts, method, uses_retain, device, parallel, world)
    config = dataclasses.replace(opts["run"], parallel="ddp" if parallel == "ddp" else None)
    result, wall = _train(inputs, opts, method, config, progress=main and sys.stderr.isatty())
    full_state = None
    if parallel == "fsdp2":  # a collective: rank 0 gets the full weights to save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full_state = get_model_state_dict(inputs.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    evaluation, checks = _evaluate_after(inputs, opts, method, main, parallel)
    if not main:
        return 0  # rank 0 writes the outputs
    _write_outputs(inputs, opts, method, result, wall, full_state, evaluation, checks, parallel, world)
    print(f"{PROG}: unlearned with {opts['method']} in {result['step']} steps; wrote {opts['out']}")
    return 0


class _Inputs:
    """What a run reads before training: the model (moved, sharded), tokenizer, data, loaders, evaluation."""

    def __init__(self, opts, method, uses_retain, device, parallel, world):
        import torch

        from .data import ensure_pad_token, make_loader
        from .data.sharding import make_distributed_loader
        self.model, self.tokenizer = _load_model(opts["model"])
        try:
            pad = ensure_pad_token(self.tokenizer)
        except ValueError as e:
            raise UsageError(f"{opts['model']}: {' '.join(str(e).split())}")
        if getattr(method, "mask", None) is not None:  # a mask given with --set mask=FILE
            try:
                method.mask.check_fits(self.model)
            except ValueError as e:
                raise UsageError(f"{opts['model']}: {e}")
        length, fmt = opts["max_length"], opts["format"]
        self.forget_examples, self.forget = _load_data(opts["forget"], fmt, self.tokenizer, length, "forget")
        self.retain = _load_data(opts["retain"], fmt, self.tokenizer, length, "retain")[1] if uses_retain else None
        self.retain_examples = _read_examples(opts["retain"], fmt, "retain") if opts["retain"] else None
        self.eval_fn = self.stop_when = None
        if opts["stop_rouge"] is not None or opts["keep_best"] is not None:
            from .eval import rouge_eval_fn, stop_at_forget_rouge
            splits = {"forget": self.forget_examples}
            if opts["keep_best"] is not None and self.retain_examples:
                splits["retain"] = self.retain_examples
            self.eval_fn = rouge_eval_fn(self.tokenizer, splits, batch_size=opts["batch_size"], max_length=length)
            if opts["stop_rouge"] is not None:
                self.stop_when = stop_at_forget_rouge(opts["stop_rouge"])
        if device is not None:
            self.model = self.model.to(device)
        elif torch.cuda.is_available():
            self.model = self.model.to("cuda")
        if parallel == "fsdp2":
            _fully_shard(self.model)
        if world > 1:  # each rank its share (the same examples every epoch: NPO/IMU keep per-example state from
            # their setup pass over them), the same number of batches on every rank
            loader = functools.partial(make_distributed_loader, fixed_shards=True)
        else:
            loader = make_loader
        self.forget_loader = loader(self.forget, opts["batch_size"], shuffle=True, seed=opts["seed"], pad_token_id=pad)
        self.retain_loader = (loader(self.retain, opts["batch_size"], shuffle=True, seed=opts["seed"] + 1,
                                     pad_token_id=pad) if self.retain is not None else None)


def _train(inputs: _Inputs, opts, method, config, progress: bool):
    """The Unlearner's run; (its result, wall seconds). A failure leaves no empty --out behind and turns the
    errors a user can cause (a foreign checkpoint, a NaN loss) into one line."""
    from . import distributed as dist
    from .optim.masked_optimizer import NonFiniteGradientError
    from .training.checkpoints import CheckpointError
    from .training.unlearner import Unlearner
    out = opts["out"]
    made_out = dist.is_main_process() and not os.path.isdir(out)
    if dist.is_main_process():
        os.makedirs(out, exist_ok=True)
    start = time.time()
    try:
        result = Unlearner(inputs.model, method, inputs.forget_loader, inputs.retain_loader, config=config,
                           eval_fn=inputs.eval_fn, stop_when=inputs.stop_when, out_dir=out, progress=progress).run()
    except BaseException as e:
        if made_out and not os.listdir(out):
            os.rmdir(out)
        if isinstance(e, CheckpointError):
            raise UsageError(f"--resume: {e}")
        if isinstance(e, NonFiniteGradientError):
            raise UsageError(f"the loss or its gradient became NaN/inf ({' '.join(str(e).split())}); nothing was "
                             "saved. Try a lower --lr, or check the model's weights and the data")
        raise
    return result, time.time() - start


def _evaluate_after(inputs: _Inputs, opts, method, main: bool, parallel: str):
    """--eval's report on the unlearned model (vs the original) and, for a run with a neuron mask and a retain
    file, whether the mask holds the forget set (zeroed in the original model); (evaluation, mask check)."""
    evaluation = original = check = None
    has_mask = getattr(method, "mask", None) is not None
    evaluates = opts["eval"] and (main or parallel == "fsdp2")  # a sharded model evaluates on every rank
    if evaluates or (main and has_mask and inputs.retain_examples):
        original = _load_model(opts["model"])[0].to(next(inputs.model.parameters()).device)  # the model before
    if evaluates:
        from .eval.evaluate import evaluate_model
        holdout = _read_examples(opts["holdout"], opts["format"], "holdout") if opts["holdout"] else None
        evaluation = evaluate_model(inputs.model, inputs.tokenizer, inputs.forget_examples, inputs.retain_examples, holdout,
                                    original_model=original, batch_size=opts["batch_size"],
                                    max_length=opts["max_length"])
    if main and has_mask and inputs.retain_examples:
        from .eval.neuron_ablation import neuron_ablation
        check = neuron_ablation(original, inputs.tokenizer, method.mask, inputs.forget_examples[:ABLATION_EXAMPLES],
                                inputs.retain_examples[:ABLATION_EXAMPLES], batch_size=opts["batch_size"],
                                max_length=opts["max_length"])
    return evaluation, check


def _write_outputs(inputs: _Inputs, opts, method, result, wall, full_state, evaluation, check, parallel, world):
    """The model, tokenizer and mask (staged, so an interrupted save leaves none half-written), metrics.json
    and report.md (each written atomically)."""
    out = opts["out"]
    mask_file = "mask.safetensors" if getattr(method, "mask", None) is not None else None

    def write_model(directory):
        inputs.model.save_pretrained(directory, **({"state_dict": full_state} if full_state is not None else {}))
        inputs.tokenizer.save_pretrained(directory)
        if mask_file:
            method.mask.save(os.path.join(directory, mask_file))
    _save_staged(out, write_model)
    train_loss = [float(x) for x in result.get("train_loss", [])]
    n_retain = len(inputs.retain) if inputs.retain is not None else 0
    options = {k: v for k, v in opts.items() if k not in ("method_args", "run")}
    options.update(parallel=parallel, world_size=world)
    metrics = {"method": opts["method"], "steps": int(result["step"]), "train_loss": train_loss,
               "stop_reason": result.get("stop_reason"), "wall_time_s": round(wall, 3),
               "n_forget": len(inputs.forget), "n_retain": n_retain,
               "options": options, "method_args": opts["method_args"], "mask": mask_file,
               "history": result.get("history", []), "step_metrics": result.get("step_metrics", []),
               "best": result.get("best"), "eval": evaluation, "neuron_ablation": check}
    from .eval.report import to_jsonable
    write_atomic(os.path.join(out, "metrics.json"),
                 json.dumps(to_jsonable(metrics), indent=2, default=repr, allow_nan=False) + "\n")

    lines = [f"# simu-fast unlearn: {opts['method']}", "",
             f"- model: `{opts['model']}`",
             f"- forget: `{opts['forget']}` ({len(inputs.forget)} examples)",
             f"- retain: " + (f"`{opts['retain']}` ({n_retain} examples)" if inputs.retain is not None else "not used"),
             f"- steps: {result['step']} (stop: {result.get('stop_reason') or 'budget reached'})",
             *([f"- processes: {world} ({parallel}), batch size {opts['batch_size']} per process"] if world > 1 else []),
             f"- method arguments: {json.dumps(opts['method_args'], default=repr) if opts['method_args'] else 'defaults'}",
             f"- wall time: {wall:.1f} s"]
    if result.get("history"):
        last = result["history"][-1]
        lines.append(f"- forget ROUGE-L at step {last['step']}: {last['forget_rougeL']:.3f}" +
                     (f" (stop rule: <= {opts['stop_rouge']})" if opts["stop_rouge"] is not None else ""))
    if result.get("best"):
        best = result["best"]
        lines.append(f"- best evaluated model (`best/`): step {best['step']}, {best['metric']} {best['value']:.3f} "
                     f"({best['mode']})")
    if train_loss:
        lines.append(f"- train loss: first {train_loss[0]:.4f}, last {train_loss[-1]:.4f}")
    if mask_file:
        lines.append(f"- neuron mask: `{mask_file}`")
    if check is not None:
        lines.append(f"- the mask's {check['neurons']} neurons zeroed in the original model: forget answer probability "
                     f"{check['base']['forget']:.3f} -> {check['mask']['forget']:.3f} (random same-size sets: "
                     f"{check['random']['forget']:.3f}; {check['drop_vs_random']:.1f}x their drop), retain "
                     f"{check['base']['retain']:.3f} -> {check['mask']['retain']:.3f}")
    if result.get("step_metrics"):
        last = result["step_metrics"][-1]
        lines.append("- last step's method metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                                  if k != "step" and isinstance(v, float)))
    if evaluation is not None:
        from .eval.report import format_markdown
        lines += ["", format_markdown({opts["method"]: evaluation}, title="Evaluation").strip()]
    lines += ["", "Outputs: the unlearned model and tokenizer (save_pretrained), metrics.json, report.md."]
    write_atomic(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


def _fully_shard(model) -> None:
    """FSDP2: fully_shard every decoder layer, then the root (the layout simu_fast's optimizers support)."""
    from .attribution.architectures import decoder_layers
    from .distributed import fully_shard_fn
    fully_shard = fully_shard_fn()
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise UsageError(f"--parallel fsdp2: {' '.join(str(e).split())}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def demo(args) -> int:
    demo_module = _demo()
    methods = demo_module.DEFAULT_METHODS
    if args.methods:
        from .methods.recipes import METHODS
        methods = tuple(m.strip().lower().replace("_", "-") for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise UsageError(f"unknown method(s) {unknown or args.methods!r}; choose from {', '.join(sorted(METHODS))}")
    changes = {}
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
        changes["max_steps"] = args.max_steps
    if args.seed is not None:
        changes["seeds"] = (args.seed,)
    lrs = None
    if args.lr is not None:
        if not (args.lr > 0 and math.isfinite(args.lr)):
            raise UsageError(f"--lr must be a positive number, got {args.lr}")
        lrs = {name: args.lr for name in methods}
    report = demo_module.run_demo(demo_module.demo_settings(**changes), methods=methods, lrs=lrs,
                                  cache_dir=args.cache, log=lambda line: print(line, flush=True))
    table = demo_module.format_table(report)
    print()
    print(table)
    print(f"\ntotal {report['wall_seconds']:.0f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        from .eval.report import to_jsonable
        write_atomic(os.path.join(args.out, "metrics.json"),
                      json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
        write_atomic(os.path.join(args.out, "report.md"), "# simu-fast demo\n\n" + table + "\n")
    return 0


def _read_examples(path, fmt, role):
    from .data import load_examples
    if not os.path.isfile(path):
        raise UsageError(f"{role} file not found: {path}")
    try:
        examples = load_examples(path, format=fmt)
    except (ValueError, KeyError) as e:
        raise UsageError(f"cannot read the {role} file {path}: {' '.join(str(e).split())}")
    if not examples:
        raise UsageError(f"the {role} file {path} has no examples")
    return examples


def _read_texts(path):
    if not os.path.isfile(path):
        raise UsageError(f"utility text file not found: {path}")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})")
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise UsageError(f"{path}:{number}: expected an object with a string 'text' field")
                line = row["text"]
            texts.append(line)
    if not texts:
        raise UsageError(f"utility text file {path} has no text")
    return texts


def evaluate(args) -> int:
    for flag in ("batch_size", "max_length", "relearn_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.relearn and not 0.0 < args.relearn_fraction < 1.0:
        raise UsageError(f"--relearn-fraction must be in (0, 1), got {args.relearn_fraction}")
    if args.relearn and not args.relearn_lr > 0:
        raise UsageError(f"--relearn-lr must be positive, got {args.relearn_lr}")
    splits = {"forget": _read_examples(args.forget, args.format, "forget")}
    for role in ("retain", "holdout"):
        if getattr(args, role):
            splits[role] = _read_examples(getattr(args, role), args.format, role)
    benign = None
    if "benign" in args.relearn:
        source = args.benign or args.retain
        if not source:
            raise UsageError("--relearn benign needs --benign FILE (or --retain FILE)")
        benign = _read_examples(source, args.format, "benign")
    utility_texts = _read_texts(args.utility_text) if args.utility_text else None
    if args.multiple_choice and not os.path.isfile(args.multiple_choice):
        raise UsageError(f"multiple-choice file not found: {args.multiple_choice}")

    import torch
    from .data import ensure_pad_token
    from .eval.evaluate import evaluate_model
    from .eval.report import report

    model, tokenizer = _load_model(args.model)
    reference = _load_model(args.reference)[0] if args.reference else None
    original = _load_model(args.original)[0] if args.original else None
    ensure_pad_token(tokenizer)
    if torch.cuda.is_available():
        model = model.to("cuda")
        reference = reference.to("cuda") if reference is not None else None
        original = original.to("cuda") if original is not None else None
    attacks = [{"kind": kind, "steps": args.relearn_steps, "lr": args.relearn_lr,
                "eval_every": max(1, args.relearn_steps // 4),
                **({"fraction": args.relearn_fraction} if kind == "harmful" else {})} for kind in args.relearn]
    start = time.time()
    try:
        result = evaluate_model(model, tokenizer, splits["forget"], splits.get("retain"), splits.get("holdout"),
                                reference_model=reference, original_model=original, utility_texts=utility_texts,
                                multiple_choice=args.multiple_choice, relearning=attacks, benign_examples=benign,
                                batch_size=args.batch_size, max_length=args.max_length,
                                progress=sys.stderr.isatty())
    except ValueError as e:
        raise UsageError(' '.join(str(e).split()))
    result["wall_seconds"] = round(time.time() - start, 2)
    paths = report({args.name: result}, args.out, title=f"simu-fast eval: {args.model}")
    f = result["forget"]
    print(f"{PROG}: forget ROUGE-L {f['rougeL_recall']:.3f}, answer probability {f['answer_prob']:.3f}"
          + (f"; retain ROUGE-L {result['retain']['rougeL_recall']:.3f}" if "retain" in result else "")
          + f"; wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))} to {args.out}")
    return 0
