"""The simu-fast command line: `simu-fast unlearn --model DIR --forget FILE --method NAME --out DIR ...`,
`simu-fast eval`, `simu-fast compare`, `simu-fast demo`, `simu-fast selftest`.

One file per command (unlearn.py, evaluate.py, compare.py, demo.py; the selftest is simu_fast/selftest.py), what they read
(inputs.py), where they write (output_dir.py) and unlearn's options (options.py). User errors (missing files,
unknown method, bad config, an --out in use) exit with code 2 and one line on stderr; Ctrl-C exits with 130
and says where it stopped.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..data.load import ANSWER_FIELDS, FORMATS, PROMPT_FIELDS
from .errors import PROG, Interrupted, UsageError
from .inputs import add_dtype_argument
from .options import DEFAULT_EVAL_EVERY, DEFAULT_MAX_LENGTH, DEFAULTS, PARALLEL_CHOICES, resolve_options

__all__ = ["main", "build_parser", "resolve_options", "UsageError", "PARALLEL_CHOICES"]

DATA_ROWS = (f"Data rows: each row of a data file (JSON array, JSON Lines, CSV or parquet) holds a prompt and an "
             f"answer. The prompt column is --prompt-field, else the first present of {', '.join(PROMPT_FIELDS)}; "
             f"the answer column is --answer-field, else the first of {', '.join(ANSWER_FIELDS)}. --format lume "
             "reads {id, input, output, task}; --format tofu reads {question, answer} and optional "
             "paraphrased_answer / perturbed_answer lists (truth ratio). Columns id and task are kept.")


def _method_names():
    from ..methods.recipes import METHODS
    return sorted(METHODS)


def methods_help() -> str:
    """Each method's lr and its --set keys with their defaults, for --help."""
    from ..methods.recipes import METHODS, method_defaults
    lines = ["methods (--method NAME; defaults; change with --lr and --set KEY=VALUE):"]
    for name in sorted(METHODS):
        defaults = method_defaults(METHODS[name])
        lr = defaults.pop("lr", None)
        keys = ", ".join(f"{k}={_show(v)}" for k, v in defaults.items() if k not in ("progress",))
        lines.append(f"  {name:<12} lr {lr:g}; --set keys: {keys}")
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return "unset" if value is None else str(value)


