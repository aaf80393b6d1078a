"""The simu-fast command line (simu_fast/cli/) on a tiny random Llama and a tiny local tokenizer."""
import json
import os

import pytest
import torch

from simu_fast.cli import main
from simu_fast.cli.output_dir import OWN
from tiny_models import CLI_WORDS


def _args(model_dir, data, out, method, *extra):
    return ["unlearn", "--model", str(model_dir), "--forget", data["forget"], "--retain", data["retain"],
            "--method", method, "--out", str(out), "--batch-size", "2", "--max-length", "32", "--format", "lume",
            *extra]


def _weights_differ(a_dir, b_dir):
    from transformers import AutoModelForCausalLM
    a = AutoModelForCausalLM.from_pretrained(a_dir, local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(b_dir, local_files_only=True).state_dict()
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def _check_outputs(out, method, steps):
    for name in ("config.json", "metrics.json", "report.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == steps
    assert len(metrics["train_loss"]) == steps and all(isinstance(x, float) for x in metrics["train_loss"])
    assert metrics["wall_time_s"] >= 0 and "options" in metrics and "method_args" in metrics
    assert method in (out / "report.md").read_text()
    return metrics


def test_graddiff(model_dir, data, tmp_path):
    out = tmp_path / "gd"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "2", "--lr", "1e-2", "--seed", "1")) == 0
    metrics = _check_outputs(out, "graddiff", 2)
    assert metrics["method_args"] == {"lr": 0.01}
    assert not (out / "mask.safetensors").exists()
    assert not (out / "checkpoint").exists()  # no --save-every: no checkpoint with optimizer state is left
    assert sorted(p for p in os.listdir(out) if p.startswith(".")) == sorted(OWN)  # no staging directory, only the
    # run's list of outputs and its lock
    assert _weights_differ(model_dir, out)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)("alice")["input_ids"][-1] == 4 + CLI_WORDS.index("alice")


def test_simu_writes_mask(model_dir, data, tmp_path):
    out = tmp_path / "simu"
    assert main(_args(model_dir, data, out, "simu", "--steps", "2", "--lr", "1e-2",
                      "--set", "fraction=0.2", "--set", "ig_steps=1")) == 0
    metrics = _check_outputs(out, "simu", 2)
    assert metrics["method_args"]["fraction"] == 0.2 and metrics["method_args"]["ig_steps"] == 1
    assert (out / "mask.safetensors").is_file() and metrics["mask"] == "mask.safetensors"
    assert _weights_differ(model_dir, out)
    check = metrics["neuron_ablation"]  # the mask's causal check, on the model before unlearning
    assert check["neurons"] > 0 and len(check["random_sets"]) == 5 and check["base"]["forget"] > 0
    assert "zeroed in the original model" in (out / "report.md").read_text()


def test_ssiuu_logs_its_regularizer(model_dir, data, tmp_path):
    out = tmp_path / "ssiuu"
    assert main(_args(model_dir, data, out, "ssiuu", "--steps", "3", "--lr", "1e-2")) == 0
    metrics = _check_outputs(out, "ssiuu", 3)
    assert [m["step"] for m in metrics["step_metrics"]] == [2, 3]  # the first step has no previous parameters
    assert all(m["reg_ratio"] >= 0 and 0 <= m["negative_fraction"] <= 1 for m in metrics["step_metrics"])


