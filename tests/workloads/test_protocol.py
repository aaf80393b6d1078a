"""The unlearning protocol's pieces (simu_fast/workloads/protocol.py) on tiny inputs: matched-forget selection,
the retain-vs-forget area, the lr rule, seed aggregation and paired differences, the data split, and one
unlearning run end to end on a tiny base."""
import math

import pytest

from simu_fast.workloads import protocol as P


def curve(*points):
    return [{"step": 5 * (i + 1), "forget": f, "retain": r, "holdout": 0.1} for i, (f, r) in enumerate(points)]


def test_matched_index_is_the_first_point_at_or_below_the_target():
    c = curve((0.8, 0.9), (0.4, 0.85), (0.2, 0.8), (0.25, 0.7), (0.1, 0.6))
    assert P.matched_index(c, 0.2) == 15
    assert P.matched_index(c, 0.4) == 10
    assert P.matched_index(c, 0.05) is None
    assert P.matched_index([], 0.5) is None


def test_tradeoff_auc():
    start = {"forget": 1.0, "retain": 1.0}
    # retain kept at 1 all the way to the target: area 1
    assert P.tradeoff_auc(curve((0.5, 1.0), (0.2, 1.0)), start, 0.2) == pytest.approx(1.0)
    # linear fall to 0 at the target: area 1/2
    assert P.tradeoff_auc(curve((0.2, 0.0)), start, 0.2) == pytest.approx(0.5)
    # overshoot below the target is clipped at it; a rise of forget is ignored (running minimum)
    assert P.tradeoff_auc(curve((0.6, 1.0), (0.7, 0.0), (0.0, 1.0)), start, 0.2) == pytest.approx(1.0)
    # never reaching the target: the missing part of the range counts as 0
    assert P.tradeoff_auc(curve((0.6, 1.0)), start, 0.2) == pytest.approx(0.5)
    assert math.isnan(P.tradeoff_auc(curve((0.1, 1.0)), {"forget": 0.1, "retain": 1.0}, 0.2))


def test_choose_lr_rule():
    runs = [{"lr": 1e-5, "matched_step": None, "matched_retain": None, "final_forget": 0.5},
            {"lr": 1e-4, "matched_step": 40, "matched_retain": 0.8, "final_forget": 0.1},
            {"lr": 3e-4, "matched_step": 10, "matched_retain": 0.6, "final_forget": 0.05}]
    assert P.choose_lr(runs, 100) == (1e-4, "highest retain at matched forget (reached within half the budget)")
    # with a budget of 60 the lr that reached matched forget at step 40 has no margin left: it is passed over
    assert P.choose_lr(runs, 60)[0] == 3e-4
    tie = [dict(runs[1]), dict(runs[2], matched_retain=0.8)]
    assert P.choose_lr(tie, 100)[0] == 1e-4  # a tie goes to the smaller lr
    late = [dict(runs[1], matched_step=70), dict(runs[2], matched_step=90), runs[0]]
    assert P.choose_lr(late, 100) == (1e-4, "none within half the budget: the soonest to matched forget")
    none = [dict(r, matched_step=None) for r in runs]
    assert P.choose_lr(none, 100) == (3e-4, "none reached matched forget: lowest final forget")


def test_mean_std_and_paired_difference():
    s = P.mean_std([1.0, 2.0, 3.0, None, float("nan")])
    assert (s["mean"], s["n"]) == (2.0, 3) and s["std"] == pytest.approx(1.0)
    assert P.mean_std([4.0])["std"] == 0.0 and math.isnan(P.mean_std([None])["mean"])
    d = P.paired_difference([0.9, 0.8, None], [0.7, 0.7, 0.5])
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.15) and d["std"] == pytest.approx(math.sqrt(0.005))
    with pytest.raises(ValueError, match="equal lengths"):
        P.paired_difference([1.0], [1.0, 2.0])


