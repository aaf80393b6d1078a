"""What `simu-fast unlearn` keeps safe: the trained model survives a failed evaluation and Ctrl-C keeps the last
checkpoint; --overwrite removes exactly the earlier run's files; warnings for suspicious data; honest reports."""
import json
import os

import pytest

from simu_fast.cli import main
from simu_fast.cli.output_dir import OutputDir


def _args(model_dir, data, out, method, *extra):
    return ["unlearn", "--model", str(model_dir), "--forget", data["forget"], "--retain", data["retain"],
            "--method", method, "--out", str(out), "--batch-size", "2", "--format", "lume", *extra]


def _rows(*pairs):
    return "".join(json.dumps({"id": str(i), "input": q, "output": a, "task": "t"}) + "\n"
                   for i, (q, a) in enumerate(pairs))


def test_a_failed_evaluation_keeps_the_trained_model(model_dir, data, tmp_path, monkeypatch, capsys):
    import simu_fast.eval.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation broke")
    monkeypatch.setattr(simu_fast.eval.evaluate, "evaluate_model", broken)
    out = tmp_path / "o"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "2", "--eval")) == 1
    err = capsys.readouterr().err
    assert "the evaluation after unlearning failed (RuntimeError: the evaluation broke)" in err
    assert f"the unlearned model is saved in {out}" in err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "the evaluation broke" in metrics["evaluation_error"]
    assert "evaluation FAILED after training" in (out / "report.md").read_text()


def test_imu_with_eval_writes_model_and_evaluation(model_dir, data, tmp_path):
    """IMU freezes everything outside theta_s; --eval's erase-or-hide diagnostic differentiates the model."""
    out = tmp_path / "imu"
    assert main(_args(model_dir, data, out, "imu", "--steps", "2", "--lr", "1e-3", "--set", "layers=1",
                      "--eval")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["forget"]["answer_prob"] >= 0 and metrics["evaluation_error"] is None
    assert (out / "model.safetensors").is_file()


def test_ctrl_c_stops_cleanly_keeps_the_checkpoint_and_resumes(model_dir, data, tmp_path, monkeypatch, capsys):
    from simu_fast.training.unlearner import Unlearner
    real = Unlearner._train_step

    def interrupted_at_step_4(self, group):
        if self.step == 3:  # three steps done, the checkpoint at step 2 written
            raise KeyboardInterrupt
        return real(self, group)
    monkeypatch.setattr(Unlearner, "_train_step", interrupted_at_step_4)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(_args(model_dir, data, out, "graddiff", "--steps", "5", "--save-every", "2"))
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3; the checkpoint at step 2 is kept" in err and "--resume" in err
    assert "Traceback" not in err
    assert (out / "checkpoint").is_dir() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(Unlearner, "_train_step", real)
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "5", "--save-every", "2", "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5


def test_overwrite_removes_exactly_the_earlier_runs_files(model_dir, data, tmp_path):
    out = tmp_path / "o"
    assert main(_args(model_dir, data, out, "simu", "--steps", "1", "--set", "ig_steps=1",
                      "--set", "fraction=0.2", "--save-every", "1")) == 0
    assert (out / "mask.safetensors").is_file() and (out / "checkpoint").is_dir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):  # a file the run did not write: refused, even with --overwrite
        main(_args(model_dir, data, out, "ga", "--steps", "1", "--overwrite"))
    (out / "notes.txt").unlink()
    with pytest.raises(SystemExit):  # no --overwrite: refused
        main(_args(model_dir, data, out, "ga", "--steps", "1"))
    assert (out / "mask.safetensors").is_file()
    assert main(_args(model_dir, data, out, "ga", "--steps", "1", "--overwrite")) == 0
    assert not (out / "mask.safetensors").exists()  # no stale SIMU mask beside the GA model
    assert not (out / "checkpoint").exists()  # nor its checkpoint
    assert json.loads((out / "metrics.json").read_text())["method"] == "ga"


def test_eval_overwrite_and_refusal(model_dir, data, tmp_path, capsys):
    out = tmp_path / "u"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "1")) == 0
    report = (out / "report.md").read_text()
    argv = ["eval", "--model", str(out), "--forget", data["forget"], "--format", "lume", "--max-length", "32",
            "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    with pytest.raises(SystemExit) as e:  # a second eval into the same --out
        main(argv)
    assert e.value.code == 2 and "add --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "report.md").read_text() == report  # the unlearn run's report untouched throughout


def test_a_lock_is_released_with_its_run(tmp_path):
    first = OutputDir(str(tmp_path / "o")).open()
    with pytest.raises(Exception, match="in use by another simu-fast run \\(pid "):
        OutputDir(str(tmp_path / "o")).open()
    first.record("x")
    (tmp_path / "o" / "x").write_text("1")
    first.close()
    with OutputDir(str(tmp_path / "o")).open(overwrite=True):
        assert not (tmp_path / "o" / "x").exists()


def test_suspicious_data_warns_with_counts(model_dir, data, tmp_path, capsys):
    forget = tmp_path / "f.jsonl"
    forget.write_text(_rows(("where does alice live ?", "alice lives in paris"), ("who is alice ?", " "),
                            ("where does bob live ?", "bob lives in rome")))
    out = tmp_path / "o"
    assert main(_args(model_dir, dict(data, forget=str(forget)), out, "graddiff", "--steps", "1")) == 0
    err = capsys.readouterr().err
    assert "warning: forget file" in err and "1 of 3 rows have an empty answer (rows 2)" in err
    assert "1 of 3 forget rows (rows 3) are also in the retain file" in err


def test_report_states_what_was_used_and_before_after(model_dir, data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "2", "--set", "gamma=0.5")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lr"] == 1e-5  # graddiff's default, as the optimizer used it
    assert metrics["method_args_used"]["gamma"] == 0.5 and metrics["method_args_used"]["weight_decay"] == 0.01
    assert metrics["options"]["max_length"] == 64  # the default 512 lowered to the model's position limit
    before, after = metrics["answer_prob_before"], metrics["answer_prob_after"]
    assert set(before) == set(after) == {"forget", "retain"} and before != after
    report = (out / "report.md").read_text()
    assert "- lr: 1e-05 (the method's default)" in report
    assert f"forget answer probability (first 256 rows, teacher forced): before {before['forget']:.3f}, after " \
           f"{after['forget']:.3f}" in report
    assert f"forget {before['forget']:.3f} -> {after['forget']:.3f}" in capsys.readouterr().out


def test_help_lists_each_methods_lr_and_keys(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert "simu         lr 5e-06; --set keys: ig_steps=5, ratio=unset" in text
    assert "graddiff     lr 1e-05; --set keys: gamma=1.0" in text
    assert "--prompt-field" in text and "--answer-field" in text and "--overwrite" in text


def test_the_mask_check_says_when_retain_dropped_more():
    from simu_fast.cli.unlearn import _ablation_line
    check = {"neurons": 12, "base": {"forget": 0.9, "retain": 0.9}, "mask": {"forget": 0.8, "retain": 0.5},
             "random": {"forget": 0.89}, "drop_vs_random": 10.0}
    assert "retain dropped MORE than forget" in _ablation_line(check)
    check["mask"] = {"forget": 0.5, "retain": 0.8}
    assert "MORE" not in _ablation_line(check)
