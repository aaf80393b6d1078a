"""UnlearningTrainer (simu_fast.integrations.transformers): every recipe trained 3 steps under the Hugging Face
Trainer on a tiny random Llama raises the forget NLL; the paired dataset/collator; remove_unused_columns error."""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainingArguments  # noqa: E402

from simu_fast.integrations.transformers import PairedCollator, PairedUnlearningDataset, UnlearningTrainer  # noqa: E402
from simu_fast.methods import answer_nll, make_method  # noqa: E402

import importlib.util  # noqa: E402
from tiny_models import tiny_llama as shared_tiny_llama

# transformers.Trainer needs accelerate (the "hf" extra does not pull it in)
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers.Trainer needs accelerate")

VOCAB = 61
PAD = 0


def tiny_llama(seed=0):
    return shared_tiny_llama(VOCAB, seed)


def make_features(seed, rows=4, start=0):
    """Hand-made tokenize_examples-style features: prompt (3 tokens) labelled -100, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        n = 10 - (i % 3)
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "example_index": start + i})
    return out


FORGET = make_features(1)
RETAIN = make_features(2, start=100)

CASES = {
    "ga": dict(lr=1e-2),
    "graddiff": dict(lr=1e-2),
    "npo": dict(lr=1e-2),
    "fo-graddiff": dict(lr=1e-2),
    "so-graddiff": dict(lr=1e-2, hessian_every=2),
    "ssiuu": dict(lr=1e-2, lam=1.0),
    "simu": dict(lr=1e-2, fraction=0.2, ig_steps=3, hessian_every=2),
    "imu": dict(lr=1e-2),
}


def forget_nll(model):
    batch = PairedCollator(PAD)([{"forget": f} for f in FORGET])["forget"]
    model.eval()
    with torch.no_grad():
        return float(answer_nll(model, batch, "mean").mean())


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                report_to=[], save_strategy="no", logging_strategy="no", remove_unused_columns=False, use_cpu=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_paired_dataset_and_collator():
    ds = PairedUnlearningDataset(FORGET, RETAIN[:3])
    assert len(ds) == 4
    assert ds[3]["forget"] is FORGET[3] and ds[3]["retain"] is RETAIN[0]
    batch = PairedCollator(PAD)([ds[0], ds[1]])
    assert batch["forget"]["input_ids"].shape == (2, 10)
    assert batch["forget"]["labels"][1, -1].item() == -100  # row 1 is 9 long, padded
    assert batch["retain"]["example_index"].tolist() == [100, 101]
    no_retain = PairedCollator(PAD)([PairedUnlearningDataset(FORGET)[0]])
    assert set(no_retain) == {"forget"}


@needs_accelerate
@pytest.mark.parametrize("name", list(CASES))
def test_trainer_raises_forget_nll(name, tmp_path):
    model = tiny_llama()
    before = forget_nll(model)
    method = make_method(name, **CASES[name])
    trainer = UnlearningTrainer(method=method, model=model, args=make_args(tmp_path),
                                train_dataset=PairedUnlearningDataset(FORGET, RETAIN),
                                data_collator=PairedCollator(PAD))
    out = trainer.train()
    assert trainer.state.global_step == 3
    assert torch.isfinite(torch.tensor(out.training_loss))
    after = forget_nll(trainer.model)
    assert after > before, (name, before, after)


@needs_accelerate
def test_remove_unused_columns_error(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        UnlearningTrainer(method=make_method("ga"), model=tiny_llama(),
                          args=make_args(tmp_path, remove_unused_columns=True),
                          train_dataset=PairedUnlearningDataset(FORGET), data_collator=PairedCollator(PAD))


@needs_accelerate
def test_hooks_setup_and_optimizer(tmp_path):
    """setup runs once over the dataset's features, the method's optimizer is used, and before_step/after_step
    see steps 0..2 with the forget batch."""
    from simu_fast.methods import GA

    calls = []

    class Recording(GA):
        def setup(self, model, forget_loader, retain_loader=None):
            calls.append(("setup", sum(b["input_ids"].shape[0] for b in forget_loader), retain_loader))

        def make_optimizer(self, model):
            self.opt = super().make_optimizer(model)
            return self.opt

        def before_step(self, model, optimizer, forget_batch, step):
            assert optimizer is self.opt and forget_batch["input_ids"].shape[0] == 2
            assert any(p.grad is not None for p in model.parameters())
            calls.append(("before", step))

        def after_step(self, model, optimizer, forget_batch, step):
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
            calls.append(("after", step))

    trainer = UnlearningTrainer(method=Recording(lr=1e-2), model=tiny_llama(), args=make_args(tmp_path),
                                train_dataset=PairedUnlearningDataset(FORGET), data_collator=PairedCollator(PAD))
    trainer.train()
    assert calls == [("setup", 4, None), ("before", 0), ("after", 0), ("before", 1), ("after", 1),
                     ("before", 2), ("after", 2)]
