"""`simu-fast unlearn`: load, check, train, save, then evaluate.

Order of work, so that nothing a long run produced is lost: every input is checked before the model trains;
the unlearned model, tokenizer, mask, metrics.json and report.md are written as soon as training ends; only
then does the optional evaluation (--eval, SIMU's neuron-mask check) run, and its result is added to
metrics.json and report.md. An evaluation that fails leaves the saved model in place and says so (exit 1).
Ctrl-C stops with "interrupted at step N" and exit code 130; the last checkpoint (--save-every) is kept and
--resume continues from it.

Several processes: `torchrun --nproc-per-node N -m simu_fast unlearn ...` (or `accelerate launch`). Each
process initializes the process group from the launcher's environment (gloo on the CPU; nccl on CUDA, one
device per process, cuda:LOCAL_RANK), reads the data, takes its share (the same examples in every epoch,
make_distributed_loader(fixed_shards=True); --batch-size is per process: one step sees N x batch-size forget
examples) and runs the Unlearner with --parallel ddp (the default when WORLD_SIZE > 1: the model is wrapped
in DistributedDataParallel after the recipe's setup; SIMU's attribution is split across the processes and
all-reduced) or --parallel fsdp2 (fully_shard on every decoder layer and the root; the full weights are
gathered to rank 0 to save; --eval then runs on every rank, as a sharded forward is a collective). Rank 0
alone prints, shows progress, holds the --out lock and writes --out.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

from ..training.checkpoints import BEST, CHECKPOINT, OLD
from .errors import PROG, Interrupted, UsageError, one_line, warn
from .inputs import (check_answers, check_forget_vs_retain, check_vocabulary, fit_max_length, load_model,
                     load_weights, read_examples, tokenize)
from .options import make_recipe, resolve_options
from .output_dir import OutputDir, check_not_an_input

ABLATION_EXAMPLES = 256  # the neuron-mask check after a SIMU run scores at most this many forget / retain rows
SCORED_EXAMPLES = 256  # the before / after answer probabilities are measured on at most this many rows per split
LR_HINT_FACTOR = 100  # a NaN loss at an lr this many times the method's default names the lr as the likely cause


def unlearn(args) -> int:
    opts = resolve_options(args)
    method = make_recipe(opts["method"], opts["method_args"], opts["set_keys"])
    uses_retain = bool(getattr(method, "uses_retain", False))
    if uses_retain and not opts["retain"]:
        raise UsageError(f"method {opts['method']!r} uses a retain set: give --retain FILE")
    for role in ("forget", "retain", "holdout"):  # check the files before the (slower) model load
        path = opts[role]
        if path and not os.path.exists(path):
            raise UsageError(f"{role} file not found: {path}")
        if path and os.path.isdir(path):
            raise UsageError(f"the {role} path {path} is a directory; give the path of one data file")
    mask_file = opts["method_args"].get("mask")
    check_not_an_input(opts["out"], "--out", {"model": opts["model"], "forget file": opts["forget"],
                                              "retain file": opts["retain"], "holdout file": opts["holdout"],
                                              "config file": getattr(args, "config", None),
                                              "mask file": mask_file if isinstance(mask_file, str) else None})
    if opts["resume"]:
        _check_resume(opts)

    from .. import distributed as dist
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


def _check_resume(opts) -> None:
    from ..training.checkpoints import checkpoint_step, latest_checkpoint
    path = latest_checkpoint(opts["out"])
    if path is None:
        raise UsageError(f"--resume: no checkpoint in {opts['out']}")
    done = checkpoint_step(path)
    if opts["steps"] is not None and done is not None and opts["steps"] < done:
        raise UsageError(f"--resume: the checkpoint in {opts['out']} is at step {done}, past --steps {opts['steps']}: "
                         f"a resumed run cannot go back; give --steps {done} or more (more trains further)")


def _unlearn(opts, method, uses_retain, parallel) -> int:
    from .. import distributed as dist
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
    out = OutputDir(opts["out"]).open(overwrite=opts["overwrite"], resume=opts["resume"]) if main else None
    if out is not None:  # what the training loop may write there (training/checkpoints.py)
        out.record(CHECKPOINT, OLD, BEST)
    try:
        return _run(opts, method, uses_retain, parallel, device, world, main, out)
    finally:
        if out is not None:
            out.close()


def _run(opts, method, uses_retain, parallel, device, world, main, out) -> int:
    inputs = _Inputs(opts, method, uses_retain, device, parallel, world, main)
    scores_here = main or parallel == "fsdp2"  # a sharded forward is a collective: every rank takes part
    before = _answer_scores(inputs, opts) if scores_here else None
    config = dataclasses.replace(opts["run"], parallel="ddp" if parallel == "ddp" else None)
    result, wall, lr = _train(inputs, opts, method, config, main)
    full_state = None
    if parallel == "fsdp2":  # a collective: rank 0 gets the full weights to save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full_state = get_model_state_dict(inputs.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    after = _answer_scores(inputs, opts) if scores_here else None
    run = {"result": result, "wall": wall, "lr": lr, "before": before, "after": after, "parallel": parallel,
           "world": world}
    if main:  # the model first: whatever the evaluation does, the trained model is kept
        _save_model(out, inputs, method, full_state)
        _write_report(out, inputs, opts, method, run)
    try:
        evaluation, check = _evaluate_after(inputs, opts, method, main, parallel)
    except Exception as e:
        if not main:
            raise
        run["evaluation_error"] = f"{type(e).__name__}: {one_line(e)}"
        _write_report(out, inputs, opts, method, run)
        print(f"{PROG}: error: the evaluation after unlearning failed ({run['evaluation_error'][:300]}); the "
              f"unlearned model is saved in {opts['out']}", file=sys.stderr)
        return 1
    if not main:
        return 0  # rank 0 writes the outputs
    run.update(evaluation=evaluation, check=check)
    _write_report(out, inputs, opts, method, run)
    change = ""
    if before and after:
        change = " (answer probability " + ", ".join(
            f"{split} {before[split]:.3f} -> {after[split]:.3f}" for split in before if split in after) + ")"
    print(f"{PROG}: unlearned with {opts['method']} in {result['step']} steps{change}; wrote {opts['out']}")
    return 0


class _Inputs:
    """What a run reads before training: the model (moved, sharded), tokenizer, data, loaders, evaluation."""

    def __init__(self, opts, method, uses_retain, device, parallel, world, main):
        import torch

        from ..data import ensure_pad_token, make_loader
        from ..data.sharding import make_distributed_loader
        self.model, self.tokenizer = load_model(opts["model"], dtype=opts["dtype"])
        try:
            pad = ensure_pad_token(self.tokenizer)
        except ValueError as e:
            raise UsageError(f"{opts['model']}: {one_line(e)}")
        if getattr(method, "mask", None) is not None:  # a mask given with --set mask=FILE
            try:
                method.mask.check_fits(self.model)
            except ValueError as e:
                raise UsageError(f"{opts['model']}: {e}")
        opts["max_length"] = fit_max_length(self.model, opts["max_length"], opts["max_length_given"], opts["model"])
        length, fmt, fields = opts["max_length"], opts["format"], (opts["prompt_field"], opts["answer_field"])
        self.forget_examples = read_examples(opts["forget"], fmt, "forget", *fields)
        self.retain_examples = read_examples(opts["retain"], fmt, "retain", *fields) if opts["retain"] else None
        if main:
            check_answers(self.forget_examples, opts["forget"], "forget")
            if self.retain_examples is not None:
                check_answers(self.retain_examples, opts["retain"], "retain")
        if self.retain_examples is not None and uses_retain:
            check_forget_vs_retain(self.forget_examples, self.retain_examples, opts["forget"], opts["retain"])
        self.forget = tokenize(self.forget_examples, self.tokenizer, length, opts["forget"], "forget")
        check_vocabulary(self.model, self.forget, opts["forget"], "forget", opts["model"])
        self.retain = None
        if uses_retain:
            self.retain = tokenize(self.retain_examples, self.tokenizer, length, opts["retain"], "retain")
            check_vocabulary(self.model, self.retain, opts["retain"], "retain", opts["model"])
        self.eval_fn = self.stop_when = None
        if opts["stop_rouge"] is not None or opts["keep_best"] is not None:
            from ..eval import rouge_eval_fn, stop_at_forget_rouge
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


def _answer_scores(inputs: _Inputs, opts) -> dict:
    """Mean answer probability (teacher forced, length-normalized) on the first SCORED_EXAMPLES rows of forget
    and retain: cheap, and enough to show a run that changed nothing as such."""
    from ..eval.answer_likelihood import mean_answer_probability
    splits = {"forget": inputs.forget_examples, "retain": inputs.retain_examples}
    scores = {}
    for name, examples in splits.items():
        if examples:
            try:
                scores[name] = mean_answer_probability(inputs.model, inputs.tokenizer, examples[:SCORED_EXAMPLES],
                                                       opts["batch_size"], opts["max_length"])
            except ValueError:  # no answer token within max_length: nothing to score
                continue
    return scores


def _train(inputs: _Inputs, opts, method, config, main: bool):
    """The Unlearner's run: (its result, wall seconds, the lr it used). Turns the errors a user can cause (a
    foreign checkpoint, a NaN loss) into one line, and Ctrl-C into Interrupted (the last checkpoint kept)."""
    from ..optim.masked_optimizer import NonFiniteGradientError
    from ..training.checkpoints import CheckpointError, checkpoint_step, latest_checkpoint
    from ..training.unlearner import Unlearner
    start = time.time()
    unlearner = Unlearner(inputs.model, method, inputs.forget_loader, inputs.retain_loader, config=config,
                          eval_fn=inputs.eval_fn, stop_when=inputs.stop_when, out_dir=opts["out"],
                          progress="auto" if main else False)
    try:
        result = unlearner.run()
    except KeyboardInterrupt:
        saved = latest_checkpoint(opts["out"])
        if saved is not None:
            kept = (f"the checkpoint at step {checkpoint_step(saved)} is kept in {saved}: continue with the same "
                    "command and --resume")
        else:
            kept = "no checkpoint was written (--save-every N makes a run resumable)"
        raise Interrupted(f"interrupted at step {unlearner.step}; {kept}")
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}")
    except NonFiniteGradientError as e:
        raise UsageError(_non_finite_message(e, opts, method))
    lrs = {g.get("initial_lr", g["lr"]) for g in unlearner.optimizer.param_groups}
    return result, time.time() - start, (lrs.pop() if len(lrs) == 1 else sorted(lrs))


def _non_finite_message(error, opts, method) -> str:
    """One line: what became non-finite (at most three parameter names), and the lr when it is the likely cause."""
    from ..methods.recipes import METHODS, method_defaults
    names = list(getattr(error, "names", None) or [])
    where = ""
    if names:
        where = f" in {', '.join(names[:3])}" + (f" and {len(names) - 3} more parameters" if len(names) > 3 else "")
    else:
        where = f" ({one_line(error)[:200]})"
    default = method_defaults(METHODS[opts["method"]]).get("lr")
    lr = opts["method_args"].get("lr", default)
    if default and lr and lr >= LR_HINT_FACTOR * default:
        hint = (f"lr {lr:g} is {lr / default:.0f}x the method's default {default:g}: the likely cause; try an lr "
                "near the default")
    else:
        hint = "try a lower --lr, or check the model's weights and the data"
    return f"the loss or its gradient became NaN/inf{where}; nothing was saved; {hint}"


def _evaluate_after(inputs: _Inputs, opts, method, main: bool, parallel: str):
    """--eval's report on the unlearned model (vs the original) and, for a run with a neuron mask and a retain
    file, whether the mask holds the forget set (zeroed in the original model); (evaluation, mask check)."""
    evaluation = original = check = None
    has_mask = getattr(method, "mask", None) is not None
    evaluates = opts["eval"] and (main or parallel == "fsdp2")  # a sharded model evaluates on every rank
    if evaluates or (main and has_mask and inputs.retain_examples):
        device = next(inputs.model.parameters()).device
        original = load_weights(opts["model"], opts["dtype"]).to(device)  # the model before unlearning
    if evaluates:
        from ..eval.evaluate import evaluate_model
        if main:
            print(f"{PROG}: evaluating the unlearned model (--eval)", file=sys.stderr, flush=True)
        holdout = read_examples(opts["holdout"], opts["format"], "holdout", opts["prompt_field"],
                                opts["answer_field"]) if opts["holdout"] else None
        evaluation = evaluate_model(inputs.model, inputs.tokenizer, inputs.forget_examples, inputs.retain_examples,
                                    holdout, original_model=original, batch_size=opts["batch_size"],
                                    max_length=opts["max_length"])
    if main and has_mask and inputs.retain_examples:
        from ..eval.neuron_ablation import neuron_ablation
        forget, retain = inputs.forget_examples[:ABLATION_EXAMPLES], inputs.retain_examples[:ABLATION_EXAMPLES]
        print(f"{PROG}: checking the neuron mask: zeroing its neurons in the original model on {len(forget)} forget "
              f"and {len(retain)} retain rows, against random sets of the same sizes", file=sys.stderr, flush=True)
        check = neuron_ablation(original, inputs.tokenizer, method.mask, forget, retain,
                                batch_size=opts["batch_size"], max_length=opts["max_length"])
        if _retain_dropped_more(check):
            warn(_ablation_line(check))
    return evaluation, check


def _retain_dropped_more(check: dict) -> bool:
    drop = {split: check["base"][split] - check["mask"][split] for split in ("forget", "retain")}
    return drop["retain"] > drop["forget"]


def _ablation_line(check: dict) -> str:
    line = (f"the mask's {check['neurons']} neurons zeroed in the original model: forget answer probability "
            f"{check['base']['forget']:.3f} -> {check['mask']['forget']:.3f} (random same-size sets: "
            f"{check['random']['forget']:.3f}; {check['drop_vs_random']:.1f}x their drop), retain "
            f"{check['base']['retain']:.3f} -> {check['mask']['retain']:.3f}")
    if _retain_dropped_more(check):
        line += ("; retain dropped MORE than forget: these neurons serve the retain set at least as much as the "
                 "forget set (try a higher ratio, or --set include_dual=false)")
    return line


def _save_model(out: OutputDir, inputs: _Inputs, method, full_state) -> None:
    """The model, tokenizer and mask, staged (an interrupted save leaves none half-written)."""
    def write_model(directory):
        inputs.model.save_pretrained(directory, **({"state_dict": full_state} if full_state is not None else {}))
        inputs.tokenizer.save_pretrained(directory)
        if getattr(method, "mask", None) is not None:
            method.mask.save(os.path.join(directory, "mask.safetensors"))
    out.save_staged(write_model)


def _write_report(out: OutputDir, inputs: _Inputs, opts, method, run: dict) -> None:
    """metrics.json and report.md (each written atomically), from what is known so far."""
    from ..eval.report import to_jsonable
    from ..methods.recipes import METHODS, method_defaults
    result = run["result"]
    mask_file = "mask.safetensors" if getattr(method, "mask", None) is not None else None
    train_loss = [float(x) for x in result.get("train_loss", [])]
    n_retain = len(inputs.retain) if inputs.retain is not None else 0
    options = {k: v for k, v in opts.items() if k not in ("method_args", "run", "set_keys", "max_length_given")}
    options.update(parallel=run["parallel"], world_size=run["world"])
    used = {**method_defaults(METHODS[opts["method"]]), **opts["method_args"], "lr": run["lr"]}
    used = {k: v for k, v in used.items() if k not in ("mask", "progress") or opts["method_args"].get(k) is not None}
    metrics = {"method": opts["method"], "steps": int(result["step"]), "train_loss": train_loss,
               "stop_reason": result.get("stop_reason"), "wall_time_s": round(run["wall"], 3),
               "n_forget": len(inputs.forget), "n_retain": n_retain, "options": options,
               "method_args": opts["method_args"], "method_args_used": used, "lr": run["lr"], "mask": mask_file,
               "answer_prob_before": run["before"], "answer_prob_after": run["after"],
               "history": result.get("history", []), "step_metrics": result.get("step_metrics", []),
               "best": result.get("best"), "eval": run.get("evaluation"), "neuron_ablation": run.get("check"),
               "evaluation_error": run.get("evaluation_error")}
    out.write_text("metrics.json", json.dumps(to_jsonable(metrics), indent=2, default=repr, allow_nan=False) + "\n")

    world, parallel = run["world"], run["parallel"]
    lines = [f"# simu-fast unlearn: {opts['method']}", "",
             f"- model: `{opts['model']}`",
             f"- forget: `{opts['forget']}` ({len(inputs.forget)} examples)",
             f"- retain: " + (f"`{opts['retain']}` ({n_retain} examples)" if inputs.retain is not None else "not used"),
             f"- steps: {result['step']} (stop: {result.get('stop_reason') or 'budget reached'})",
             *([f"- processes: {world} ({parallel}), batch size {opts['batch_size']} per process"] if world > 1 else []),
             f"- lr: {run['lr']}" + (" (the method's default)" if "lr" not in opts["method_args"] else ""),
             f"- method arguments used: {json.dumps(to_jsonable(used), default=repr)}",
             f"- batch size {opts['batch_size']}, max length {opts['max_length']}, grad accumulation "
             f"{opts['grad_accum']}, seed {opts['seed']}",
             f"- wall time: {run['wall']:.1f} s"]
    before, after = run["before"] or {}, run["after"] or {}
    for split in before:
        if split in after:
            lines.append(f"- {split} answer probability (first {SCORED_EXAMPLES} rows, teacher forced): before "
                         f"{before[split]:.3f}, after {after[split]:.3f}")
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
    if run.get("check") is not None:
        lines.append(f"- {_ablation_line(run['check'])}")
    if result.get("step_metrics"):
        last = result["step_metrics"][-1]
        lines.append("- last step's method metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                                  if k != "step" and isinstance(v, float)))
    if run.get("evaluation_error"):
        lines.append(f"- evaluation FAILED after training: {run['evaluation_error']} (the model above is saved)")
    if run.get("evaluation") is not None:
        from ..eval.report import format_markdown
        lines += ["", format_markdown({opts["method"]: run["evaluation"]}, title="Evaluation").strip()]
    lines += ["", "Outputs: the unlearned model and tokenizer (save_pretrained), metrics.json, report.md."]
    out.write_text("report.md", "\n".join(lines) + "\n")


def _fully_shard(model) -> None:
    """FSDP2: fully_shard every decoder layer, then the root (the layout simu_fast's optimizers support)."""
    from ..attribution.architectures import decoder_layers
    from ..distributed import fully_shard_fn
    fully_shard = fully_shard_fn()
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise UsageError(f"--parallel fsdp2: {one_line(e)}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
