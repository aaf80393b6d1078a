"""The fair comparison, version 2 (`simu-fast compare`, bench/unlearn_protocol.py; docs/DESIGN.md, "Evaluating
unlearning fairly"): methods compared at matched forget, each at its own lr, over paired seeds.

A Task is what one seed compares on: a model, its tokenizer and the split {"forget", "retain", "holdout", and
optionally "retain_paraphrase", "forget_paraphrase", ...}. A user's compare has one Task for every seed (the seed
then draws the batch order and the run's randomness); the synthetic protocol fine-tunes one model per seed.

The rules, fixed before any run (what changed from version 1 and why: README, "Comparing methods fairly"):

1. Target. Matched forget is the holdout set's answer probability in the starting model (never-seen items:
   what forgetting should reach), or `target` when given; strict is `strict_fraction` of it.
2. Reading at the exact target. A run is evaluated every `eval_every` steps, and every step once forget is within
   `near_factor` of the target, so the matched checkpoint (the first evaluated step at or below the target) lies
   at most one step past it. Scores there are reported, and the answer probabilities also linearly interpolated
   (in forget) between the last point above the target and the matched one ("at target"): what the lr rule
   and the paired differences use. Relearning and the other measures start from the matched checkpoint.
3. Schedule. The same for every method and independent of where a run stops: linear warmup over
   `warmup_steps`, then constant (default), or linear decay to 0 at `horizon`, fixed in advance. The recipes'
   own schedules (SOUL's decay to 0 at the run's budget) are replaced.
4. The lr rule, on `validation_seeds` (>= 3, none of them reported): every lr of the grid runs on every
   validation seed for up to `max_steps` steps, stopping at matched forget. Of the lrs that reach matched forget
   on every validation seed, the one with the highest mean retain at target; else, of those that reach it on the
   most seeds, the highest mean retain there; else (none ever reaches it) the lowest mean final forget. Ties go
   to the lower lr. While the chosen lr is the grid's smallest or largest, the grid grows by a half-decade on
   that side (at most `extend_grid` times a side, within `lr_limits`) and the rule is applied again.
5. Budget. Reported runs go until the strict point or `budget_factor` x the slowest method's mean validation
   steps to matched forget at its chosen lr (at least `max_steps`), so no method's budget binds sooner than
   another's.
6. Seeds and pairing. Every method runs on every seed of `seeds`; a seed gives every method the same Task
   and the same batch order (the recipes' setup leaves the training loaders' random stream alone). The
   paired differences between methods come with a t interval (`confidence`) over the seeds where both reached
   matched forget.

Each finished run is cached in `out_dir/runs/` under a key of everything it depends on, so an interrupted
compare resumes and a compare with more seeds reuses the runs it shares. Under torchrun the runs are spread over
the ranks (rank r takes every world-th run that is not cached yet; one device each, cuda:LOCAL_RANK on a GPU);
the ranks meet through the cache (no process group: each run is a one-process run), and rank 0 writes the report.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..io import write_atomic

HALF_DECADES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
COMPARE_METHODS = ("simu", "so-graddiff", "fo-graddiff", "graddiff")
CURVE_SPLITS = ("forget", "retain", "holdout")  # scored at every evaluation; the other splits at the matched point


@dataclass
class CompareSettings:
    methods: tuple = COMPARE_METHODS
    lr_grid: tuple = HALF_DECADES
    extend_grid: int = 2
    lr_limits: tuple = (1e-7, 1e-1)
    validation_seeds: tuple = (100, 101, 102)
    seeds: tuple = (0, 1, 2, 3, 4)
    max_steps: int = 200
    budget_factor: float = 3.0
    schedule: str = "constant"  # or "linear"
    warmup_steps: int = 5
    horizon: Optional[int] = None  # linear: the step the lr reaches 0 (None: max_steps)
    eval_every: int = 5
    near_factor: float = 2.0
    strict_fraction: float = 0.5
    target: Optional[float] = None
    batch_size: int = 8
    max_length: int = 64
    confidence: float = 0.95
    pairs: tuple = ()  # (a, b) method pairs to difference; () = the first method against each other
    method_args: dict = field(default_factory=dict)  # {"simu": {"ratio": 0.3}}; a label "name:variant" may carry its
    # own recipe: {"simu:frozen": {"recipe": "simu", "attention": "frozen"}}

    def __post_init__(self):
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        if len(set(self.validation_seeds) & set(self.seeds)):
            raise ValueError(f"validation seeds {sorted(set(self.validation_seeds) & set(self.seeds))} are also "
                             "reported seeds; the lr must be chosen on seeds that are not reported")
        if not self.methods:
            raise ValueError("no methods to compare")
        if not self.lr_grid:
            raise ValueError("the lr grid is empty")
        for name, value in (("max_steps", self.max_steps), ("eval_every", self.eval_every),
                            ("batch_size", self.batch_size), ("max_length", self.max_length)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.target is not None and not 0 < self.target < 1:
            raise ValueError(f"target must be an answer probability in (0, 1), got {self.target}")

    def run_fields(self) -> dict:
        """What one run's outcome depends on (beyond its method, lr, seed, budget and Task): the cache key."""
        keep = ("schedule", "warmup_steps", "horizon", "eval_every", "near_factor", "strict_fraction", "target",
                "batch_size", "max_length", "max_steps")
        return {k: getattr(self, k) for k in keep}