def test_new_split_by_seed_and_phrasing():
    settings = P.quick_settings()
    a, b = P.new_split(settings, 0), P.new_split(settings, 1)
    people = {name: {ex.extra["person"] for ex in rows} for name, rows in a.items()}
    assert len(people["forget"]) == settings.forget_people and len(people["holdout"]) == settings.holdout_people
    assert not (people["forget"] & people["retain"]) and not (people["holdout"] & people["retain"])
    assert people["forget"] == people["forget_paraphrase"]
    assert {ex.extra["phrasing"] for ex in a["retain"]} == {0, 1}
    assert {ex.extra["phrasing"] for ex in a["retain_paraphrase"]} == {2}
    assert {ex.extra["person"] for ex in b["forget"]} != people["forget"]  # the seed draws the split
    with pytest.raises(ValueError, match="none to retain"):
        P.new_split(P.quick_settings(forget_people=8, holdout_people=8), 0)


def test_a_tiny_protocol_run_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    settings = P.quick_settings(background_people=6, countries=3, filler=40, new_people=6, forget_people=1,
                                holdout_people=1, vocab_size=400, hidden_size=32, intermediate_size=64,
                                num_layers=2, pretrain_epochs=1, finetune_max_epochs=2, max_steps=6, eval_every=2)
    logs = []
    model, tok, info = P.finetuned_model(settings, 0, str(tmp_path), log=logs.append)
    assert not info["cached"] and {p.name.split("-")[0] for p in tmp_path.iterdir()} == {"base", "finetuned"}
    again = P.finetuned_model(settings, 0, str(tmp_path), log=logs.append)
    assert again[2]["cached"] and any("loaded" in line for line in logs)
    split = P.new_split(settings, 0)
    run = P.unlearning_run("ga", 1e-2, model, tok, split, target=1.0, settings=settings, seed=0)
    # forget is below 1.0 and below the strict 0.5 at the first evaluation: matched, strict, and the run stops
    assert [p["step"] for p in run["curve"]] == [2] and run["curve"][0]["forget"] <= 0.5
    assert run["matched_step"] == run["strict_step"] == 2 and set(run["models"]) == {"matched", "strict", "final"}
    assert run["steps_s"] >= 0 and run["setup_s"] >= 0


def write_lume(directory, per_group: int):
    """LUME-format forget.jsonl / retain.jsonl with per_group items of every (task, kind) group."""
    import json
    directory.mkdir()
    for name in ("forget", "retain"):
        rows = [{"id": f'"{name}-{task}-{i}"{kind}{i}', "input": f"{name} {task} passage {i} " + "word " * 50,
                 "output": f"continuation {i} of {task} " + "more " * 20, "task": task}
                for task in ("Task1", "Task2", "Task3") for kind in ("sc", "qa") for i in range(per_group)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(directory)


def test_lume_split_is_balanced_disjoint_and_apart_from_the_base_corpus(tmp_path):
    settings = P.lume_settings(write_lume(tmp_path / "lume", 12), lume_per_group=2, lume_background_per_group=3)
    corpus = P.background_corpus(settings)
    a, b = P.new_split(settings, 0), P.new_split(settings, 1)
    ids = {name: {ex.id for ex in rows} for name, rows in a.items()}
    assert (len(ids["forget"]), len(ids["holdout"]), len(ids["retain"])) == (12, 12, 24)
    assert not ids["forget"] & ids["holdout"] and all(i.startswith('"forget') for i in ids["forget"] | ids["holdout"])
    base_ids = {ex.id for ex in corpus["facts"]}
    assert len(base_ids) == 18 and all(i.startswith('"retain') for i in base_ids) and not base_ids & ids["retain"]
    assert a["retain_paraphrase"] == [] and {ex.id for ex in b["forget"]} != ids["forget"]  # the seed draws
    assert all(len(ex.prompt.split()) <= settings.prompt_words and len(ex.answer.split()) <= settings.answer_words
               for ex in a["forget"])
    with pytest.raises(FileNotFoundError, match="retain.jsonl"):
        (tmp_path / "lume" / "retain.jsonl").unlink()
        P.new_split(P.lume_settings(str(tmp_path / "lume"), lume_background_per_group=4), 0)
    with pytest.raises(ValueError, match="data_dir"):
        P.new_split(P.ProtocolSettings(workload="lume"), 0)
    with pytest.raises(ValueError, match="ask for fewer"):
        P.new_split(P.lume_settings(write_lume(tmp_path / "small", 3), lume_per_group=2), 0)
