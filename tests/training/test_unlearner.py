"""Unlearner: the training loop (tiny random Llama, a test-only method; CPU)."""
import os

import pytest
import torch
from torch.utils.data import DataLoader

from simu_fast import Unlearner
from simu_fast.data.collate import make_loader
from simu_fast.methods.base import UnlearningMethod
from tiny_models import tiny_llama as shared_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 61, 8


def tiny_llama(dropout=0.0, seed=0):
    return shared_tiny_llama(VOCAB, seed, attention_dropout=dropout, tie_word_embeddings=False).float()


def features(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def nll(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


class GradDiff(UnlearningMethod):
    """Test-only: ascent on forget, descent on retain."""
    name = "test_graddiff"
    uses_retain = True

    def __init__(self, opt="adamw", lr=1e-2, fail_at_step=None):
        self.opt, self.lr, self.fail_at_step = opt, lr, fail_at_step
        self.steps_done = 0

    def make_optimizer(self, model):
        if self.opt == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.lr)
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)

    def loss(self, model, forget_batch, retain_batch):
        return -nll(model, forget_batch) + nll(model, retain_batch)

    def after_step(self, model, optimizer, forget_batch, step):
        if self.fail_at_step is not None and step == self.fail_at_step:
            raise KeyboardInterrupt("simulated interruption")
        self.steps_done += 1

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        self.steps_done = state["steps_done"]


def loaders(bf=2, br=2, shuffle=True, nf=6, nr=5):
    return (make_loader(features(nf, 1), bf, shuffle=shuffle, seed=3, pad_token_id=0),
            make_loader(features(nr, 2), br, shuffle=shuffle, seed=4, pad_token_id=0))


def forget_nll(model, nf=6):
    batch = next(iter(make_loader(features(nf, 1), nf, pad_token_id=0)))
    with torch.no_grad():
        return nll(model, batch).item()


def assert_same_state(m1, m2, o1, o2):
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for key, v in s1["state"][k].items():
            w = s2["state"][k][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_forget_nll_rises():
    model = tiny_llama()
    before = forget_nll(model)
    f, r = loaders()
    out = Unlearner(model, GradDiff(), f, r, max_steps=6, progress=False).run()
    assert out["step"] == 6 and out["stop_reason"] == "max_steps" and len(out["train_loss"]) == 6
    assert forget_nll(model) > before + 0.5


def test_grad_accum_matches_full_batches():
    results = []
    for batch, accum in ((4, 1), (2, 2)):
        model = tiny_llama()
        f, r = loaders(batch, batch, shuffle=False, nf=8, nr=8)
        Unlearner(model, GradDiff(opt="sgd", lr=0.5), f, r, max_steps=2, grad_accum=accum, max_grad_norm=1.0,
                  progress=False).run()
        results.append(model)
    for p1, p2 in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)


def test_epochs_and_partial_last_group():
    f, r = loaders()  # 3 forget batches an epoch
    out = Unlearner(tiny_llama(), GradDiff(), f, r, epochs=2, grad_accum=2, progress=False).run()
    assert out["step"] == 3 and out["stop_reason"] == "epochs"
    f, r = loaders()
    out = Unlearner(tiny_llama(), GradDiff(), f, r, epochs=1, grad_accum=2, progress=False).run()
    assert out["step"] == 2  # the last step has one micro-batch
    f, r = loaders()
    out = Unlearner(tiny_llama(), GradDiff(), f, r, epochs=5, max_steps=2, progress=False).run()
    assert out["step"] == 2 and out["stop_reason"] == "max_steps"