def test_config_and_flag_override(model_dir, data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\nforget: {data['forget']}\nmethod: ga\nsteps: 3\nbatch-size: 2\n"
                   "lr: 0.001\nmethod_args:\n  weight_decay: 0.0\n")
    out = tmp_path / "cfg"
    assert main(["unlearn", "--config", str(cfg), "--out", str(out), "--steps", "1", "--lr", "0.05"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ga" and metrics["steps"] == 1  # --steps beats the config's steps: 3
    assert metrics["method_args"] == {"weight_decay": 0.0, "lr": 0.05}
    assert metrics["options"]["batch_size"] == 2  # from the config


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simu-fast: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_user_errors_exit_2(model_dir, data, tmp_path, capsys):
    out = str(tmp_path / "o")
    err = _error(capsys, _args(tmp_path / "nope", data, out, "graddiff", "--steps", "1"))
    assert "model directory not found" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, _args(tmp_path / "empty", data, out, "graddiff", "--steps", "1"))
    assert "not a transformers model directory" in err
    err = _error(capsys, _args(model_dir, data, out, "bogus", "--steps", "1"))
    assert "unknown method" in err and "graddiff" in err
    err = _error(capsys, _args(model_dir, dict(data, forget=str(tmp_path / "missing.jsonl")), out, "graddiff",
                               "--steps", "1"))
    assert "forget file not found" in err
    err = _error(capsys, ["unlearn", "--model", str(model_dir), "--forget", data["forget"], "--method", "graddiff",
                          "--out", out, "--steps", "1"])
    assert "--retain" in err
    err = _error(capsys, _args(model_dir, data, out, "graddiff", "--steps", "1", "--set", "nonsense=1"))
    assert "graddiff" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: ga\n")
    err = _error(capsys, ["unlearn", "--config", str(bad)])
    assert "unknown key" in err
    bad.write_text("a: [1,\n")
    assert "not valid YAML" in _error(capsys, ["unlearn", "--config", str(bad)])
    assert "config file not found" in _error(capsys, ["unlearn", "--config", str(tmp_path / "x.yaml")])
    err = _error(capsys, _args(model_dir, data, out, "ssiuu", "--steps", "1", "--parallel", "fsdp2"))
    assert "'ssiuu' does not support --parallel fsdp2" in err
    assert not os.path.exists(out)


def test_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--forget", "--retain", "--method", "--config", "--out", "--steps", "--epochs",
                "--batch-size", "--lr", "--max-length", "--grad-accum", "--seed", "--resume", "--format", "--set",
                "--save-every", "graddiff", "simu"):
        assert opt in text, opt
    from simu_fast.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["unlearn"]
    assert all(a.help for a in sub._actions)


