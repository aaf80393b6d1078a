"""transformers.Trainer integration: run an UnlearningMethod (simu_fast.methods) under the Hugging Face Trainer.

    dataset = PairedUnlearningDataset(forget_features, retain_features)
    trainer = UnlearningTrainer(method=make_method("npo", lr=1e-5), model=model, args=args,
                                train_dataset=dataset, data_collator=PairedCollator(tokenizer.pad_token_id))
    trainer.train()

The method owns the optimizer (its own learning rate; args.learning_rate is not used, but the Trainer's
scheduler still scales the method's rate), the loss, and what it does around each optimizer step. Its setup()
runs once, at the start of train(), over loaders built from the dataset's forget and retain features.
TrainingArguments must have remove_unused_columns=False (the batches are {"forget": ..., "retain": ...}).

Clipping (args.max_grad_norm) follows the Unlearner's rule (training.unlearner.clip_gradients): the method's
before_step runs first (Ssiuu's regularizer is clipped with the loss's gradient), then the norm of what trains is
clipped: the model's parameters under the optimizer's masks (SIMU's selected columns, not the frozen ones) and
the method's detached parameters (SIMU's compact neuron slices). It takes over the Trainer's clipping step
(`Trainer._clip_grad_norm`, transformers versions that have it), except under DeepSpeed, XLA and FSDP1, whose
engines clip their flat parameters themselves (there, and on older transformers, the Trainer's own clipping
of the model's parameters applies and SIMU's compact slices are not clipped).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from ..data.collate import collate
from ..methods.base import UnlearningMethod
from ..training.unlearner import clip_gradients

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
    """Calls method.before_step before each optimizer step (before clipping where the trainer clips: see the
    module docstring), method.after_step after it (and zero_grad; the method's detached parameters, SIMU's compact
    slices, have their gradients reset too: the Trainer's model.zero_grad() does not reach them), and
    method.finish at the end of training."""

    def __init__(self, trainer: "UnlearningTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._before_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        for p in t.method.detached_parameters():  # the Trainer zeroes the model's gradients only (model.zero_grad)
            p.grad = None
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
        self._before_step_done = False  # this step's before_step already ran (in _clip_grad_norm)
        self.add_callback(UnlearningCallback(self))

    def _before_step(self, step: int) -> None:
        """method.before_step from the pre-optimizer-step callback, unless _clip_grad_norm ran it for this step."""
        if self._before_step_done:
            self._before_step_done = False
            return
        self.method.before_step(self.model, self._method_optimizer, self._last_forget_batch, step)

    def _clip_grad_norm(self, model):
        """The Trainer's clipping step (transformers calls it when max_grad_norm > 0, before the pre-optimizer-step
        callbacks): before_step, then clip_gradients over what trains, as the Unlearner (module docstring)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if (acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA)
                or (acc.distributed_type == DistributedType.FSDP and not getattr(acc, "is_fsdp2", False))):
            return super()._clip_grad_norm(model)
        acc.unscale_gradients()  # fp16: as accelerate's clip_grad_norm_ does first
        self.method.before_step(self.model, self._method_optimizer, self._last_forget_batch, self.state.global_step)
        self._before_step_done = True
        return clip_gradients([p for p in model.parameters() if p.grad is not None],
                              [p for p in self.method.detached_parameters() if p.grad is not None],
                              self.args.max_grad_norm, optimizer=self._method_optimizer)

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
