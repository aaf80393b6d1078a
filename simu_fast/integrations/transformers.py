"""transformers.Trainer integration: run an UnlearningMethod (simu_fast.methods) under the Hugging Face Trainer.

    dataset = PairedUnlearningDataset(forget_features, retain_features)
    trainer = UnlearningTrainer(method=make_method("npo", lr=1e-5), model=model, args=args,
                                train_dataset=dataset, data_collator=PairedCollator(tokenizer.pad_token_id))
    trainer.train()

The method owns the optimizer (its own learning rate; args.learning_rate is not used, but the Trainer's
scheduler still scales the method's rate), the loss, and what it does around each optimizer step. Its setup()
runs once, at the start of train(), over loaders built from the dataset's forget and retain features.
TrainingArguments must have remove_unused_columns=False (the batches are {"forget": ..., "retain": ...}).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from ..data.collate import collate
from ..methods.base import UnlearningMethod

__all__ = ["PairedUnlearningDataset", "PairedCollator", "UnlearningTrainer", "UnlearningCallback"]


class PairedUnlearningDataset(torch.utils.data.Dataset):
    """Item i = {"forget": forget_features[i], "retain": retain_features[i % len(retain)]} ("retain" absent
    without retain features). Features are tokenize_examples dicts (input_ids, labels, optional example_index)."""

    def __init__(self, forget_features, retain_features=None):
        self.forget_features = list(forget_features)
        if not self.forget_features:
            raise ValueError("PairedUnlearningDataset needs at least one forget feature")
        self.retain_features = None if retain_features is None else list(retain_features)
        if self.retain_features is not None and not self.retain_features:
            raise ValueError("retain_features is empty (pass None for no retain set)")

    def __len__(self):
        return len(self.forget_features)

    def __getitem__(self, i):
        item = {"forget": self.forget_features[i]}
        if self.retain_features is not None:
            item["retain"] = self.retain_features[i % len(self.retain_features)]
        return item


class PairedCollator:
    """Collate a list of paired items into {"forget": batch, "retain": batch} ("retain" only when every item has
    one); each batch is simu_fast.data.collate's, plus "example_index" when every feature carries one (so
    recipes that key rows, NPO and IMU, match them by index)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def _one(self, features):
        batch = collate(features, self.pad_token_id)
        if all(isinstance(f, dict) and "example_index" in f for f in features):
            batch["example_index"] = torch.as_tensor([int(f["example_index"]) for f in features], dtype=torch.long)
        return batch

    def __call__(self, items):
        items = list(items)
        if not items:
            raise ValueError("PairedCollator got an empty batch")
        out = {"forget": self._one([it["forget"] for it in items])}
        if all("retain" in it and it["retain"] is not None for it in items):
            out["retain"] = self._one([it["retain"] for it in items])
        return out


class UnlearningCallback(TrainerCallback):
    """Calls method.before_step before each optimizer step, method.after_step after it (and zero_grad), and
    method.finish at the end of training. The Trainer's gradient clipping (max_grad_norm) covers the model's
    parameters only: SIMU's compact neuron slices (method.detached_parameters()) are not clipped under the
    Trainer (the Unlearner clips them with the model's)."""

    def __init__(self, trainer: "UnlearningTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        t.method.before_step(t.model, t._method_optimizer, t._last_forget_batch, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.method.after_step(t.model, t._method_optimizer, t._last_forget_batch, state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.method.finish(self.trainer.model)  # SIMU's neuron slices come off the model


class UnlearningTrainer(Trainer):
    """A Trainer whose optimizer, loss and per-step hooks come from `method` (an UnlearningMethod)."""

    def __init__(self, *args, method: UnlearningMethod, **kwargs):
        if not isinstance(method, UnlearningMethod):
            raise TypeError(f"method must be an UnlearningMethod (simu_fast.methods.make_method), got {type(method)!r}")
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("UnlearningTrainer needs TrainingArguments(remove_unused_columns=False): the batches are "
                             "{'forget': ..., 'retain': ...} and the Trainer would drop those columns")
        self.method = method
        self._method_optimizer: Optional[torch.optim.Optimizer] = None
        self._last_forget_batch: Optional[dict] = None
        self._method_ready = False
        self.add_callback(UnlearningCallback(self))

    def _setup_loaders(self):
        ds = self.train_dataset
        if not isinstance(ds, PairedUnlearningDataset):
            raise TypeError("UnlearningTrainer.train needs train_dataset to be a PairedUnlearningDataset "
                            "(or call method.setup yourself and set trainer._method_ready = True)")
        collator = self.data_collator
        if not isinstance(collator, PairedCollator):
            raise TypeError("UnlearningTrainer needs data_collator=PairedCollator(pad_token_id)")
        bs = self.args.per_device_train_batch_size

        def loader(features):
            return torch.utils.data.DataLoader(list(features), batch_size=bs, shuffle=False,
                                               collate_fn=collator._one)

        forget = loader(ds.forget_features)
        retain = loader(ds.retain_features) if ds.retain_features is not None else None
        return forget, retain

    def train(self, *args, **kwargs):
        if not self._method_ready:
            forget, retain = self._setup_loaders()
            if self.method.uses_retain and retain is None:
                raise ValueError(f"method {self.method.name!r} needs retain features in the dataset")
            was_training = self.model.training
            self.method.setup(self.model, forget, retain)
            self.model.train(was_training)
            self._method_ready = True
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._method_optimizer = self.method.make_optimizer(self.model if model is None else model)
            self.optimizer = self._method_optimizer
        elif self._method_optimizer is None:
            self._method_optimizer = self.optimizer
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "forget" not in inputs:
            raise ValueError("UnlearningTrainer batches must hold 'forget' (use PairedCollator and "
                             "remove_unused_columns=False)")
        forget = inputs["forget"]
        retain = inputs.get("retain") if self.method.uses_retain else None
        if self.method.uses_retain and retain is None:
            raise ValueError(f"method {self.method.name!r} needs a 'retain' batch (give the dataset retain features)")
        self._last_forget_batch = forget
        loss = self.method.loss(model, forget, retain)
        return (loss, None) if return_outputs else loss
