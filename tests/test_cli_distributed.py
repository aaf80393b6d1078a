"""`simu-fast unlearn` under torchrun (python -m torch.distributed.run) with 2 CPU processes (gloo), --parallel ddp
(the default) and fsdp2: SIMU on the tiny model and LUME files of tests/test_cli.py; rank 0 alone prints and
writes the outputs and checkpoint (with FSDP2 each rank also its optimizer shard)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from simu_fast.cli.output_dir import OWN

from test_cli import _args

pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun_unlearn(model_dir, data, out, parallel):  # noqa: F811
    """`torchrun --standalone --nproc-per-node 2 -m simu_fast unlearn ...` (SIMU, 2 steps, a checkpoint every
    step); --parallel is left to its default (ddp under torchrun) for ddp."""
    args = _args(model_dir, data, out, "simu", "--steps", "2", "--lr", "1e-2", "--set", "fraction=0.2",
                 "--set", "ig_steps=1", "--set", "hessian_every=1", "--save-every", "1",
                 *(["--parallel", parallel] if parallel != "ddp" else []))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "simu_fast", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_processes(model_dir, data, tmp_path, parallel):  # noqa: F811
    out = tmp_path / parallel
    r = _torchrun_unlearn(model_dir, data, out, parallel)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("simu-fast: unlearned with simu in 2 steps") == 1, r.stdout  # rank 0 alone prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["train_loss"]) == 2
    assert metrics["options"]["world_size"] == 2 and metrics["options"]["parallel"] == parallel
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.md", "mask.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p for p in os.listdir(out) if p.startswith((".", "checkpoint"))) == sorted(["checkpoint", *OWN])
    optimizer_files = sorted(p for p in os.listdir(out / "checkpoint") if p.startswith("optimizer"))
    assert optimizer_files == (["optimizer.pt"] if parallel == "ddp" else ["optimizer.rank0.pt", "optimizer.rank1.pt"])
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2

    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(("mlp" in k or "self_attn" in k) for k in moved), moved  # SIMU: neurons + attention


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_exit_status_stress(model_dir, data, tmp_path, parallel):  # noqa: F811
    """The same run SIMU_FAST_STRESS_RUNS times (default 50): every one must exit 0 (a rank that aborts at
    shutdown after a finished run turns a good job into a failure). Prints the failure count and rate.
    Run it with `pytest -m slow tests/test_cli_distributed.py -s`."""
    runs = int(os.environ.get("SIMU_FAST_STRESS_RUNS", "50"))
    failures = []
    for i in range(runs):
        r = _torchrun_unlearn(model_dir, data, tmp_path / f"run{i}", parallel)
        if r.returncode != 0:
            failures.append((i, r.returncode, (r.stdout + r.stderr)[-1500:]))
        shutil.rmtree(tmp_path / f"run{i}", ignore_errors=True)
    print(f"\ntorchrun {parallel}: {len(failures)} of {runs} runs exited non-zero ({len(failures) / runs:.1%})")
    assert not failures, failures[0]
