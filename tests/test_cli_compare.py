"""`simu-fast compare` on a tiny local model and local files in TOFU's layout (question / answer /
paraphrased_answer): the whole comparison end to end, in one process and spread over two torchrun ranks (the same
result), resumed from its run cache, and a clear exit when there is nothing to unlearn."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--methods", "graddiff,simu", "--lrs", "1e-3,3e-3", "--max-steps", "15", "--seeds", "2",
         "--validation-seeds", "3", "--eval-every", "5", "--warmup-steps", "0", "--budget-factor", "2",
         "--set", "simu.ig_steps=2"]


@pytest.fixture(scope="module")
def tofu_files(memorized, tmp_path_factory):
    """The memorized tiny model saved as a local directory, and its forget / retain / holdout people as TOFU-layout
    JSON Lines (the paraphrase: the answer reworded by a fixed prefix)."""
    model, tok, data = memorized
    root = tmp_path_factory.mktemp("compare")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    files = {"model": str(root / "model")}
    for name in ("forget", "retain", "holdout"):
        path = root / f"{name}.json"
        path.write_text("".join(json.dumps({"question": ex.prompt, "answer": ex.answer,
                                            "paraphrased_answer": "so: " + ex.answer}) + "\n" for ex in data[name]))
        files[name] = str(path)
    return files


def _compare(files, out, *extra, ranks=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
              if ranks > 1 else [sys.executable])
    cmd = [*launch, "-m", "simu_fast", "compare", "--model", files["model"], "--forget", files["forget"],
           "--retain", files["retain"], "--holdout", files["holdout"], "--format", "tofu", "--out", str(out),
           *SMALL, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process(tofu_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-one") / "out"
    r = _compare(tofu_files, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_compare_on_tofu_files_writes_a_report_that_reads_on_its_own(one_process):
    out, r = one_process
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["chosen_lr"]) == {"graddiff", "simu"}
    assert metrics["settings"]["validation_seeds"] == [100, 101, 102] and metrics["settings"]["seeds"] == [0, 1]
    for label in ("graddiff", "simu"):
        assert len(metrics["runs"][label]) == 2
        assert all(len(row["runs"]) == 3 for row in metrics["validation"][label])
    reached = [run for runs in metrics["runs"].values() for run in runs if run["matched"]["reached"]]
    assert reached, "no run reached matched forget"
    for run in reached:  # read at the exact target: every step is evaluated near it
        assert run["matched"]["at_target"]["forget"] == pytest.approx(run["target"])
        assert "retain_paraphrase" in run["measures"] and "relearn_harmful_0.1" in run["measures"]
    text = (out / "report.md").read_text()
    for part in ("# Fair comparison at matched forget", "## The lr choice", "## At matched forget",
                 "## Paired differences", "retain paraphrase", "never-seen at target", "lr_curves.png"):
        assert part in text, part
    assert (out / "lr_curves.png").is_file() and (out / "tradeoff.png").is_file()
    assert r.stderr.count("(validation)") >= 2 * 2 * 3 and "retain at target" in r.stdout  # a line per run


def test_a_second_call_resumes_from_the_run_cache(one_process, tofu_files):
    out, first = one_process
    before = json.loads((out / "metrics.json").read_text())
    r = _compare(tofu_files, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ": cached," in r.stderr and "(validation):" in r.stderr
    assert all(": cached," in line for line in r.stderr.splitlines() if line.startswith("["))
    assert before["chosen_lr"] == json.loads((out / "metrics.json").read_text())["chosen_lr"]


def test_two_torchrun_ranks_give_the_one_process_result(one_process, tofu_files, tmp_path):
    out, _ = one_process
    r = _compare(tofu_files, tmp_path / "two", ranks=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 1" in r.stderr and "rank 0" in r.stderr  # both ranks ran runs
    one = json.loads((out / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["chosen_lr"] == one["chosen_lr"] and two["budget"] == one["budget"]
    for label in one["runs"]:
        for a, b in zip(one["runs"][label], two["runs"][label]):
            assert a["matched"]["step"] == b["matched"]["step"]
            for key in ("forget", "retain", "holdout"):
                assert a["matched"][key] == pytest.approx(b["matched"][key], abs=1e-6)
    assert (tmp_path / "two" / "report.md").is_file()


def test_nothing_to_unlearn_is_a_message_not_a_crash(tofu_files, tmp_path):
    files = dict(tofu_files, holdout=tofu_files["forget"])  # the holdout level is the forget level
    r = _compare(files, tmp_path / "flat")
    assert r.returncode == 1
    assert "nothing to unlearn" in r.stderr and "Traceback" not in r.stderr
    assert "nothing to unlearn" in (tmp_path / "flat" / "report.md").read_text()


def test_a_hub_name_the_hub_cannot_give_is_one_line(tofu_files, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "simu_fast", "compare", "--model", "nobody/no-such-model", "--forget",
                        tofu_files["forget"], "--retain", tofu_files["retain"], "--holdout", tofu_files["holdout"],
                        "--format", "tofu", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nobody/no-such-model is not a local directory, and the hub did not give" in r.stderr


def test_the_run_cache_key_names_dtype_so_bf16_runs_never_stand_in_for_float32_ones(tofu_files):
    from simu_fast.cli.compare import fingerprint
    files = [tofu_files["forget"], tofu_files["retain"], tofu_files["holdout"]]
    auto = fingerprint(tofu_files["model"], files, 64)
    assert fingerprint(tofu_files["model"], files, 64, "auto") == auto  # keys cached before --dtype still match
    keys = {auto} | {fingerprint(tofu_files["model"], files, 64, d) for d in ("float32", "bfloat16", "float16")}
    assert len(keys) == 4
    assert fingerprint(tofu_files["model"], files, 65) != auto
    from simu_fast.cli.compare import cache_dtype
    assert cache_dtype("float32", tofu_files["model"]) == "auto"  # the checkpoint's own dtype: the same runs
    assert cache_dtype("bfloat16", tofu_files["model"]) == "bfloat16"
    assert cache_dtype("auto", tofu_files["model"]) == "auto"