@pytest.mark.parametrize("how", ["interrupt", "max_steps"])
def test_resume_is_bit_exact(tmp_path, how):
    # dropout on and shuffled loaders of different lengths, so RNG and data positions both matter
    kw = dict(max_steps=7, grad_accum=2, eval_every=2, save_every=3, progress=False)
    evals = lambda m: {"forget_nll": forget_nll(m)}  # noqa: E731

    ref_model, ref_method = tiny_llama(dropout=0.2), GradDiff()
    ref = Unlearner(ref_model, ref_method, *loaders(), eval_fn=evals, out_dir=str(tmp_path / "ref"), **kw)
    ref_out = ref.run()

    first = tiny_llama(dropout=0.2)
    if how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            Unlearner(first, GradDiff(fail_at_step=4), *loaders(), eval_fn=evals, out_dir=str(tmp_path / "run"),
                      **kw).run()
        expected_step = 3
    else:
        Unlearner(first, GradDiff(), *loaders(), eval_fn=evals, out_dir=str(tmp_path / "run"),
                  **{**kw, "max_steps": 3}).run()
        expected_step = 3
    assert os.listdir(tmp_path / "run") == ["checkpoint"]
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == expected_step

    model, method = tiny_llama(dropout=0.2), GradDiff()  # the original model, as a fresh process would build it
    resumed = Unlearner(model, method, *loaders(), eval_fn=evals, out_dir=str(tmp_path / "run"), resume=True, **kw)
    out = resumed.run()
    assert out["step"] == 7
    assert method.steps_done == ref_method.steps_done == 7
    assert_same_state(ref_model, model, ref.optimizer, resumed.optimizer)
    assert out["train_loss"] == ref_out["train_loss"]
    if how == "interrupt":
        assert out["history"] == ref_out["history"]
    else:  # the short run also evaluated at its end (step 3)
        assert [h for h in out["history"] if h["step"] != 3] == ref_out["history"]


def test_checkpoint_is_atomic(tmp_path):
    f, r = loaders()
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=2, save_every=1, out_dir=str(tmp_path), progress=False).run()
    assert os.listdir(tmp_path) == ["checkpoint"]
    ckpt = tmp_path / "checkpoint"
    assert {"model", "optimizer.pt", "method.pt", "trainer_state.pt", "history.json"} <= set(os.listdir(ckpt))
    assert any(n.endswith(".safetensors") for n in os.listdir(ckpt / "model"))

    # a save that dies midway (after the model and optimizer are written) leaves the previous checkpoint
    method = GradDiff()
    calls = {"n": 0}

    def failing_state_dict():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return {"steps_done": method.steps_done}

    method.state_dict = failing_state_dict
    f, r = loaders()
    out = str(tmp_path / "second")
    with pytest.raises(RuntimeError, match="disk full"):
        Unlearner(tiny_llama(), method, f, r, max_steps=4, save_every=1, out_dir=out, progress=False).run()
    assert os.listdir(out) == ["checkpoint"]
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 1
    # ... and it resumes from there
    f, r = loaders()
    res = Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=4, out_dir=out, resume=True, progress=False).run()
    assert res["step"] == 4


def test_resume_uses_old_checkpoint_after_crash_between_renames(tmp_path):
    f, r = loaders()
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=2, out_dir=str(tmp_path), save_every=2, progress=False).run()
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    f, r = loaders()
    u = Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=3, out_dir=str(tmp_path), resume=True, progress=False)
    assert u.run()["step"] == 3
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_final_checkpoint_is_opt_in(tmp_path):
    f, r = loaders()
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=2, out_dir=str(tmp_path / "plain"), progress=False).run()
    assert not (tmp_path / "plain").exists() or not os.listdir(tmp_path / "plain")
    f, r = loaders()
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=3, out_dir=str(tmp_path / "ckpt"), save_every=2,
              progress=False).run()
    state = torch.load(tmp_path / "ckpt" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3  # the last step's checkpoint, beside the periodic ones


def test_eval_and_stop_when():
    model = tiny_llama()
    start = forget_nll(model)
    f, r = loaders()
    out = Unlearner(model, GradDiff(), f, r, max_steps=50, eval_fn=lambda m: {"forget_nll": forget_nll(m)},
                    eval_every=1, stop_when=lambda m: m["forget_nll"] > start + 1.0, progress=False).run()
    assert out["stopped_early"] and out["stop_reason"] == "stop_when"
    assert out["step"] < 50
    assert [h["step"] for h in out["history"]] == list(range(1, out["step"] + 1))
    assert out["metrics"]["forget_nll"] > start + 1.0

    f, r = loaders()
    out = Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=3, eval_fn=lambda m: {"x": 1.0}, eval_every=2,
                    progress=False).run()
    assert [h["step"] for h in out["history"]] == [2, 3]  # periodic, and at the end


def test_bf16_autocast_on_cpu_runs():
    f, r = loaders()
    out = Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=1, autocast_dtype="bf16", progress=False).run()
    assert out["step"] == 1 and torch.isfinite(torch.tensor(out["train_loss"])).all()


