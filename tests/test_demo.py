"""The unlearning demo (simu_fast/workloads/demo.py, `simu-fast demo`) at a tiny size: the protocol in miniature,
the cache, each method's own lr, the table."""
import json

import pytest

import simu_fast.workloads.demo as demo
from simu_fast.cli import main

_ORIGINAL = demo.demo_settings
TINY = dict(background_people=6, countries=3, filler=40, new_people=6, forget_people=1, holdout_people=1,
            vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, pretrain_epochs=1,
            finetune_max_epochs=2, max_steps=4, eval_every=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the first test trains the tiny models, the CLI test loads them."""
    return str(tmp_path_factory.mktemp("demo-cache"))


def test_demo_runs_each_method_at_its_lr_and_reuses_the_cache(cache):
    pytest.importorskip("transformers")
    settings = demo.demo_settings(**TINY)
    logs = []
    report = demo.run_demo(settings, methods=("simu", "so-graddiff", "ga"), cache_dir=cache, log=logs.append)
    assert not report["finetune"]["cached"]
    assert set(report["methods"]) == {"simu", "so-graddiff", "ga"}
    for name, run in report["methods"].items():
        assert run["lr"] == demo.DEMO_LRS[name] and 1 <= run["steps"] <= 4
        assert all(0.0 <= run["scores"][k] <= 1.0 for k in ("forget", "retain", "retain_paraphrase", "holdout", "world"))
        assert run["matched_step"] is None or run["matched_step"] in {p["step"] for p in run["curve"]}
    assert report["target"] == report["finetuned"]["holdout"]  # matched forget: the never-seen people's level
    table = demo.format_table(report)
    assert table.count("\n| ") == 4 and "| fine-tuned model |" in table and "| simu | 3e-04 |" in table

    # the second run loads the cached models: nothing trained, the same starting scores
    again = demo.run_demo(settings, methods=("ga",), lrs={"ga": 5e-3}, cache_dir=cache, log=logs.append)
    assert again["finetune"]["cached"] and again["finetuned"] == report["finetuned"]
    assert again["methods"]["ga"]["lr"] == 5e-3 and any("loaded" in line for line in logs)


def test_cli_demo_writes_report(tmp_path, cache, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setattr(demo, "demo_settings", lambda **kw: _ORIGINAL(**{**TINY, **kw}))  # the CLI's, made tiny
    out = tmp_path / "out"
    assert main(["demo", "--methods", "ga,npo", "--max-steps", "2", "--lr", "1e-3", "--cache", cache,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ga | 1e-03 |" in printed and "| npo | 1e-03 |" in printed and "never-seen people" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ga", "npo"} and all(r["steps"] <= 2 for r in metrics["methods"].values())
    assert "| npo |" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--methods", "simu,nope"], "unknown method"),
    (["demo", "--lr", "0"], "--lr must be a positive number"),
    (["demo", "--lr", "nan"], "--lr must be a positive number"),
    (["demo", "--max-steps", "0"], "--max-steps must be at least 1"),
])
def test_cli_demo_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