@dataclass
class Task:
    model: torch.nn.Module
    tokenizer: object
    split: dict
    key: str  # a fingerprint of the model and the data: runs on the same key share the cache
    extra: object = None  # what a caller's measure needs beside the split (the synthetic corpus)


# ---- pure pieces ------------------------------------------------------------------------------------------------
def half_decade(lr: float, up: bool) -> float:
    """The next lr of the half-decade ladder 1e-5, 3e-5, 1e-4, ... above (up) or below `lr`."""
    k = round(2 * math.log10(lr)) + (1 if up else -1)
    return float(f"{(1 if k % 2 == 0 else 3)}e{k // 2}")


def recipe_of(label: str, settings: CompareSettings) -> tuple:
    """(recipe name, its arguments) of a method label ("simu", or "simu:frozen" with method_args naming it)."""
    args = dict(settings.method_args.get(label, {}))
    return args.pop("recipe", label.split(":")[0]), args


def read_at_target(curve: list, start: dict, target: float) -> dict:
    """The matched checkpoint of a run's evaluated `curve` ([{"step", "forget", ...}], increasing steps; `start`
    the step-0 scores): {"reached", "step", the scores there, "at_target": every score linearly interpolated in
    forget between the last point above the target (or the start) and the matched point}. Not reached: the last
    point's scores, step None."""
    before = {"step": 0, **start}
    for point in curve:
        if point.get("forget") is None:
            continue
        if point["forget"] <= target:
            span = before["forget"] - point["forget"]
            w = 1.0 if span <= 0 else (before["forget"] - target) / span
            at = {k: before[k] + w * (point[k] - before[k]) for k in point
                  if k != "step" and isinstance(point.get(k), (int, float)) and isinstance(before.get(k), (int, float))}
            return {"reached": True, **point, "at_target": at}
        before = point
    last = before
    return {"reached": False, **last, "step": None, "at_target": None}


def choose_lr(rows: dict, n_seeds: int) -> tuple:
    """The lr rule (module docstring, 4.): rows {lr: [{"reached", "retain_at_target", "final_forget"}, one per
    validation seed]} -> (lr, reason)."""
    def retain(lr):
        vals = [r["retain_at_target"] for r in rows[lr] if r["reached"]]
        return statistics.fmean(vals) if vals else -1.0

    reach = {lr: sum(r["reached"] for r in runs) for lr, runs in rows.items()}
    best_reach = max(reach.values())
    if best_reach == n_seeds:
        pool, reason = [lr for lr in rows if reach[lr] == n_seeds], "highest mean retain at target, reached on every validation seed"
    elif best_reach > 0:
        pool, reason = [lr for lr in rows if reach[lr] == best_reach], (
            f"none reached matched forget on every validation seed: highest retain of those reaching it on {best_reach}")
    else:
        forget = {lr: statistics.fmean(r["final_forget"] for r in runs) for lr, runs in rows.items()}
        lr = min(sorted(rows), key=lambda x: forget[x])
        return lr, "no lr reached matched forget on any validation seed: lowest mean final forget"
    return max(sorted(pool), key=lambda x: (retain(x), -x)), reason