def test_errors(tmp_path):
    model, (f, r) = tiny_llama(), loaders()
    with pytest.raises(ValueError, match="empty"):
        Unlearner(model, GradDiff(), DataLoader([]), r, max_steps=1)
    with pytest.raises(ValueError, match="stopping rule"):
        Unlearner(model, GradDiff(), f, r)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="grad_accum"):
            Unlearner(model, GradDiff(), f, r, max_steps=1, grad_accum=bad)
    with pytest.raises(ValueError, match="retain"):
        Unlearner(model, GradDiff(), f, None, max_steps=1)
    with pytest.raises(ValueError, match="autocast_dtype"):
        Unlearner(model, GradDiff(), f, r, max_steps=1, autocast_dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            Unlearner(model, GradDiff(), f, r, max_steps=1, autocast_dtype="fp16")
    with pytest.raises(ValueError, match="out_dir"):
        Unlearner(model, GradDiff(), f, r, max_steps=1, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Unlearner(model, GradDiff(), f, r, max_steps=1, out_dir=str(tmp_path), resume=True, progress=False).run()
    with pytest.raises(TypeError):
        Unlearner(model, object(), f, r, max_steps=1)


class ScheduledGradDiff(GradDiff):
    """Test-only: a step-dependent learning rate and a per-step metric (the lr it saw)."""

    def lr_factor(self, step, total_steps):
        return (step + 1) / total_steps

    def before_step(self, model, optimizer, forget_batch, step):
        self.seen_lr = optimizer.param_groups[0]["lr"]

    def step_metrics(self):
        return {"lr": self.seen_lr}


def test_method_lr_schedule_and_step_metrics_resume_exactly(tmp_path):
    kw = dict(max_steps=6, progress=False)
    ref_model = tiny_llama()
    ref = Unlearner(ref_model, ScheduledGradDiff(lr=1e-2), *loaders(), **kw)
    out = ref.run()
    assert [m["lr"] for m in out["step_metrics"]] == pytest.approx([1e-2 * (s + 1) / 6 for s in range(6)])
    assert [m["step"] for m in out["step_metrics"]] == [1, 2, 3, 4, 5, 6]
    assert ref.optimizer.param_groups[0]["initial_lr"] == 1e-2

    with pytest.raises(KeyboardInterrupt):  # the same budget (the schedule depends on it), stopped after step 4
        Unlearner(tiny_llama(), ScheduledGradDiff(lr=1e-2, fail_at_step=4), *loaders(), out_dir=str(tmp_path),
                  save_every=3, **kw).run()
    model = tiny_llama()
    resumed = Unlearner(model, ScheduledGradDiff(lr=1e-2), *loaders(), out_dir=str(tmp_path), save_every=3,
                        resume=True, **kw)
    again = resumed.run()
    assert again["step_metrics"] == out["step_metrics"]
    assert_same_state(ref_model, model, ref.optimizer, resumed.optimizer)


def test_keep_best_keeps_the_best_evaluated_model(tmp_path):
    from simu_fast.training.checkpoints import load_model
    values = iter([0.5, 0.9, 0.7, 0.2])  # the metric at steps 1..4: the best (max) is step 2
    snapshots = {}

    def eval_fn(model):
        step = len(snapshots) + 1
        snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"score": next(values)}
    f, r = loaders()
    result = Unlearner(tiny_llama(), GradDiff(lr=1e-2), f, r, max_steps=4, eval_fn=eval_fn, eval_every=1,
                       keep_best="max:score", out_dir=str(tmp_path), progress=False).run()
    assert result["best"] == {"step": 2, "metric": "score", "mode": "max", "value": 0.9}
    best = tiny_llama()
    load_model(best, str(tmp_path / "best"))
    assert all(torch.equal(best.state_dict()[k], snapshots[2][k]) for k in snapshots[2])
    assert not torch.equal(snapshots[2]["lm_head.weight"], snapshots[4]["lm_head.weight"])
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no temporary directory; no checkpoint (not asked for)
    f, r = loaders()
    with pytest.raises(ValueError, match="has no metric 'nope'"):
        Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=1, eval_fn=lambda m: {"score": 1.0}, eval_every=1,
                  keep_best="nope", out_dir=str(tmp_path / "x"), progress=False).run()
    with pytest.raises(ValueError, match="keep_best must be"):
        Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=1, eval_fn=lambda m: {}, keep_best="best:score",
                  out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="needs an eval_fn"):
        Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=1, keep_best="score", out_dir=str(tmp_path))


