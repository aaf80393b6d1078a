"""`simu-fast demo --export DIR`: the demo's fine-tuned model and its data in TOFU's and MUSE's layouts, and the
printed `simu-fast eval` command, run as printed, measuring every metric; the perturbed answers it writes (never
the true answer, the same attribute, deterministic); an --export that is not new or empty refused."""
import contextlib
import io
import json
import shlex

import pytest

import simu_fast.workloads.demo as demo
import simu_fast.workloads.protocol as protocol
from simu_fast.cli import main
from simu_fast.data import load_examples, load_muse
from simu_fast.data.synthetic_people import _FAVOURITES, _PROFESSIONS, paraphrased_people, people_tofu_rows
from simu_fast.data.synthetic_world import _DISHES, world_facts, world_tofu_rows

_ORIGINAL = demo.demo_settings
# small, yet trained enough that every one of model utility's nine scores is above 0 (world facts included)
SMALL = dict(background_people=6, countries=5, filler=20, new_people=6, forget_people=1, holdout_people=1,
             vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2, pretrain_epochs=20,
             pretrain_lr=1e-2, finetune_max_epochs=20)
SPLITS = ("forget", "retain", "holdout")


def swapped_value(correct: str, value: str, wrong: str):
    """X where `wrong` is `correct` with one occurrence of `value` replaced by X (None when it is not)."""
    start = correct.find(value)
    while start >= 0:
        prefix, suffix = correct[:start], correct[start + len(value):]
        if wrong.startswith(prefix) and wrong.endswith(suffix) and len(wrong) > len(prefix) + len(suffix):
            return wrong[len(prefix):len(wrong) - len(suffix)]
        start = correct.find(value, start + 1)
    return None


# ---------------------------------------------------------------------------------------------- perturbed answers

def test_people_perturbed_answers_are_wrong_values_of_the_same_attribute():
    people = [ex for person in paraphrased_people(12, seed=4) for ex in person if ex.extra["phrasing"] == 0]
    pool = {fact: {ex.extra["value"] for ex in people if ex.extra["fact"] == fact}
            for fact in ("birthplace", "relation")}
    for paraphrase in (True, False):
        rows = people_tofu_rows(people, n_perturbed=5, seed=3, paraphrase=paraphrase)
        assert [(r.prompt, r.answer, r.id) for r in rows] == [(ex.prompt, ex.answer, ex.id) for ex in people]
        for row in rows:
            fact, value = row.extra["fact"], row.extra["value"]
            correct = row.extra["paraphrased_answer"] if paraphrase else row.answer
            if paraphrase:
                assert correct != row.answer and swapped_value(correct, value, correct) is not None
            else:
                assert "paraphrased_answer" not in row.extra
            wrong = row.extra["perturbed_answer"]
            assert 1 <= len(wrong) <= 5 and len(set(wrong)) == len(wrong)
            assert len(wrong) == 5 or fact == "favourite"  # a season has 3 others only
            for answer in wrong:
                assert answer not in (row.answer, correct)
                other = swapped_value(correct, value, answer)
                assert other is not None and other != value, (correct, answer)
                if fact == "birth_year":
                    assert 1921 <= int(other) <= 1999
                elif fact == "profession":
                    assert other.split(" ", 1)[1] in _PROFESSIONS
                elif fact == "favourite":
                    assert other in _FAVOURITES[row.extra["category"]]
                else:  # birthplace, relation: another person's value of that fact
                    assert other in pool[fact]
    again = people_tofu_rows(people, n_perturbed=5, seed=3)
    assert again == people_tofu_rows(people, n_perturbed=5, seed=3)
    assert again != people_tofu_rows(people, n_perturbed=5, seed=4)


def test_world_perturbed_answers_are_other_countries_values():
    facts = world_facts(6, seed=2)
    rows = world_tofu_rows(facts, n_perturbed=3, seed=0)
    assert rows == world_tofu_rows(facts, n_perturbed=3, seed=0) != world_tofu_rows(facts, n_perturbed=3, seed=1)
    for row in rows:
        fact, value = row.extra["fact"], row.extra["value"]
        space = set(_DISHES) if fact == "dish" else {ex.extra["value"] for ex in facts if ex.extra["fact"] == fact}
        assert "paraphrased_answer" not in row.extra and len(row.extra["perturbed_answer"]) == 3
        for answer in row.extra["perturbed_answer"]:
            other = swapped_value(row.answer, value, answer)
            assert answer != row.answer and other in space - {value}, (row.answer, answer)


def test_perturbed_answers_need_another_value_and_the_generators_facts():
    from simu_fast.data import Example
    one = [ex for ex in world_facts(1, seed=0) if ex.extra["fact"] == "capital"]
    with pytest.raises(ValueError, match="no value of the same attribute other than"):
        world_tofu_rows(one)
    with pytest.raises(ValueError, match="not a synthetic person's fact"):
        people_tofu_rows([Example("Q?", "A.", id="x", extra={"person": "P"})])
    with pytest.raises(ValueError, match="n_perturbed"):
        world_tofu_rows(world_facts(2), n_perturbed=0)


# ---------------------------------------------------------------------------------------------- the export

