"""The unlearning demo (simu_fast/workloads/demo.py, `simu-fast demo`) at a tiny size: the pipeline, the cache, the table."""
import dataclasses
import json

import pytest
import torch

import simu_fast.workloads.demo as demo
from simu_fast.cli import main

_ORIGINAL = demo.DemoSettings
TINY = dict(n_people=10, vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
            max_train_epochs=3, train_batch_size=8, max_steps=4, eval_every=2, unlearn_lr=1e-3)


def test_demo_runs_every_method_and_reuses_the_cache(tmp_path):
    settings = demo.DemoSettings(methods=("simu", "so-graddiff", "ga"), **TINY)
    logs = []
    report = demo.run_demo(settings, cache_dir=str(tmp_path), log=logs.append)
    assert not report["memorization"]["cached"]
    assert set(report["methods"]) == {"simu", "so-graddiff", "ga"}
    for run in report["methods"].values():
        assert 1 <= run["steps"] <= 4 and run["method_args"]["lr"] == 1e-3
        assert all(0.0 <= run["scores"][s]["rougeL_recall"] <= 1.0 for s in ("forget", "retain", "holdout"))
        assert run["history"] and run["history"][0]["step"] == 2
    assert report["tau"] == pytest.approx(0.2 * report["memorized"]["forget"]["rougeL_recall"])
    table = demo.format_table(report)
    assert table.count("\n| ") == 4 and "| memorized model |" in table and "| simu |" in table

    # the second run loads the cached model: same weights, nothing trained, same memorized scores
    again = demo.run_demo(dataclasses.replace(settings, methods=("ga",)), cache_dir=str(tmp_path), log=logs.append)
    assert again["memorization"]["cached"] and again["memorized"] == report["memorized"]
    assert any("loaded the memorized model" in line for line in logs)
    cached = [p for p in tmp_path.iterdir() if p.name.startswith("memorized-")]
    assert len(cached) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_new_setting_trains_a_new_model(tmp_path):
    a = demo.DemoSettings(**TINY)
    b = dataclasses.replace(a, hidden_size=48)
    assert a.model_key() != b.model_key() and a.model_key() == demo.DemoSettings(**TINY).model_key()
    assert dataclasses.replace(a, unlearn_lr=0.5).model_key() == a.model_key()  # unlearning settings: same model


def test_cli_demo_writes_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DemoSettings", lambda: _ORIGINAL(**TINY))  # the CLI's defaults, made tiny
    out = tmp_path / "out"
    assert main(["demo", "--methods", "ga,npo", "--max-steps", "2", "--cache", str(tmp_path / "c"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ga |" in printed and "| npo |" in printed and "forget ROUGE-L" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ga", "npo"} and all(r["steps"] <= 2 for r in metrics["methods"].values())
    assert "| npo |" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--methods", "simu,nope"], "unknown method"),
    (["demo", "--lr", "0"], "--lr must be positive"),
    (["demo", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["demo", "--tau-fraction", "2"], "--tau-fraction must be in"),
])
def test_cli_demo_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
