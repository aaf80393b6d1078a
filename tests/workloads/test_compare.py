"""The fair comparison's rules (simu_fast/workloads/compare.py): reading at the exact target, the half-decade grid
and its extension at an edge, the lr rule over validation seeds, the paired interval, the schedule, the budget,
resume after a killed compare and reuse with more seeds, and the problems it reports instead of crashing. The
engine runs here on stand-in runs (a function of lr and seed), so each rule is checked exactly and fast; the
command on a real tiny model is in tests/test_cli_compare.py."""
import json
import math

import pytest
import torch

from simu_fast.workloads import compare as C


def test_read_at_target_interpolates_between_the_last_point_above_and_the_first_at_or_below():
    start = {"forget": 0.9, "retain": 0.8, "holdout": 0.3}
    curve = [{"step": 5, "forget": 0.5, "retain": 0.7, "holdout": 0.3},
             {"step": 6, "forget": 0.3, "retain": 0.6, "holdout": 0.2},
             {"step": 7, "forget": 0.1, "retain": 0.5, "holdout": 0.1}]
    m = C.read_at_target(curve, start, 0.2)
    assert m["reached"] and m["step"] == 7 and m["retain"] == 0.5
    # half way from forget 0.3 to 0.1: retain half way from 0.6 to 0.5
    assert m["at_target"]["forget"] == pytest.approx(0.2)
    assert m["at_target"]["retain"] == pytest.approx(0.55)
    assert m["at_target"]["holdout"] == pytest.approx(0.15)
    # a target hit exactly is read there; the first point below the target is interpolated from the start
    assert C.read_at_target(curve, start, 0.3)["at_target"]["retain"] == pytest.approx(0.6)
    first = C.read_at_target(curve, start, 0.7)
    assert first["step"] == 5 and first["at_target"]["retain"] == pytest.approx(0.75)
    never = C.read_at_target(curve, start, 0.05)
    assert not never["reached"] and never["step"] is None and never["at_target"] is None and never["forget"] == 0.1


def test_half_decades_and_the_grid_extension():
    assert [C.half_decade(x, True) for x in (1e-5, 3e-5, 1e-3, 3e-3)] == [3e-5, 1e-4, 3e-3, 1e-2]
    assert [C.half_decade(x, False) for x in (1e-5, 3e-5, 3e-6)] == [3e-6, 1e-5, 1e-6]
    assert list(C.HALF_DECADES) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    s = C.CompareSettings(extend_grid=1, lr_limits=(1e-7, 1e-2))
    added = {"down": 0, "up": 0}
    assert C.grid_extension([1e-4, 1e-3], 1e-3, s, added) == 3e-3 and added == {"down": 0, "up": 1}
    assert C.grid_extension([1e-4, 1e-3, 3e-3], 3e-3, s, added) is None  # one extension a side
    assert C.grid_extension([1e-4, 1e-3], 1e-4, s, added) == 3e-5
    assert C.grid_extension([1e-4, 3e-4, 1e-3], 3e-4, s, {"down": 0, "up": 0}) is None  # inside: nothing to add
    assert C.grid_extension([3e-3, 1e-2], 1e-2, C.CompareSettings(lr_limits=(1e-7, 1e-2)), {"down": 0, "up": 0}) is None


def test_the_lr_rule_over_validation_seeds():
    def seeds(*retains):  # None: that seed did not reach matched forget
        return [{"reached": r is not None, "retain_at_target": r, "final_forget": 0.1 if r else 0.4} for r in retains]

    rows = {1e-4: seeds(0.9, None, 0.9), 3e-4: seeds(0.7, 0.7, 0.8), 1e-3: seeds(0.6, 0.6, 0.6)}
    lr, reason = C.choose_lr(rows, 3)  # 1e-4 has the best retain but failed one seed: not eligible
    assert lr == 3e-4 and "every validation seed" in reason
    rows = {1e-4: seeds(0.9, None, None), 3e-4: seeds(0.7, 0.8, None), 1e-3: seeds(0.8, 0.8, None)}
    lr, reason = C.choose_lr(rows, 3)  # the most seeds reached (2), then retain, ties to the lower lr
    assert lr == 1e-3 and "on 2" in reason
    assert C.choose_lr({1e-4: seeds(0.5, 0.5, 0.5), 3e-4: seeds(0.5, 0.5, 0.5)}, 3)[0] == 1e-4
    none = {1e-4: [{"reached": False, "retain_at_target": None, "final_forget": 0.5}] * 3,
            1e-3: [{"reached": False, "retain_at_target": None, "final_forget": 0.2}] * 3}
    assert C.choose_lr(none, 3) == (1e-3, "no lr reached matched forget on any validation seed: lowest mean final forget")