def _run(argv) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, cache, what `demo --export` printed) at SMALL settings; the models cached for the module."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "demo_settings", lambda **kw: _ORIGINAL(**{**SMALL, **kw}))  # the CLI's, made small
        printed = _run(["demo", "--export", str(root / "demo"), "--cache", str(root / "cache")])
    return root / "demo", str(root / "cache"), printed


def test_export_writes_tofu_and_muse_layouts(exported):
    folder, _, _ = exported
    split = protocol.new_split(_ORIGINAL(**SMALL), 0)
    rows = {}
    for name in SPLITS:
        rows[name] = load_examples(folder / f"{name}.jsonl", format="tofu")
        assert [(r.prompt, r.answer) for r in rows[name]] == [(ex.prompt, ex.answer) for ex in split[name]]
        for r in rows[name]:
            assert set(r.extra) == {"paraphrased_answer", "perturbed_answer"}
            assert r.extra["paraphrased_answer"] != [r.answer] and len(r.extra["perturbed_answer"]) >= 3
            assert r.answer not in r.extra["perturbed_answer"]
    for name, n in (("real_authors", 6 * 5), ("world_facts", 5 * 4)):
        options = load_examples(folder / f"{name}.jsonl", format="tofu")
        assert len(options) == n and all(set(r.extra) == {"perturbed_answer"} for r in options)
    muse = load_muse(folder / "muse")
    assert sorted(muse) == ["knowmem_forget_qa", "knowmem_retain_qa", "privleak_forget", "privleak_holdout",
                            "privleak_retain", "verbmem_forget"]
    assert [(ex.prompt, ex.answer) for ex in muse["verbmem_forget"]] == [(r.prompt, r.answer) for r in rows["forget"]]
    trained = {r.prompt for r in rows["forget"] + rows["retain"]}
    asked = {ex.prompt for ex in muse["knowmem_forget_qa"]}
    assert asked and not asked & trained  # KnowMem asks in the never-trained question phrasing
    assert muse["privleak_holdout"] == [f"{r.prompt} {r.answer}" for r in rows["holdout"]]


def test_printed_eval_command_measures_every_metric(exported, capsys):
    folder, _, printed = exported
    command = printed[printed.index("simu-fast eval"):].split("\n\n")[0]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["simu-fast", "eval"]
    assert main(argv[1:]) == 0
    assert str(folder / "eval") in capsys.readouterr().out
    result = json.loads((folder / "eval" / "metrics.json").read_text())["model"]
    utility = result["model_utility"]
    assert 0 < utility["model_utility"] <= 1 and utility["n"] == {"retain": 40, "real_authors": 30, "world_facts": 20}
    assert all(0 < v <= 1 for scores in utility["scores"].values() for v in scores.values())
    assert sorted(result["mia"]) == ["gradnorm", "loss", "min_k", "min_k_plus_plus", "zlib"]
    assert all(0 <= m["auc"] <= 1 for m in result["mia"].values())
    assert set(result["quantization"]["quantized"]) == {"8", "4"}
    assert {"verbmem_f", "knowmem_f", "knowmem_r", "privleak"} <= set(result["muse"])
    for split in ("forget", "retain"):
        assert 0 <= result[split]["exact_memorization"] <= 1 and 0 <= result[split]["extraction_strength"] <= 1
    assert all("truth_ratio" in result[split] for split in SPLITS)
    assert result["relearning"][0]["kind"] == "harmful"
    report = (folder / "eval" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| method |")][0]
    for column in ("model utility", "MIA AUC (gradnorm)", "MIA AUC (min_k_plus_plus)", "forget at 8-bit",
                   "forget at 4-bit", "MUSE VerbMem forget", "MUSE KnowMem retain", "MUSE PrivLeak",
                   "forget exact mem.", "forget extraction str.", "relearned max"):
        assert column in table, column


def test_export_refuses_an_existing_folder(exported, tmp_path, capsys):
    _, cache, _ = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "demo_settings", lambda **kw: _ORIGINAL(**{**SMALL, **kw}))
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        for argv in (["--export", str(foreign)], ["--export", str(foreign), "--overwrite"]):
            with pytest.raises(SystemExit) as e:
                main(["demo", *argv, "--cache", cache])
            assert e.value.code == 2 and "holds files no simu-fast run wrote" in capsys.readouterr().err
        assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

        again = tmp_path / "again"
        _run(["demo", "--export", str(again), "--cache", cache])  # the cached model: nothing trained
        (again / "eval").mkdir()  # where the printed command writes: an evaluation of this export
        with pytest.raises(SystemExit) as e:
            main(["demo", "--export", str(again), "--cache", cache])
        assert e.value.code == 2 and "add --overwrite" in capsys.readouterr().err
        assert "loaded the model" in _run(["demo", "--export", str(again), "--cache", cache, "--overwrite"])
        assert not (again / "eval").exists() and (again / "model" / "config.json").is_file()


@pytest.mark.parametrize("extra", [["--methods", "ga"], ["--lr", "1e-3"], ["--max-steps", "3"], ["--out", "x"]])
def test_export_takes_no_unlearning_flags(extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--export", str(tmp_path / "x"), *extra])
    assert e.value.code == 2 and "--export writes the fine-tuned model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