def grid_extension(grid: list, chosen: float, settings: CompareSettings, added: dict) -> Optional[float]:
    """The lr to add when `chosen` sits at an edge of `grid` (module docstring, 4.), or None. added: {"down", "up"}
    counts of the extensions made so far (updated)."""
    for side, edge, up in (("down", min(grid), False), ("up", max(grid), True)):
        if chosen == edge and added[side] < settings.extend_grid:
            lr = half_decade(edge, up)
            if settings.lr_limits[0] <= lr <= settings.lr_limits[1]:
                added[side] += 1
                return lr
    return None


def paired_interval(a: list, b: list, confidence: float = 0.95) -> dict:
    """Paired differences a[i] - b[i] over the pairs where both are numbers: {"mean", "std", "n", "low", "high"}
    (a two-sided t interval; low/high None below 2 pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval needs equal lengths, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    n = len(diffs)
    out = {"n": n, "mean": statistics.fmean(diffs) if diffs else float("nan"),
           "std": statistics.stdev(diffs) if n > 1 else float("nan"), "low": None, "high": None, "values": diffs}
    if n > 1:
        from scipy import stats
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * out["std"] / math.sqrt(n)
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def mean_std(values) -> dict:
    """{"mean", "std" (sample; 0 for one value), "n", "values"} over the finite values (nan when none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def mean_win_rate(step_metrics: list, until_step=None):
    """Mean SophiaG win rate (the fraction of coordinates not clipped by rho: methods/soul.py) over the steps
    1..until_step of a run's step_metrics (until_step None, a run that never reached matched forget: every
    step); None for a run that logs none (a first-order method). Sophia's authors keep it in 0.1-0.5; near 0
    a "second-order" run is sign descent."""
    rates = [m["win_rate"] for m in step_metrics if m.get("win_rate") is not None
             and (until_step is None or m["step"] <= until_step)]
    return statistics.fmean(rates) if rates else None


def schedule_factor(step: int, settings: CompareSettings) -> float:
    """The protocol's lr schedule (module docstring, 3.) at 0-based `step`."""
    w = settings.warmup_steps
    if w > 0 and step < w:
        return (step + 1) / (w + 1)
    if settings.schedule == "linear":
        horizon = settings.horizon or settings.max_steps
        return max(0.0, (horizon - step) / max(1, horizon - w))
    return 1.0


# ---- one run ----------------------------------------------------------------------------------------------------
def answer_prob(model, tokenizer, examples, max_length: int = 64):
    """Mean length-normalized answer probability, teacher forced (None for no examples)."""
    from ..eval import answer_metrics
    if not examples:
        return None
    return answer_metrics(model, tokenizer, examples, batch_size=64, max_length=max_length,
                          generate=False)["answer_prob"]


def timed_setup(method) -> dict:
    """Wrap method.setup so that its seconds land in the returned dict's "setup_s" (a run's setup and steps are
    reported apart: SIMU's attribution is its setup)."""
    timing, setup = {}, method.setup

    def timed(*args, **kwargs):
        t = time.time()
        setup(*args, **kwargs)
        timing["setup_s"] = time.time() - t
    method.setup = timed
    return timing


def start_scores(task: Task, settings: CompareSettings) -> dict:
    return {k: answer_prob(task.model, task.tokenizer, task.split[k], settings.max_length) for k in CURVE_SPLITS}


def target_of(start: dict, settings: CompareSettings) -> float:
    return settings.target if settings.target is not None else start["holdout"]


def unlearning_run(label: str, lr: float, task: Task, start: dict, settings: CompareSettings, seed: int,
                   budget: int, stop_at: str = "matched", device=None) -> dict:
    """One run of method `label` at `lr` on a copy of task.model (module docstring, 2. and 3.), until the
    matched ("matched") or strict ("strict") point or `budget` steps. Returns {"curve" (evaluated points),
    "matched" (read_at_target), "strict_step", "steps", "setup_s", "steps_s", "win_rate_matched",
    "model_at_matched" (a state dict on the CPU, or None)}."""
    from .. import Unlearner
    from ..data import make_loader, tokenize_examples
    from ..methods import make_method

    recipe, args = recipe_of(label, settings)
    model = copy.deepcopy(task.model)
    if device is not None:
        model.to(device)
    tok, length = task.tokenizer, settings.max_length
    method = make_method(recipe, lr=lr, **args)
    method.lr_factor = lambda step, total: schedule_factor(step, settings)
    forget = make_loader(tokenize_examples(task.split["forget"], tok, length), settings.batch_size, shuffle=True,
                         seed=seed, pad_token_id=tok.pad_token_id)
    retain = (make_loader(tokenize_examples(task.split["retain"], tok, length), settings.batch_size, shuffle=True,
                          seed=seed + 1, pad_token_id=tok.pad_token_id) if method.uses_retain else None)
    target = target_of(start, settings)
    strict = settings.strict_fraction * target
    stop_level = target if stop_at == "matched" else strict
    curve, kept, state = [], {}, {"last": start["forget"], "step": 0}
    timing = timed_setup(method)

    def score(m, step):
        point = {k: answer_prob(m, tok, task.split[k], length) for k in CURVE_SPLITS}
        state["last"] = point["forget"]
        curve.append({"step": step, **point})
        if "matched" not in kept and point["forget"] <= target:
            kept["matched"] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
        return point

    def evaluate(m):  # called every step: scores every eval_every steps, and every step near the target
        state["step"] += 1
        if state["step"] % settings.eval_every == 0 or state["last"] <= settings.near_factor * target:
            return score(m, state["step"])
        return {}

    t0 = time.time()
    result = Unlearner(model, method, forget, retain, max_steps=budget, eval_fn=evaluate, eval_every=1,
                       stop_when=lambda s: bool(s) and s["forget"] <= stop_level, seed=seed, progress=False).run()
    total = time.time() - t0
    if not curve or curve[-1]["step"] != result["step"]:  # the last step is always read
        with torch.no_grad():
            score(model.eval(), int(result["step"]))
    matched = read_at_target(curve, start, target)
    strict_point = next((p for p in curve if p["forget"] <= strict), None)
    return {"label": label, "recipe": recipe, "lr": lr, "seed": seed, "budget": budget, "target": target,
            "curve": curve, "matched": matched, "strict_step": strict_point and strict_point["step"],
            "strict": strict_point, "steps": int(result["step"]), "setup_s": round(timing.get("setup_s", 0.0), 2),
            "steps_s": round(total - timing.get("setup_s", 0.0), 2), "final_forget": curve[-1]["forget"],
            "win_rate_matched": mean_win_rate(result.get("step_metrics", []), matched["step"]),
            "model_at_matched": kept.get("matched")}


def default_measure(model, original, task: Task, seed: int, settings: CompareSettings) -> dict:
    """What compare reads at a matched checkpoint beside the curve's answer probabilities: the answer probability
    of every other split (paraphrases), forget / retain ROUGE-L (greedy), the loss MIA's AUC (forget against
    holdout) and harmful relearning (10% of the forget rows, 30 AdamW steps at 3e-4, scored on the rest)."""
    from ..eval import answer_metrics, mia_report, relearning_attack
    length, tok = settings.max_length, task.tokenizer
    out = {k: answer_prob(model, tok, rows, length) for k, rows in task.split.items() if k not in CURVE_SPLITS}
    for name in ("forget", "retain"):
        out[f"{name}_rougeL"] = answer_metrics(model, tok, task.split[name][:64], batch_size=32,
                                               max_length=length)["rougeL_recall"]
    out["mia_auc"] = mia_report(model, tok, task.split["forget"], task.split["holdout"], attacks=["loss"],
                                max_length=length)["loss"]["auc"]
    if len(task.split["forget"]) >= 4:
        out["relearn_harmful_0.1"] = relearning_attack(model, tok, task.split["forget"], kind="harmful", fraction=0.1,
                                                       seed=seed, max_length=length, lr=3e-4, steps=30, eval_every=10,
                                                       metric="answer_prob", batch_size=4)["max"]
    return out


# ---- the run cache and the ranks ---------------------------------------------------------------------------------
def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunCache:
    """Finished runs as JSON files in `directory`, one per key, written atomically."""

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}.json")

    def get(self, key: str):
        try:
            with open(self.path(key)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a file from a writer killed mid-write cannot exist (atomic); anything else reruns

    def put(self, key: str, value: dict) -> None:
        write_atomic(self.path(key), json.dumps(value, allow_nan=True, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def rank_and_world() -> tuple:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_device():
    """cuda:LOCAL_RANK on a GPU machine, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


class Progress:
    """One line per finished run, a bar on a terminal, and the time left from the runs' mean duration."""

    def __init__(self, log, rank: int, world: int):
        self.log, self.rank, self.world = log, rank, world
        self.done = self.total = self.cached = 0
        self.seconds: list = []
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=0, desc="compare", unit="run", leave=False)

    def add(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def finished(self, text: str, seconds: Optional[float]) -> None:
        self.done += 1
        if seconds is not None:
            self.seconds.append(seconds)
        left = ""
        if self.seconds and self.total > self.done:
            eta = statistics.fmean(self.seconds) * (self.total - self.done) / self.world
            left = f"; about {eta / 60:.1f} min left" if eta >= 60 else f"; about {eta:.0f} s left"
        prefix = f"[{self.done}/{self.total}]" + (f" rank {self.rank}" if self.world > 1 else "")
        if self.bar is not None:
            self.bar.write(f"{prefix} {text}{left}", file=sys.stderr)  # above the bar, not through it
            self.bar.update(1)
        else:
            self.log(f"{prefix} {text}{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_jobs(jobs: list, work: Callable, cache: RunCache, progress: Progress, rank: int, world: int,
             poll_s: float = 1.0, log=print, counted: bool = False) -> dict:
    """{key: result} of every job (key, description): the cached ones read, this rank's share of the others run
    (work(key)) and cached, then the other ranks' waited for. counted: the progress total already holds them."""
    if not counted:
        progress.add(len(jobs))
    out = {}
    for i, (key, text) in enumerate(jobs):
        cached = cache.get(key)
        if cached is not None:
            out[key] = cached
            progress.cached += 1
            progress.finished(f"{text}: cached, {describe(cached)}", None)
        elif i % world == rank:
            t = time.time()
            out[key] = work(key)
            cache.put(key, out[key])
            progress.finished(f"{text}: {describe(out[key])} ({time.time() - t:.0f} s)", time.time() - t)
    waited = time.time()
    for key, text in jobs:
        while key not in out:
            cached = cache.get(key)
            if cached is not None:
                out[key] = cached
                progress.finished(f"{text}: {describe(cached)} (another rank)", None)
                break
            if time.time() - waited > 600:
                log(f"rank {rank}: still waiting for {text} (another rank runs it)")
                waited = time.time()
            time.sleep(poll_s)
    return out


def describe(result: dict) -> str:
    if result.get("error"):
        return f"FAILED: {result['error']}"
    m = result["matched"]
    if not m["reached"]:
        return f"matched forget not reached in {result['steps']} steps (forget {result['final_forget']:.3f})"
    return (f"matched at step {m['step']}, retain at target {m['at_target']['retain']:.3f}")


# ---- the comparison ----------------------------------------------------------------------------------------------
def compare(tasks: Callable[[int], Task], settings: CompareSettings, out_dir: str, measure: Optional[Callable] = None,
            log=print) -> Optional[dict]:
    """The comparison (module docstring) on tasks(seed) -> Task. measure(model, original, task, seed, settings) ->
    {name: value}: what to read at each reported run's matched checkpoint (default_measure); its `version`
    attribute, when set, keys the reported runs only, so adding a measure keeps the validation runs cached.
    Returns the report on rank 0 (None on the others); writing it is the caller's (compare_report.write)."""
    measure = measure or default_measure
    rank, world = rank_and_world()
    device = run_device()
    cache = RunCache(os.path.join(out_dir, "runs"))
    progress = Progress(log, rank, world)
    progress.add(len(settings.methods) * len(settings.seeds))  # the reported runs, so the time left counts them
    t_start = time.time()
    starts, task_cache, task_keys = {}, {}, {}

    def task_of(seed):
        if seed not in task_cache:
            task_cache.clear()  # one seed's model in memory at a time
            task_cache[seed] = tasks(seed)
            task_keys[seed] = task_cache[seed].key
        return task_cache[seed]

    def key_of(seed):
        return task_keys[seed] if seed in task_keys else task_of(seed).key

    def start_of(seed):
        if seed not in starts:
            starts[seed] = start_scores(task_of(seed), settings)
        return starts[seed]

    report = {"settings": dataclasses.asdict(settings), "rule": __doc__, "validation": {}, "chosen_lr": {},
              "runs": {}, "problems": []}
    # 0. something to unlearn on every seed?
    flat = []
    for seed in list(settings.validation_seeds) + list(settings.seeds):
        start = start_of(seed)
        if start["forget"] <= target_of(start, settings):
            flat.append(seed)
    if flat:
        start = start_of(flat[0])
        report["problems"].append(
            f"seed{'s' if len(flat) > 1 else ''} {', '.join(map(str, flat))}: the forget set's answer probability "
            f"({start['forget']:.4f}) is already at or below the target ({target_of(start, settings):.4f}"
            f"{', the holdout level' if settings.target is None else ''}): nothing to unlearn (the model does not "
            "know the forget set better than never-seen items; give --target, or a model trained on the forget set)")
    report["start"] = {str(s): starts[s] for s in starts}
    if report["problems"]:
        progress.close()
        return report if rank == 0 else None

    def job_key(label, lr, seed, budget, phase):
        recipe, args = recipe_of(label, settings)
        key = {"task": key_of(seed), "label": label, "recipe": recipe, "args": args, "lr": lr, "seed": seed,
               "budget": budget, "phase": phase, "settings": settings.run_fields(),
               "measure": getattr(measure, "__qualname__", str(measure))}
        if phase == "reported" and getattr(measure, "version", None) is not None:
            key["measure_version"] = measure.version  # new measures rerun the reported runs, not the validation
        return _key(key)

    specs = {}

    def work(key):
        label, lr, seed, budget, phase = specs[key]
        task, start = task_of(seed), start_of(seed)
        try:
            r = unlearning_run(label, lr, task, start, settings, seed, budget,
                               stop_at="matched" if phase == "validation" else "strict", device=device)
        except (RuntimeError, ValueError, ArithmeticError) as e:
            kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
            return {"label": label, "lr": lr, "seed": seed, "phase": phase, "error": f"{kind}: {str(e).splitlines()[0]}"}
        state = r.pop("model_at_matched")
        if phase == "reported" and state is not None:
            model = copy.deepcopy(task.model)
            model.load_state_dict(state)
            model.to(device).eval()
            try:
                r["measures"] = measure(model, task.model, task, seed, settings)
            except (RuntimeError, ValueError, ArithmeticError) as e:  # the run stands; its measures are missing
                r["measures"], r["measure_error"] = {}, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        r["phase"] = phase
        return r

    def jobs_for(runs):
        jobs = []
        for label, lr, seed, budget, phase in runs:
            key = job_key(label, lr, seed, budget, phase)
            specs[key] = (label, lr, seed, budget, phase)
            jobs.append((key, f"{label} lr {lr:.0e} seed {seed} ({phase})"))
        return jobs

    # 1. the lr rule on the validation seeds, the grid growing while a choice sits at its edge
    grids = {label: sorted(settings.lr_grid) for label in settings.methods}
    added = {label: {"down": 0, "up": 0} for label in settings.methods}
    pending = {label: list(grids[label]) for label in settings.methods}
    rows = {label: {} for label in settings.methods}
    while any(pending.values()):
        wanted = [(label, lr, s, settings.max_steps, "validation") for s in settings.validation_seeds
                  for label in settings.methods for lr in pending[label]]  # by seed: one Task in memory at a time
        results = run_jobs(jobs_for(wanted), work, cache, progress, rank, world, log=log)
        for label, lr, s, budget, phase in wanted:
            r = results[job_key(label, lr, s, budget, phase)]
            rows[label].setdefault(lr, []).append(_validation_row(r, start_of(s)))
        pending = {label: [] for label in settings.methods}
        for label in settings.methods:
            lr, reason = choose_lr(rows[label], len(settings.validation_seeds))
            more = grid_extension(grids[label], lr, settings, added[label])
            if more is not None:
                grids[label].append(more)
                grids[label].sort()
                pending[label].append(more)
            report["chosen_lr"][label] = {"lr": lr, "reason": reason, "grid": list(grids[label]),
                                          "at_edge": lr in (min(grids[label]), max(grids[label]))}
    for label in settings.methods:
        report["validation"][label] = [{"lr": lr, "seeds": list(settings.validation_seeds), "runs": rows[label][lr]}
                                       for lr in sorted(rows[label])]
        if not any(r["reached"] for runs in rows[label].values() for r in runs):
            report["problems"].append(
                f"{label} never reached matched forget on any lr of {', '.join(f'{x:.0e}' for x in grids[label])} "
                f"within {settings.max_steps} steps on the validation seeds: its row compares nothing (raise "
                "--max-steps or widen the grid)")

    # 2. the budget, then every method at its lr on every seed
    slowest = [statistics.fmean(r["step"] for r in rows[label][report["chosen_lr"][label]["lr"]] if r["reached"])
               for label in settings.methods if any(r["reached"] for r in rows[label][report["chosen_lr"][label]["lr"]])]
    budget = max(settings.max_steps, math.ceil(settings.budget_factor * max(slowest))) if slowest else settings.max_steps
    report["budget"] = {"steps": budget, "slowest_validation_steps": max(slowest) if slowest else None}
    wanted = [(label, report["chosen_lr"][label]["lr"], s, budget, "reported") for s in settings.seeds
              for label in settings.methods]
    results = run_jobs(jobs_for(wanted), work, cache, progress, rank, world, log=log, counted=True)
    progress.close()
    if rank != 0:
        return None
    for label, lr, s, b, phase in wanted:
        r = dict(results[job_key(label, lr, s, b, phase)])
        r["start"] = start_of(s)
        report["runs"].setdefault(label, []).append(r)
    report["summary"] = summarize(report, settings)
    report["wall_seconds"] = round(time.time() - t_start, 1)
    report["cached_runs"] = progress.cached
    report["run_seconds"] = round(sum(r["seconds"] or 0 for rows_ in rows.values() for runs in rows_.values()
                                      for r in runs) + sum(r.get("setup_s", 0) + r.get("steps_s", 0)
                                                           for runs in report["runs"].values() for r in runs), 1)
    return report


def _validation_row(r: dict, start: dict) -> dict:
    if r.get("error"):
        return {"reached": False, "step": None, "retain_at_target": None, "final_forget": start["forget"],
                "error": r["error"], "seconds": None}
    m = r["matched"]
    return {"reached": m["reached"], "step": m["step"], "retain_at_target": m["at_target"]["retain"] if m["reached"] else None,
            "holdout_at_target": m["at_target"]["holdout"] if m["reached"] else None, "final_forget": r["final_forget"],
            "seconds": r["setup_s"] + r["steps_s"]}


def value_of(run: dict, key: str):
    """A reported run's number `key` at matched forget (None: the run did not reach it, or failed)."""
    if run.get("error") or not run["matched"]["reached"]:
        return None
    m = run["matched"]
    if key == "steps":
        return m["step"]
    if key in ("setup_s", "steps_s", "win_rate_matched"):
        return run.get(key)
    if key.endswith("@target"):
        return m["at_target"].get(key[:-len("@target")])
    if key in m:
        return m[key]
    return run.get("measures", {}).get(key)


def summarize(report: dict, settings: CompareSettings) -> dict:
    """Per method: mean_std of every number at matched forget over the seeds that reached it, and the count;
    per pair of methods (settings.pairs): paired intervals of retain and holdout at target, the retain
    paraphrase and harmful relearning."""
    keys = set()
    for runs in report["runs"].values():
        for r in runs:
            if not r.get("error") and r["matched"]["reached"]:  # the numbers (a workload's nested tables stay out)
                keys |= {k for k, v in r.get("measures", {}).items() if isinstance(v, (int, float)) or v is None}
    keys = ["steps", "forget", "retain@target", "holdout@target", "retain", "holdout"] + sorted(keys) + [
        "win_rate_matched", "setup_s", "steps_s"]
    out = {"matched": {}, "pairs": [], "keys": keys}
    for label, runs in report["runs"].items():
        stats = {k: mean_std([value_of(r, k) for r in runs]) for k in keys}
        stats["reached"] = sum(value_of(r, "steps") is not None for r in runs)
        stats["failed"] = [r["error"] for r in runs if r.get("error")]
        stats["strict_reached"] = sum(bool(r.get("strict_step")) for r in runs if not r.get("error"))
        out["matched"][label] = stats
    labels = list(report["runs"])
    pairs = settings.pairs or tuple((labels[0], b) for b in labels[1:])
    for a, b in pairs:
        if a in report["runs"] and b in report["runs"]:
            for metric in ("retain@target", "holdout@target") + tuple(
                    k for k in ("retain_paraphrase", "relearn_harmful_0.1") if k in keys):
                diff = paired_interval([value_of(r, metric) for r in report["runs"][a]],
                                       [value_of(r, metric) for r in report["runs"][b]], settings.confidence)
                out["pairs"].append({"a": a, "b": b, "metric": metric, **diff})
    return out