def _data_arguments(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, help="data file format (default auto: from the file extension)")
    parser.add_argument("--prompt-field", metavar="NAME", help="the column that holds the prompt (default: the first "
                                                               f"present of {', '.join(PROMPT_FIELDS)})")
    parser.add_argument("--answer-field", metavar="NAME", help="the column that holds the answer (default: the first "
                                                               f"present of {', '.join(ANSWER_FIELDS)})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Selective unlearning of causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    u = sub.add_parser("unlearn", help="unlearn a forget set from a local model and save the result",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Unlearn the examples of a forget set from a local transformers causal LM and "
                                   "write the unlearned model, tokenizer, masks, metrics.json and report.md to --out. "
                                   "Explicit flags override values from --config.",
                       epilog=DATA_ROWS + "\n\n" + methods_help())
    u.add_argument("--model", metavar="DIR", help="local directory of a transformers causal LM and its tokenizer "
                                                  "(loaded with local_files_only=True; required)")
    u.add_argument("--forget", metavar="FILE", help="forget-set data file (required)")
    u.add_argument("--retain", metavar="FILE", help="retain-set data file (needed by methods that use a retain set)")
    u.add_argument("--method", metavar="NAME", help=f"unlearning method (required): one of {', '.join(_method_names())}")
    u.add_argument("--config", metavar="FILE.yaml", help="YAML file of option values (keys = these option names) "
                                                         "and a 'method_args:' mapping passed to the method")
    u.add_argument("--out", metavar="DIR", help="output directory for the model, masks, metrics.json, report.md "
                                                "and checkpoints (required; new or empty, see --overwrite)")
    u.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the outputs of an earlier run in --out (exactly the files that run wrote)")
    stop = u.add_mutually_exclusive_group()
    stop.add_argument("--steps", type=int, metavar="N", help="number of optimizer steps (default: 1 epoch if "
                                                             "neither --steps nor --epochs is given)")
    stop.add_argument("--epochs", type=int, metavar="N", help="number of passes over the forget set")
    u.add_argument("--batch-size", type=int, metavar="N", help=f"batch size of the forget and retain loaders "
                                                               f"(default {DEFAULTS['batch_size']})")
    u.add_argument("--lr", type=float, metavar="X", help="learning rate (default: the method's own, listed below)")
    u.add_argument("--max-length", type=int, metavar="N", help=f"maximum tokens per example (default "
                                                               f"{DEFAULT_MAX_LENGTH}, or the model's position limit "
                                                               "if lower)")
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
                   help="after unlearning (and after the model is saved), evaluate the model on the forget and "
                        "retain sets (and --holdout) as `simu-fast eval` does; results go into metrics.json and "
                        "report.md")
    u.add_argument("--holdout", metavar="FILE", help="holdout data file for --eval (membership inference)")
    u.add_argument("--save-every", type=int, metavar="N", help="write a checkpoint to DIR/checkpoint every N steps "
                                                               "(what --resume continues from)")
    u.add_argument("--resume", action="store_true", default=None,
                   help="continue from the checkpoint in --out (written with --save-every)")
    _data_arguments(u)
    add_dtype_argument(u)
    u.add_argument("--parallel", choices=PARALLEL_CHOICES,
                   help="how several processes (torchrun --nproc-per-node N) share the work: ddp (default when "
                        "WORLD_SIZE > 1) replicates the model and averages gradients; fsdp2 shards parameters, "
                        "gradients and optimizer state (fully_shard on every decoder layer and the root); none "
                        "trains independent copies")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method argument (repeatable; keys per method below); VALUE is parsed as YAML, e.g. --set "
                        "ratio=0.3")
    e = sub.add_parser("eval", help="evaluate a local model on forget / retain / holdout sets",
                       description="Evaluate a local transformers causal LM: ROUGE-L recall, exact match, answer "
                                   "probability and NLL per split (and per task), TOFU truth ratio where the data "
                                   "has paraphrased/perturbed answers, membership inference (forget vs holdout), "
                                   "utility, and relearning attacks. Writes metrics.json, report.md and plots to --out.",
                       epilog=DATA_ROWS)
    e.add_argument("--model", metavar="DIR", required=True, help="local directory of the model and its tokenizer")
    e.add_argument("--forget", metavar="FILE", required=True, help="forget-set data file")
    e.add_argument("--retain", metavar="FILE", help="retain-set data file")
    e.add_argument("--holdout", metavar="FILE", help="holdout (never trained on) data file: the non-members of the "
                                                     "membership-inference attacks")
    e.add_argument("--original", metavar="DIR", help="the model before unlearning: adds its scores beside the "
                                                     "model's and the erase-or-hide diagnostic (D+ / D-)")
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
    e.add_argument("--mia", metavar="LIST", default="loss,zlib,min_k,min_k_plus_plus",
                   help="membership-inference attacks, forget against --holdout (of loss, zlib, min_k, "
                        "min_k_plus_plus, gradnorm; reference is added with --reference; default %(default)s)")
    e.add_argument("--quantization", metavar="BITS", help="the quantization attack: forget re-measured after "
                                                          "round-to-nearest quantization to these bit widths, e.g. 8,4")
    e.add_argument("--real-authors", metavar="FILE", help="TOFU's real_authors split (TOFU layout with "
                                                          "perturbed_answer): with --world-facts, TOFU's model utility")
    e.add_argument("--world-facts", metavar="FILE", help="TOFU's world_facts split (see --real-authors)")
    e.add_argument("--muse", metavar="DIR", help="a local MUSE corpus folder (hub layout or muse_bench's data/<corpus>): "
                                                 "VerbMem, KnowMem (forget, retain) and PrivLeak")
    e.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, e.g. mmlu,wmdp_bio (the optional "
                                                      "extra: pip install 'simu_fast[lm-eval]')")
    e.add_argument("--lm-eval-include", metavar="DIR", help="a folder of local lm-eval task YAML files")
    e.add_argument("--lm-eval-limit", type=float, metavar="N", help="lm-eval: at most N examples per task")
    e.add_argument("--batch-size", type=int, default=16, metavar="N", help="evaluation batch size (default 16)")
    e.add_argument("--max-length", type=int, default=512, metavar="N", help="maximum tokens per example (default 512)")
    _data_arguments(e)
    add_dtype_argument(e, "auto")
    e.set_defaults(format="auto")
    e.add_argument("--name", default="model", help="the model's row name in the report (default 'model')")
    e.add_argument("--out", metavar="DIR", required=True, help="output directory for metrics.json, report.md, plots "
                                                               "(new or empty, see --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")

    from .compare import add_arguments as compare_arguments
    c = sub.add_parser("compare", help="the fair comparison: methods at matched forget, each at its own lr chosen "
                                       "on validation seeds, over paired seeds",
                       description="Compare unlearning methods on a local model and local data the fair way: each "
                                   "method's lr chosen on validation seeds by a rule fixed in advance (the grid grows "
                                   "while a choice sits at its edge), every method run until forget falls to the "
                                   "never-seen (holdout) level, scores read at that exact target, paired differences "
                                   "with intervals over the reported seeds. Resumable; under torchrun the runs are "
                                   "spread over the ranks.", epilog=DATA_ROWS)
    compare_arguments(c)
    _data_arguments(c)
    c.set_defaults(format="auto")

    from .demo import demo_module
    d = sub.add_parser("demo", help="the unlearning protocol in miniature on built-in synthetic people: SIMU "
                                     "against the baselines at matched forget",
                       description="Pretrain a small Llama on synthetic people, countries and filler text, fine-tune it "
                                   "on new people (both cached), unlearn the forget people with SIMU and the baselines, "
                                   "each at its own tuned lr, until forget falls to the level of people the model never "
                                   "saw, and print forget / retain / paraphrase / never-seen / world-fact scores and "
                                   "time per method.")
    d.add_argument("--methods", metavar="LIST", help="comma-separated methods (default: " +
                   ",".join(demo_module().DEFAULT_METHODS) + ")")
    d.add_argument("--lr", type=float, metavar="X", help="one unlearning lr for every method (default: each "
                                                         "method's own, chosen by the protocol's lr rule)")
    d.add_argument("--max-steps", type=int, metavar="N", help=f"step budget per method "
                                                              f"(default {demo_module().demo_settings().max_steps})")
    d.add_argument("--seed", type=int, metavar="N", help="the split of the new people, the data order and the run "
                                                         "(default 0)")
    d.add_argument("--cache", metavar="DIR", help="where the base and fine-tuned models are cached (default "
                                                  "$SIMU_FAST_CACHE/protocol or ~/.cache/simu_fast/protocol)")
    d.add_argument("--out", metavar="DIR", help="also write report.md and metrics.json here")
    d.add_argument("--export", metavar="DIR", help="unlearn nothing: write the demo's fine-tuned model (DIR/model) "
                                                   "and its data for `simu-fast eval` (forget / retain / holdout, "
                                                   "real-authors and world-facts files in TOFU's layout, DIR/muse "
                                                   "in MUSE's), then print the eval command that measures every "
                                                   "metric on them (new or empty DIR, see --overwrite)")
    d.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out "
                                                            "(or --export)")

    from .. import selftest
    t = sub.add_parser("selftest", help="check every compiled kernel against its eager reference on this machine",
                       description="Run each kernel family on every backend usable on this device against its eager "
                                   "reference, at a few sizes and every dtype; print a PASS/FAIL table and timings "
                                   "against eager PyTorch, write a JSON report, exit 1 on any failure. A kernel that "
                                   "fails is no longer chosen by backend='auto' on this device.")
    selftest.add_arguments(t)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "unlearn":
            from .unlearn import unlearn
            return unlearn(args)
        if args.command == "compare":
            from .compare import compare
            return compare(args)
        if args.command == "demo":
            from .demo import demo
            return demo(args)
        if args.command == "eval":
            from .evaluate import evaluate
            return evaluate(args)
        if args.command == "selftest":
            from ..selftest import main_from_args
            return main_from_args(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Interrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        raise SystemExit(130)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130)
    return 0