def test_paired_interval_is_the_t_interval():
    d = C.paired_interval([0.9, 0.8, 0.7, None], [0.8, 0.6, 0.4, 0.5])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.2) and d["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (d["low"], d["high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert C.paired_interval([0.9], [0.8])["low"] is None
    with pytest.raises(ValueError, match="equal lengths"):
        C.paired_interval([1.0], [1.0, 2.0])


def test_schedule_is_the_same_for_every_run_and_does_not_depend_on_the_budget():
    s = C.CompareSettings(warmup_steps=4)
    assert [C.schedule_factor(k, s) for k in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    lin = C.CompareSettings(warmup_steps=0, schedule="linear", horizon=100, max_steps=50)
    assert C.schedule_factor(0, lin) == 1.0 and C.schedule_factor(50, lin) == 0.5 and C.schedule_factor(150, lin) == 0.0


def test_settings_refuse_a_validation_seed_that_is_reported():
    with pytest.raises(ValueError, match="also reported seeds"):
        C.CompareSettings(seeds=(0, 1, 100))
    with pytest.raises(ValueError, match="schedule"):
        C.CompareSettings(schedule="cosine")


# ---- the engine on stand-in runs --------------------------------------------------------------------------------
START = {"forget": 0.9, "retain": 0.8, "holdout": 0.1}


def stand_in(best_lr: dict, calls: list, fail: dict | None = None):
    """A run whose matched step falls as lr grows (reaching the target at all from 1e-4 up) and whose retain at
    target peaks at best_lr[method] (a log-scale tent); `calls` logs every (label, lr, seed, budget)."""
    def run(label, lr, task, start, settings, seed, budget, stop_at="matched", device=None):
        calls.append((label, lr, seed, budget))
        if fail and (label, lr) in fail:
            raise fail[(label, lr)]
        if lr < 1e-4 - 1e-12:
            curve = [{"step": budget, "forget": 0.5, "retain": 0.8, "holdout": 0.1}]
        else:
            steps = max(2, int(round(20 * 1e-4 / lr)) + seed % 3)
            retain = 0.8 - 0.1 * abs(math.log10(lr / best_lr[label])) - 0.001 * (seed % 5)
            curve = [{"step": steps - 1, "forget": 0.15, "retain": retain + 0.02, "holdout": 0.1},
                     {"step": steps, "forget": 0.05, "retain": retain - 0.02, "holdout": 0.08}]
        matched = C.read_at_target(curve, start, C.target_of(start, settings))
        return {"label": label, "recipe": label, "lr": lr, "seed": seed, "budget": budget, "target": 0.1,
                "curve": curve, "matched": matched, "strict_step": None, "strict": None, "steps": curve[-1]["step"],
                "setup_s": 0.0, "steps_s": 0.1, "final_forget": curve[-1]["forget"], "win_rate_matched": None,
                "model_at_matched": {k: v.detach().clone() for k, v in task.model.state_dict().items()}
                if matched["reached"] else None}
    return run


@pytest.fixture
def engine(monkeypatch):
    calls = []
    monkeypatch.setattr(C, "start_scores", lambda task, settings: dict(START))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def use(best_lr, fail=None):
        monkeypatch.setattr(C, "unlearning_run", stand_in(best_lr, calls, fail))
        return calls
    return use


def task(seed):
    return C.Task(model=torch.nn.Linear(1, 1), tokenizer=None, split={}, key="stand-in")


def settings(**kw):
    base = dict(methods=("a", "b"), lr_grid=(1e-4, 3e-4, 1e-3), validation_seeds=(100, 101, 102), seeds=(0, 1, 2),
                max_steps=40)
    base.update(kw)
    return C.CompareSettings(**base)


def test_the_grid_grows_while_the_choice_sits_at_its_edge(engine, tmp_path):
    engine({"a": 3e-4, "b": 1e-2})
    s = settings(extend_grid=3)
    report = C.compare(task, s, str(tmp_path), measure=lambda *a: {}, log=lambda line: None)
    assert report["chosen_lr"]["a"]["lr"] == 3e-4 and report["chosen_lr"]["a"]["grid"] == [1e-4, 3e-4, 1e-3]
    b = report["chosen_lr"]["b"]
    assert b["lr"] == 1e-2 and b["grid"] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2] and not b["at_edge"]
    assert [row["lr"] for row in report["validation"]["b"]] == b["grid"]
    assert all(len(row["runs"]) == 3 for row in report["validation"]["b"])


def test_budget_is_a_multiple_of_the_slowest_chosen_lr_and_every_method_gets_it(engine, tmp_path):
    calls = engine({"a": 1e-4, "b": 1e-3})
    s = settings(max_steps=10, budget_factor=3.0, extend_grid=0)
    report = C.compare(task, s, str(tmp_path), measure=lambda *a: {}, log=lambda line: None)
    # a's lr 1e-4 reaches matched forget at step 20 + seed % 3 on the validation seeds 100-102: mean 21
    assert report["budget"] == {"steps": 63, "slowest_validation_steps": 21.0}
    reported = [c for c in calls if c[2] in s.seeds]
    assert {c[3] for c in reported} == {63} and len(reported) == 6


def test_a_killed_compare_resumes_and_more_seeds_reuse_the_runs(engine, tmp_path):
    calls = engine({"a": 3e-4, "b": 3e-4})
    full = C.compare(task, settings(), str(tmp_path / "once"), measure=lambda *a: {}, log=lambda line: None)
    n_runs = len(calls)
    calls.clear()
    engine({"a": 3e-4, "b": 3e-4}, fail={("b", 1e-3): KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        C.compare(task, settings(), str(tmp_path / "killed"), measure=lambda *a: {}, log=lambda line: None)
    done_before_kill = len(calls) - 1
    calls.clear()
    engine({"a": 3e-4, "b": 3e-4})
    resumed = C.compare(task, settings(), str(tmp_path / "killed"), measure=lambda *a: {}, log=lambda line: None)
    assert len(calls) == n_runs - done_before_kill  # only what the killed compare had not finished
    assert json.dumps(resumed["summary"], sort_keys=True) == json.dumps(full["summary"], sort_keys=True)
    assert resumed["chosen_lr"] == full["chosen_lr"]
    calls.clear()
    more = C.compare(task, settings(seeds=(0, 1, 2, 3)), str(tmp_path / "killed"), measure=lambda *a: {},
                     log=lambda line: None)
    assert sorted({c[2] for c in calls}) == [3] and len(calls) == 2  # seed 3's two runs, nothing else
    assert more["summary"]["matched"]["a"]["reached"] == 4


def test_problems_are_reported_not_raised(engine, tmp_path, monkeypatch):
    engine({"a": 3e-4, "b": 3e-4}, fail={("b", lr): torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")
                                         for lr in (1e-4, 3e-4, 1e-3)})
    report = C.compare(task, settings(lr_grid=(3e-5, 1e-4, 3e-4, 1e-3), extend_grid=0), str(tmp_path),
                       measure=lambda *a: {}, log=lambda line: None)
    assert any(p.startswith("b never reached matched forget") for p in report["problems"])
    errors = [r.get("error") for rows in report["validation"]["b"] for r in rows["runs"]]
    assert any(e and e.startswith("out of memory") for e in errors)
    assert report["summary"]["matched"]["a"]["reached"] == 3
    # nothing to unlearn: the forget set already at the holdout level
    monkeypatch.setattr(C, "start_scores", lambda t, s: {"forget": 0.1, "retain": 0.8, "holdout": 0.2})
    report = C.compare(task, settings(), str(tmp_path / "flat"), measure=lambda *a: {}, log=lambda line: None)
    assert "summary" not in report and "nothing to unlearn" in report["problems"][0]


def test_the_report_renders_the_lr_table_the_matched_table_and_the_intervals(engine, tmp_path):
    from simu_fast.workloads import compare_report
    engine({"a": 3e-4, "b": 1e-3})
    report = C.compare(task, settings(extend_grid=0), str(tmp_path), measure=lambda *a: {"mia_auc": 0.5},
                       log=lambda line: None)
    compare_report.write(report, str(tmp_path / "out"), "stand-in data")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## The lr choice" in text and "**0.799 ± 0.001 (3/3)**" in text  # a's chosen lr, its retain at target in bold
    assert "| a | b | retain at target | 3 |" in text and "MIA AUC" in text
    assert (tmp_path / "out" / "lr_curves.png").stat().st_size > 1000


def test_a_new_measure_version_reruns_the_reported_runs_only(engine, tmp_path):
    calls = engine({"a": 3e-4, "b": 3e-4})

    def measure(*args):
        return {"x": 1.0}
    C.compare(task, settings(), str(tmp_path), measure=measure, log=lambda line: None)
    calls.clear()
    measure.version = 2
    report = C.compare(task, settings(), str(tmp_path), measure=measure, log=lambda line: None)
    assert sorted({c[2] for c in calls}) == [0, 1, 2] and len(calls) == 6  # the reported runs, no validation run
    assert report["summary"]["matched"]["a"]["x"]["n"] == 3