def test_python_dash_m(model_dir, data, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "simu_fast", "unlearn", "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "--method" in r.stdout


def test_resume_continues_from_checkpoint(model_dir, data, tmp_path):
    out = tmp_path / "r"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "1", "--save-every", "1")) == 0
    assert (out / "checkpoint").is_dir()
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "2", "--save-every", "1", "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_stop_rouge_stops_when_forget_rouge_is_low_enough(model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "stop"  # every ROUGE-L is <= 1: the first check stops the run
    assert main(_args(model_dir, data, out, "ga", "--steps", "9", "--stop-rouge", "1", "--eval-every", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stop_reason"] == "stop_when" and metrics["steps"] == 2
    assert metrics["history"][0]["step"] == 2 and 0.0 <= metrics["history"][0]["forget_rougeL"] <= 1.0
    assert "stop rule" in (out / "report.md").read_text()

    import simu_fast.eval
    seen = []
    monkeypatch.setattr(simu_fast.eval, "rouge_eval_fn",
                        lambda tok, splits, **kw: lambda model: seen.append(len(splits["forget"])) or
                        {"forget_rougeL": 0.9})
    out2 = tmp_path / "nostop"
    assert main(_args(model_dir, data, out2, "ga", "--steps", "3", "--stop-rouge", "0.5")) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["steps"] == 3 and m2["stop_reason"] == "max_steps"
    assert [h["step"] for h in m2["history"]] == [3] and seen == [3]  # eval_every 10 > 3 steps: only the final one


@pytest.mark.parametrize("extra, message", [
    (["--stop-rouge", "1.5"], "stop-rouge must be in"),
    (["--eval-every", "3"], "eval-every needs --stop-rouge"),
    (["--stop-rouge", "0.2", "--eval-every", "0"], "eval-every must be at least 1"),
])
def test_stop_rouge_errors(model_dir, data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(_args(model_dir, data, tmp_path / "x", "ga", "--steps", "1", *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_command_writes_metrics_report_and_plots(model_dir, data, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model_dir), "--forget", data["forget"], "--retain", data["retain"],
            "--holdout", data["retain"], "--format", "lume", "--max-length", "32", "--relearn", "harmful",
            "--relearn-steps", "2", "--relearn-fraction", "0.5", "--original", str(model_dir), "--out", str(out)]
    assert main(args) == 0
    assert "forget ROUGE-L" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["model"]
    assert {"forget", "retain", "holdout", "mia", "relearning", "erase_or_hide"} <= set(metrics)
    assert metrics["erase_or_hide"]["d_plus"] == metrics["erase_or_hide"]["d_minus"] == 0.0  # the same model
    assert metrics["forget"]["n"] == 3 and 0.0 <= metrics["forget"]["rougeL_recall"] <= 1.0
    assert (out / "report.md").is_file() and (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "relearning.png").is_file()


def test_eval_prints_the_fields_yardsticks_in_one_table(model_dir, data, tmp_path):
    """Min-K%++ and GradNorm MIAs, exact memorization and extraction strength, and the quantization attack: in
    metrics.json and as columns of report.md's one table."""
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model_dir), "--forget", data["forget"], "--retain", data["retain"],
            "--holdout", data["retain"], "--format", "lume", "--max-length", "32", "--mia",
            "loss,min_k_plus_plus,gradnorm", "--quantization", "8,4", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())["model"]
    assert set(metrics["mia"]) == {"loss", "min_k_plus_plus", "gradnorm"}
    assert set(metrics["quantization"]["quantized"]) == {"8", "4"}
    for split in ("forget", "retain"):
        assert 0.0 <= metrics[split]["exact_memorization"] <= 1.0 and 0.0 <= metrics[split]["extraction_strength"] <= 1.0
    table = (out / "report.md").read_text()
    for header in ("MIA AUC (min_k_plus_plus)", "MIA AUC (gradnorm)", "forget exact mem.", "forget extraction str.",
                   "forget at 8-bit", "forget at 4-bit"):
        assert header in table, header


@pytest.mark.parametrize("extra, message", [
    (["--mia", "loss,nope"], "--mia 'loss,nope': choose from"),
    (["--quantization", "8,x"], "--quantization expects bit widths"),
    (["--real-authors", "a.json"], "needs both --real-authors and --world-facts"),
    (["--muse", "no-such-dir"], "--muse no-such-dir: not a directory"),
    (["--relearn", "benign"], "--relearn benign needs"),
    (["--relearn", "harmful", "--relearn-fraction", "1.5"], "--relearn-fraction must be in"),
    (["--holdout", "missing.jsonl"], "holdout file not found"),
    (["--utility-text", "missing.txt"], "utility text file not found"),
])
def test_eval_command_errors(model_dir, data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(model_dir), "--forget", data["forget"], "--out", str(tmp_path / "x"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unlearn_with_eval(model_dir, data, tmp_path):
    out = tmp_path / "ue"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "1", "--eval", "--holdout", data["retain"])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"forget", "retain", "holdout", "mia", "erase_or_hide"} <= set(metrics["eval"])
    assert metrics["eval"]["erase_or_hide"]["d_plus"] >= 0 and metrics["eval"]["erase_or_hide"]["per_layer"]
    assert "Evaluation" in (out / "report.md").read_text() and "D+ (erased)" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(_args(model_dir, data, tmp_path / "x", "graddiff", "--steps", "1", "--holdout", data["retain"]))


def test_keep_best_writes_the_best_evaluated_model(model_dir, data, tmp_path):
    out = tmp_path / "best-run"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "3", "--lr", "1e-2", "--keep-best",
                      "min:forget_answer_prob", "--eval-every", "1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best"]
    assert best["metric"] == "forget_answer_prob" and best["mode"] == "min" and 1 <= best["step"] <= 3
    values = {h["step"]: h["forget_answer_prob"] for h in metrics["history"]}
    assert best["value"] == min(values.values()) == values[best["step"]]
    assert json.loads((out / "best" / "best.json").read_text()) == best
    assert (out / "best" / "config.json").is_file() and (out / "best" / "model.safetensors").is_file()
    assert "best evaluated model" in (out / "report.md").read_text()


def test_dtype_loads_the_checkpoint_in_the_dtype_asked_and_auto_keeps_its_own(model_dir, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from simu_fast.cli.inputs import load_weights
    assert load_weights(str(model_dir)).dtype == torch.float32  # the tests' checkpoint is float32
    assert load_weights(str(model_dir), "bfloat16").dtype == torch.bfloat16
    out = tmp_path / "bf16"
    assert main(_args(model_dir, data, out, "graddiff", "--steps", "1", "--lr", "1e-2", "--dtype", "bfloat16")) == 0
    assert json.loads((out / "metrics.json").read_text())["options"]["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto").dtype == torch.bfloat16
    assert load_weights(str(out)).dtype == torch.bfloat16  # auto: the saved bf16, not a float32 upcast
    ev = tmp_path / "eval16"
    assert main(["eval", "--model", str(model_dir), "--forget", data["forget"], "--format", "lume",
                 "--max-length", "32", "--dtype", "float16", "--out", str(ev)]) == 0
    assert 0.0 <= json.loads((ev / "metrics.json").read_text())["model"]["forget"]["rougeL_recall"] <= 1.0
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dtype: float8\n")
    capsys.readouterr()
    assert "unknown dtype 'float8'" in _error(capsys, _args(model_dir, data, tmp_path / "x", "ga", "--steps", "1",
                                                             "--config", str(cfg)))
