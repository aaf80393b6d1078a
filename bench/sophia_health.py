"""Is the second-order run second-order? (`python -m bench.sophia_health`)

On the quick protocol's model (simu_fast/workloads/protocol.py quick_settings: the fine-tuned model of seed 0,
built and cached as bench/unlearn_protocol.py does), SO-GradDiff and SIMU at the lr the protocol chose for them
(bench/results/protocol-quick/metrics.json) run as the protocol runs them (unlearning_run: eval every 5 steps,
stop at the strict point or the step budget), and per step the bench records:

- win rate: SophiaG's logged fraction of selected coordinates with |m| < rho * bs * h (not clipped), the
  number the recipes report (step_metrics). Sophia's README asks for 0.1-0.5;
- win rate among moving coordinates: the same over coordinates whose m is not 0 (a coordinate that has never
  had a gradient, e.g. the embedding row of a token absent from every batch, has m = 0 and counts as unclipped
  in the logged rate; the official train_sophiag.py counts |m| < rho*bs*h strictly, so it counts them clipped);
- bs and, at each GNB estimate, the sampled-label gradient's norm.

Variants: "before" is the code this change replaced (bs fixed at 5120, the GNB estimate first after step k-1 on
the forget batch only, weight decay on every parameter, round-to-nearest), "after" the recipes' defaults, then
one change at a time and a rho sweep. Also: bf16 SO-GradDiff at the papers' lr 5e-6 for 20 steps on the same
model, with and without stochastic rounding: the fraction of trainable elements that moved, and its
forget/retain NLL against the float32 run.

Writes bench/results/sophia_health/{report.md, metrics.json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from simu_fast.io import write_atomic
from simu_fast.methods import recipes
from simu_fast.methods.baselines import GradDiff, trainable_named
from simu_fast.methods.simu import SIMU
from simu_fast.methods.soul import SOGradDiff
from simu_fast.optim.gnb_hessian import GNBHessianSchedule
from simu_fast.select.neuron_slices import NeuronSlices
from simu_fast.workloads import protocol as P
from simu_fast.workloads.compare_report import pm_text

from .common import RESULTS_DIR, metadata

BAND = (0.1, 0.5)


# ---- the code before this change, for the before/after rows --------------------------------------------------
class _Before:
    """SO-GradDiff / SIMU as they ran before: rho 0.04, bs fixed at SOUL's 5120 whatever the estimator, the GNB Hessian
    first estimated after step k-1 (then every k steps) on that step's forget batch, one param group (decay on
    everything), round-to-nearest for low-precision parameters."""

    def __init__(self, **kwargs):
        kwargs.setdefault("bs", 5120)
        kwargs.setdefault("rho", 0.04)
        kwargs.setdefault("stochastic_rounding", False)
        super().__init__(**kwargs)

    def loss(self, model, forget_batch, retain_batch=None):
        return GradDiff.loss(self, model, forget_batch, retain_batch)

    def before_step(self, model, optimizer, forget_batch, step):
        self._estimate = None

    def after_step(self, model, optimizer, forget_batch, step):
        if self.hessian == "gnb":
            mask = forget_batch.get("attention_mask")
            GNBHessianSchedule(model, optimizer, every=self.hessian_every, seed=self.seed).maybe_update(
                step, forget_batch["input_ids"], mask)
        super().after_step(model, optimizer, forget_batch, step)


class SOGradDiffBefore(_Before, SOGradDiff):
    name = "so-graddiff-before"

    def make_optimizer(self, model):
        return self._sophia(trainable_named(model))


class SIMUBefore(_Before, SIMU):
    name = "simu-before"

    def make_optimizer(self, model):
        if self.slices is not None:
            self.slices.remove()
        optimizer = self._sophia(list(model.named_parameters()))
        self.slices = NeuronSlices() if self.sparse else None
        self.counts = self.mask.apply_to(optimizer, model, self.neuron_params, self.attention, slices=self.slices)
        if self.slices is not None:
            optimizer.add_param_group({"params": self.slices.named_parameters()})
            self.slices.attach(optimizer)
        return optimizer


recipes.METHODS.setdefault("so-graddiff-before", SOGradDiffBefore)
recipes.METHODS.setdefault("simu-before", SIMUBefore)


# ---- per-step counts beside the logged win rate ---------------------------------------------------------------
class MovingCoordinates:
    """A step post-hook on every SophiaG the recipes make: per step, the official count (|m| < rho * bs * h
    over the selected coordinates) and the same over the coordinates whose m is not 0."""

    def __init__(self):
        self.rows: list[dict] = []
        self._make = None

    @torch.no_grad()
    def __call__(self, opt, args, kwargs):
        official = moving = moving_won = selected = 0
        for index, group in enumerate(opt.param_groups):
            for call in opt._plan(index, group):
                for p, shard, m, h, mask in zip(call.params, call.shards, call.state_tensors["exp_avg"],
                                                call.state_tensors["hessian"], call.masks):
                    sel = mask.element_mask(shard).reshape(m.shape)
                    won = (m.abs() < group["rho"] * group["bs"] * h) & sel
                    live = (m != 0) & sel
                    official += int(won.sum())
                    moving_won += int((won & live).sum())
                    moving += int(live.sum())
                    selected += int(sel.sum())
        self.rows.append({"official": official / max(selected, 1), "moving": moving_won / max(moving, 1),
                          "moving_fraction": moving / max(selected, 1)})

    def install(self):
        from simu_fast.optim.sophia import SophiaG
        hook, original = self, SophiaG.__init__

        def init(opt, *a, **k):
            original(opt, *a, **k)
            opt.register_step_post_hook(hook)
        SophiaG.__init__ = init
        self._make = original
        return self

    def remove(self):
        from simu_fast.optim.sophia import SophiaG
        SophiaG.__init__ = self._make


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def one_run(label, name, lr, args, model, tok, split, target, settings, seed, log) -> dict:
    settings = copy.deepcopy(settings)
    settings.method_args = {name: dict(args)}
    counts = MovingCoordinates().install()
    try:
        start = time.time()
        r = P.unlearning_run(name, lr, model, tok, split, target, settings, seed, keep_models=False)
    finally:
        counts.remove()
    per_step = []
    for metrics, extra in zip(r["step_metrics"], counts.rows):
        per_step.append({**metrics, "win_rate_official": extra["official"], "win_rate_moving": extra["moving"],
                         "moving_fraction": extra["moving_fraction"]})
    rates = [s["win_rate"] for s in per_step if s.get("win_rate") is not None]
    moving = [s["win_rate_moving"] for s in per_step]
    at = next((p for p in r["curve"] if p["step"] == r["matched_step"]), None)
    row = {"label": label, "method": name, "lr": lr, "args": args, "steps": r["steps"],
           "matched_step": r["matched_step"], "retain_at_matched": at["retain"] if at else None,
           "holdout_at_matched": at["holdout"] if at else None,
           "final_forget": r["curve"][-1]["forget"] if r["curve"] else None,
           "win_rate_median": _median(rates), "win_rate_in_band": _in_band(rates),
           "win_rate_matched": r["win_rate_matched"],
           "win_rate_moving_median": _median(moving), "win_rate_moving_in_band": _in_band(moving),
           "win_rate_first_10": rates[:10],
           "bs_median": _median([s.get("bs") for s in per_step]),
           "hessian_grad_norm_median": _median([s.get("hessian_grad_norm") for s in per_step]),
           "setup_s": r["setup_s"], "seconds": round(time.time() - start, 1), "per_step": per_step,
           "curve": r["curve"]}
    log(f"{label:34s} matched at {row['matched_step']}, retain {_fmt(row['retain_at_matched'])}, win rate median "
        f"{_fmt(row['win_rate_median'])} ({_fmt(row['win_rate_in_band'], '{:.0%}')} of steps in 0.1-0.5), moving "
        f"{_fmt(row['win_rate_moving_median'])}, bs {_fmt(row['bs_median'], '{:.0f}')}")
    return row


def _in_band(rates):
    rates = [r for r in rates if r is not None]
    return sum(BAND[0] <= r <= BAND[1] for r in rates) / len(rates) if rates else None


def _fmt(value, fmt="{:.3f}"):
    return "-" if value is None else fmt.format(value)


# ---- bf16 at the papers' lr -------------------------------------------------------------------------------------
def bf16_rows(model, tok, split, settings, steps: int, log) -> list:
    from simu_fast.data import make_loader, tokenize_examples
    from simu_fast.methods import answer_nll, make_method

    def batches(name, seed):
        loader = make_loader(tokenize_examples(split[name], tok, settings.max_length), settings.batch_size,
                             shuffle=True, seed=seed, pad_token_id=tok.pad_token_id)
        return list(loader)

    forget, retain = batches("forget", 0), batches("retain", 1)

    def nll(m, rows):
        exact = copy.deepcopy(m).float().eval()
        with torch.no_grad():
            return statistics.fmean(float(answer_nll(exact, b, "mean").mean()) for b in rows)

    out = []
    for label, dtype, sr in (("fp32", torch.float32, "auto"), ("bf16, round to nearest", torch.bfloat16, False),
                             ("bf16, stochastic rounding (default)", torch.bfloat16, "auto")):
        m = copy.deepcopy(model).to(dtype).train()
        initial = {n: p.detach().clone() for n, p in m.named_parameters()}
        method = make_method("so-graddiff", lr=5e-6, schedule="constant", stochastic_rounding=sr)
        opt = method.make_optimizer(m)
        start = (nll(m, forget), nll(m, retain))
        for step in range(steps):
            f, r = forget[step % len(forget)], retain[step % len(retain)]
            method.loss(m, f, r).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            method.before_step(m, opt, f, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.after_step(m, opt, f, step)
        moved = sum(int((p.detach() != initial[n]).sum()) for n, p in m.named_parameters())
        total = sum(p.numel() for p in m.parameters())
        row = {"label": label, "moved_fraction": moved / total, "forget_nll_change": nll(m, forget) - start[0],
               "retain_nll_change": nll(m, retain) - start[1]}
        out.append(row)
        log(f"{label:36s} moved {row['moved_fraction']:.1%}, forget NLL {row['forget_nll_change']:+.4f}, "
            f"retain NLL {row['retain_nll_change']:+.4f}")
    return out


# ---- bf16 to matched forget ---------------------------------------------------------------------------------------
def bf16_matched_rows(model, tok, split, target, settings, seed, lrs, names, log) -> list:
    """Each method at its lr from the model cast to bf16 (stochastic rounding: the default) and from the float32
    model, run as the protocol runs it: steps to matched forget and the retain / never-seen answer probability there
    (scored in the run's own dtype)."""
    out = []
    for name in names:
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            r = P.unlearning_run(name, lrs[name], copy.deepcopy(model).to(dtype), tok, split, target, settings, seed,
                                 keep_models=False)
            at = next((p for p in r["curve"] if p["step"] == r["matched_step"]), None)
            row = {"method": name, "dtype": label, "lr": lrs[name], "matched_step": r["matched_step"],
                   "retain_at_matched": at["retain"] if at else None, "holdout_at_matched": at["holdout"] if at else None,
                   "win_rate_matched": r["win_rate_matched"], "final_forget": r["curve"][-1]["forget"] if r["curve"] else None}
            out.append(row)
            log(f"{name} {label}: matched at {row['matched_step']}, retain {_fmt(row['retain_at_matched'])}")
    return out


def seed_summary(report: dict) -> dict:
    """{label: {key: mean_std over seeds}} of the rows every seed ran."""
    keys = ("win_rate_median", "win_rate_in_band", "win_rate_matched", "matched_step", "retain_at_matched",
            "holdout_at_matched", "setup_s")
    labels = [r["label"] for r in next(iter(report["by_seed"].values()))["runs"]]
    out = {}
    for label in labels:
        rows = [next((r for r in part["runs"] if r["label"] == label), None) for part in report["by_seed"].values()]
        rows = [r for r in rows if r is not None]
        out[label] = {k: P.mean_std([r[k] for r in rows]) for k in keys}
        out[label]["reached"] = sum(r["matched_step"] is not None for r in rows)
        out[label]["n"] = len(rows)
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Sophia's health on the protocol's model", "",
             f"The quick protocol's fine-tuned models (a {s['num_layers']}-layer Llama, hidden {s['hidden_size']}, MLP "
             f"{s['intermediate_size']}; seeds {', '.join(map(str, report['seeds']))}: the reported seed and the "
             "validation seed the protocol chose its lrs on), each method at the lr the protocol chose "
             f"({', '.join(f'{k} {v:.0e}' for k, v in report['lrs'].items())}), run as the protocol runs it "
             f"(eval every {s['eval_every']} steps, stop at the strict point, at most {s['max_steps']} steps). "
             f"Machine: {report['meta']['device']}, {report['meta']['nproc']} cores, torch {report['meta']['torch']}.",
             "",
             "win rate: the fraction of selected coordinates not clipped by rho (|m| < rho * bs * h), as the recipes "
             "log it; \"moving\": the same over coordinates whose m is not 0 (a coordinate without any gradient yet "
             "counts as unclipped in the logged rate). Band: Sophia's README's 0.1-0.5.", "",
             "Columns: bs (median over steps); the win rate's median over the steps, the share of steps in 0.1-0.5 "
             "and its mean up to matched forget (the protocol's win_rate_matched); the same median and share over "
             "moving coordinates; steps to matched forget and retain / never-seen answer probability there (the "
             "protocol's checkpoints, every 5 steps); the median norm of the GNB estimate's sampled-label gradient."]
    if len(report["by_seed"]) > 1:
        lines += ["", f"## Before / after over seeds {', '.join(report['by_seed'])} (mean ± std)", "",
                  "Steps to matched forget, retain and never-seen there are over the seeds that reached matched forget "
                  "(the reached column); setup: seconds before step 1 (SIMU's attribution and mask; the before rows run "
                  "today's setup, which skips the retain attribution when include_dual=True: that change's effect is "
                  "in bench/results/lume-cost, 10.5 s of setup then, 2.7 s now).", "",
                  "| variant | reached | win rate median | steps in 0.1-0.5 | mean to matched | steps to matched | "
                  "retain at matched | never-seen at matched | setup s |", "|---|---|---|---|---|---|---|---|---|"]
        for label, st in seed_summary(report).items():
            lines.append(f"| {label} | {st['reached']}/{st['n']} | {pm_text(st['win_rate_median'], '{:.3f}')} | "
                         f"{pm_text(st['win_rate_in_band'], '{:.2f}')} | {pm_text(st['win_rate_matched'], '{:.3f}')} | "
                         f"{pm_text(st['matched_step'], '{:.0f}')} | {pm_text(st['retain_at_matched'], '{:.3f}')} | "
                         f"{pm_text(st['holdout_at_matched'], '{:.3f}')} | {pm_text(st['setup_s'], '{:.2f}')} |")
    for seed, part in report["by_seed"].items():
        lines += _seed_table(seed, part)
    if report.get("bf16_matched"):
        lines += ["", "## bf16 to matched forget (the model cast to bf16, the recipes' defaults: stochastic rounding)", "",
                  "Each method at its lr from the same fine-tuned model in float32 and cast to bf16, run as the protocol "
                  "runs it; the scores are the run's own dtype's.", "",
                  "| seed | method | dtype | steps to matched | retain at matched | never-seen at matched | "
                  "win rate to matched | final forget |", "|---|---|---|---|---|---|---|---|"]
        for seed, rows in report["bf16_matched"].items():
            for r in rows:
                lines.append(f"| {seed} | {r['method']} | {r['dtype']} | {_fmt(r['matched_step'], '{:.0f}')} | "
                             f"{_fmt(r['retain_at_matched'])} | {_fmt(r['holdout_at_matched'])} | "
                             f"{_fmt(r['win_rate_matched'])} | {_fmt(r['final_forget'])} |")
    if report.get("bf16"):
        lines += ["", f"## bf16 at the papers' lr (SO-GradDiff, lr 5e-6, constant, {report['bf16_steps']} steps, seed "
                      f"{report['seeds'][0]})", "",
                  "| run | trainable elements moved | forget NLL change | retain NLL change |", "|---|---|---|---|"]
        for r in report["bf16"]:
            lines.append(f"| {r['label']} | {r['moved_fraction']:.1%} | {r['forget_nll_change']:+.4f} | "
                         f"{r['retain_nll_change']:+.4f} |")
    lines += ["", f"Wall time: {report['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _seed_table(seed: str, part: dict) -> list:
    lines = ["", f"## Seed {seed} (matched forget: answer probability <= {part['target']:.3f}, the never-seen level)", "",
             "| variant | bs | win rate median | steps in 0.1-0.5 | mean to matched | moving: median | "
             "moving: in band | steps to matched | retain at matched | never-seen at matched | GNB grad norm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in part["runs"]:
        lines.append(f"| {r['label']} | {_fmt(r['bs_median'], '{:.0f}')} | {_fmt(r['win_rate_median'])} | "
                     f"{_fmt(r['win_rate_in_band'], '{:.0%}')} | {_fmt(r['win_rate_matched'])} | "
                     f"{_fmt(r['win_rate_moving_median'])} | {_fmt(r['win_rate_moving_in_band'], '{:.0%}')} | "
                     f"{_fmt(r['matched_step'], '{:.0f}')} | {_fmt(r['retain_at_matched'])} | "
                     f"{_fmt(r['holdout_at_matched'])} | {_fmt(r['hessian_grad_norm_median'], '{:.3g}')} |")
    lines += ["", "First 10 steps' win rates:", ""]
    for r in part["runs"]:
        lines.append(f"- {r['label']}: " + ", ".join(_fmt(x, "{:.2f}") for x in r["win_rate_first_10"]))
    if part.get("notes"):
        lines += ["", "Reading:", ""] + [f"- {n}" for n in part["notes"]]
    return lines


def variants(name: str, headline: bool = False) -> list:
    """(label, recipe, options) of the rows for `name` (module docstring); headline: before and after only."""
    rho = {"so-graddiff": SOGradDiff().rho, "simu": SIMU().rho}[name]
    if headline:
        return [row for row in variants(name) if row[0].startswith(("before (", "after (defaults"))]
    if name == "so-graddiff":
        return [("before (rho 0.04, bs 5120, one decay group, RTN)", "so-graddiff-before", {}),
                ("after, SOUL's rho 0.04", "so-graddiff", {"rho": 0.04}),
                (f"after (defaults: rho {rho:g})", "so-graddiff", {}),
                ("before, hessian=gnb (bs 5120, first estimate after step 9)", "so-graddiff-before", {"hessian": "gnb"}),
                ("after, hessian=gnb, rho 0.04", "so-graddiff", {"hessian": "gnb", "rho": 0.04}),
                (f"after, hessian=gnb, SIMU's rho {SIMU().rho:g}", "so-graddiff", {"hessian": "gnb", "rho": SIMU().rho})]
    return [("before (rho 0.04, bs 5120, GNB first after step 9 on forget only, one decay group, RTN)",
             "simu-before", {}),
            ("after, rho 0.04", "simu", {"rho": 0.04}),
            (f"after (defaults: rho {rho:g})", "simu", {}),
            ("after, hessian_data=forget", "simu", {"hessian_data": "forget"})]


def notes(runs: list) -> list:
    """What the rows say, computed from them."""
    def row(label_start):
        return next((r for r in runs if r["label"].startswith(label_start)), None)
    out = []
    before, low, after = row("simu: before"), row("simu: after, rho 0.04"), row("simu: after (defaults")
    if before and low and after:
        out.append(f"SIMU: bs is now the GNB estimate's token count (median {low['bs_median']:.0f}) instead of 5120, so "
                   f"rho * bs * h is {5120 / low['bs_median']:.0f}x smaller; at Sophia's rho 0.04 that drops the median win "
                   f"rate from {before['win_rate_median']:.3f} (where the first 10 steps had h = 0: all clipped) to "
                   f"{low['win_rate_median']:.3f}: the run is sign descent. The default rho "
                   f"({after['args'].get('rho', SIMU().rho):g}) puts {after['win_rate_in_band']:.0%} of the steps in 0.1-0.5 "
                   f"(median {after['win_rate_median']:.3f}), matched forget at step {after['matched_step']} "
                   f"(before: {before['matched_step']}), retain there {_fmt(after['retain_at_matched'])} "
                   f"(before: {_fmt(before['retain_at_matched'])}).")
    before, low, after = row("so-graddiff: before (rho"), row("so-graddiff: after, SOUL"), row("so-graddiff: after (defaults")
    if before and low and after:
        out.append(f"SO-GradDiff (squared gradient, bs 5120 as SOUL runs it): at SOUL's rho 0.04 the median win rate is "
                   f"{low['win_rate_median']:.3f} with {low['win_rate_in_band']:.0%} of steps in 0.1-0.5 (the first steps near "
                   f"0: h and m both start at 0); the default rho puts {after['win_rate_in_band']:.0%} in the band (median "
                   f"{after['win_rate_median']:.3f}), matched at step {after['matched_step']} (rho 0.04: "
                   f"{low['matched_step']}), retain {_fmt(after['retain_at_matched'])} (rho 0.04: "
                   f"{_fmt(low['retain_at_matched'])}).")
    moving = [r for r in runs if r["win_rate_moving_median"] is not None and r["win_rate_median"] is not None
              and abs(r["win_rate_moving_median"] - r["win_rate_median"]) > 0.01]
    out.append("Coordinates without a gradient (m = 0) change no row's median by more than 0.01." if not moving else
               "Coordinates without a gradient (m = 0) change the median of: " + ", ".join(r["label"] for r in moving) + ".")
    norms = [r["hessian_grad_norm_median"] for r in runs if r["hessian_grad_norm_median"] is not None]
    if norms:
        out.append(f"The sampled-label gradient's norm at the GNB estimates: median {min(norms):.2f}-{max(norms):.2f} "
                   "over the rows; the official loop would clip it at 1 before update_hessian (h smaller by up to "
                   f"{max(norms) ** 2:.1f}x, the win rate lower still); here it is not clipped.")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sophia_health", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,100", help="comma-separated: the protocol's reported seed 0 and its "
                                                     "validation seed 100 (the split its lrs were chosen on)")
    ap.add_argument("--cache", help="where the protocol's models are cached")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "sophia_health"))
    ap.add_argument("--rho", default="", help="comma-separated rhos to sweep for both methods (after)")
    ap.add_argument("--bf16-steps", type=int, default=20)
    ap.add_argument("--only", help="comma-separated subset of so-graddiff,simu")
    ap.add_argument("--headline", action="store_true", help="only the before and after (defaults) rows")
    ap.add_argument("--bf16-matched", action="store_true", help="also each method from the model cast to bf16 to "
                                                                "matched forget, beside float32, on every seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    settings = P.quick_settings()
    with open(os.path.join(RESULTS_DIR, "protocol-quick", "metrics.json")) as f:
        chosen = json.load(f)["chosen_lr"]
    lrs = {name: chosen[name]["lr"] for name in ("so-graddiff", "simu")}
    names = [n.strip() for n in args.only.split(",")] if args.only else ["so-graddiff", "simu"]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    by_seed, bf16, bf16_matched = {}, [], {}
    for seed in seeds:
        model, tok, _ = P.finetuned_model(settings, seed, args.cache)
        split = P.new_split(settings, seed)
        start = {k: P.answer_prob(model, tok, split[k], settings.max_length) for k in ("forget", "retain", "holdout")}
        target = start["holdout"]
        runs = []
        for name in names:
            for label, recipe, extra in variants(name, args.headline):
                runs.append(one_run(f"{name}: {label}", recipe, lrs[name], extra, model, tok, split, target, settings,
                                    seed, print))
            for rho in [] if args.headline else [float(x) for x in args.rho.split(",") if x]:
                default = {"so-graddiff": SOGradDiff().rho, "simu": SIMU().rho}[name]
                if rho == default or any(r["method"] == name and r["args"] == {"rho": rho} for r in runs):
                    continue
                runs.append(one_run(f"{name}: after, rho {rho:g}", name, lrs[name], {"rho": rho}, model, tok, split,
                                    target, settings, seed, print))
        by_seed[str(seed)] = {"start": start, "target": target, "runs": runs, "notes": notes(runs)}
        if seed == seeds[0] and args.bf16_steps:
            bf16 = bf16_rows(model, tok, split, settings, args.bf16_steps, print)
        if args.bf16_matched:
            bf16_matched[str(seed)] = bf16_matched_rows(model, tok, split, target, settings, seed, lrs, names, print)
    meta = metadata(torch.device("cpu"))
    meta.pop("hostname", None)
    report = {"settings": P.settings_dict(settings), "seeds": seeds, "lrs": lrs, "by_seed": by_seed, "bf16": bf16,
              "bf16_matched": bf16_matched,
              "bf16_steps": args.bf16_steps, "meta": meta, "wall_seconds": round(time.time() - t0, 1)}
    os.makedirs(args.out, exist_ok=True)
    from simu_fast.eval.report import to_jsonable
    write_atomic(os.path.join(args.out, "metrics.json"), json.dumps(to_jsonable(report), indent=1) + "\n")
    text = markdown(report)
    write_atomic(os.path.join(args.out, "report.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