def test_a_finite_clipping_norm_spares_the_optimizer_its_nonfinite_pass(monkeypatch):
    """With clipping, a finite total norm proves every gradient finite: the loop tells SophiaG
    (step(grads_finite=True)) and its non-finite pass does not run; without clipping it runs every step; a
    NaN gradient is still caught (the norm is NaN, so the optimizer checks and raises)."""
    from simu_fast.methods.soul import SOGradDiff
    from simu_fast.optim.masked_optimizer import MaskedOptimizer, NonFiniteGradientError
    calls = []
    real = MaskedOptimizer._grads_are_finite
    monkeypatch.setattr(MaskedOptimizer, "_grads_are_finite", lambda self: calls.append(1) or real(self))
    Unlearner(tiny_llama(), SOGradDiff(lr=1e-3), *loaders(), max_steps=3, progress=False).run()
    assert calls == []
    Unlearner(tiny_llama(), SOGradDiff(lr=1e-3), *loaders(), max_steps=3, max_grad_norm=None, progress=False).run()
    assert len(calls) == 3

    class NaNLoss(SOGradDiff):
        def loss(self, model, forget_batch, retain_batch):
            return super().loss(model, forget_batch, retain_batch) * float("nan")
    with pytest.raises(NonFiniteGradientError):
        Unlearner(tiny_llama(), NaNLoss(lr=1e-3), *loaders(), max_steps=1, progress=False).run()


class ReportingGradDiff(GradDiff):
    """GradDiff that reports a number and a non-number per step (only numbers go on a progress line)."""

    def step_metrics(self):
        return {"reg_ratio": 0.25 * self.steps_done, "note": "not a number"}


def progress_lines(text):
    return [line for line in text.splitlines() if line.startswith("unlearning: step ")]


def test_progress_lines_one_per_step_with_the_run_s_numbers(capsys):
    f, r = loaders()
    evals = lambda m: {"retain_nll": 1.0, "forget_nll": forget_nll(m)}  # noqa: E731
    out = Unlearner(tiny_llama(), ReportingGradDiff(), f, r, max_steps=3, eval_fn=evals, eval_every=1,
                    progress="lines", progress_every_s=0).run()
    captured = capsys.readouterr()
    lines = progress_lines(captured.err)
    assert len(lines) == 3 and not progress_lines(captured.out)  # to stderr, one per step, no repeat at the end
    for step, line in enumerate(lines, 1):
        assert line.startswith(f"unlearning: step {step}/3 ({100 * step // 3}%)  loss ")
        assert f"loss {out['train_loss'][step - 1]:.4f}" in line
        # the forget score (not the first metric), at the step it was evaluated
        assert f"forget_nll {out['history'][step - 1]['forget_nll']:.4g} (at step {step})" in line
        assert "retain_nll" not in line and "note" not in line
        assert f"  reg_ratio {0.25 * step:.4g}  " in line
        assert "elapsed " in line and ("left ~" in line) == (step < 3)


def test_progress_lines_show_sophias_win_rate(capsys):
    from simu_fast.methods.soul import SOGradDiff
    f, r = loaders()
    Unlearner(tiny_llama(), SOGradDiff(lr=1e-3), f, r, max_steps=2, progress="lines", progress_every_s=0).run()
    lines = progress_lines(capsys.readouterr().err)
    assert len(lines) == 2 and all("  win_rate " in line for line in lines)


def test_progress_lines_at_the_first_and_last_step_only_when_the_interval_is_long(capsys):
    f, r = loaders()
    evals = lambda m: {"forget_nll": forget_nll(m)}  # noqa: E731
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=4, eval_fn=evals, eval_every=3, progress="lines",
              progress_every_s=1e9).run()
    lines = progress_lines(capsys.readouterr().err)
    assert [line.split()[2] for line in lines] == ["1/4", "4/4"]
    assert "forget_nll" not in lines[0] and "(at step 4)" in lines[1]  # the last line: the final evaluation


def test_progress_auto_prints_lines_off_a_terminal_and_false_prints_nothing(capsys):
    f, r = loaders()
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=2, progress="auto", progress_every_s=0).run()
    assert len(progress_lines(capsys.readouterr().err)) == 2  # pytest's captured stderr is not a terminal
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=2, progress=False, progress_every_s=0).run()
    assert capsys.readouterr() == ("", "")
    Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=2, progress=True, progress_every_s=0).run()
    err = capsys.readouterr().err
    assert "2/2" in err and not progress_lines(err)  # True: the tqdm bar, as before
    with pytest.raises(ValueError, match="progress must be"):
        Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=1, progress="loud")
    with pytest.raises(ValueError, match="progress_every_s"):
        Unlearner(tiny_llama(), GradDiff(), f, r, max_steps=1, progress="lines", progress_every_s=-1)
