"""Batched integrated gradients over MLP neurons (DESIGN.md, "Integrated gradients over MLP neurons").

    IG[l, k] = sum over examples, positions t in P:  a_l[t, k] * sum_j w_j * dF_l(alpha_j) / da'_l[t, k]

One forward/backward serves many (example, layer, step) work items: each batch row carries its own scale
per layer, so row r sees only its own layer scaled by its own alpha (exact per-layer IG). A forward
pre-hook on every down projection scales its input; a tensor hook on the scaled activation receives the
gradient during backward and folds `w * a * grad` over positions into the float32 [L, F] buffer with the
fused ig_accumulate kernel. Weights get no gradients. Rows are ordered by layer, so each layer's rows are a
contiguous slice: the hook keeps and reads only that slice. `max_rows` caps rows per pass.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from ..ops.ig_accumulate import ig_accumulate
from .architectures import MlpModulesFn, intermediate_size, mlp_down_projections, model_type_of
from .batches import prepare_batch
from .model_state import attribution_mode
from .quadrature import RULES, quadrature
from .scores import NeuronScores
from .targets import POSITIONS, TARGETS, logits_of, position_mask, target_per_row

METHODS = ("ig", "gradxact")


class NeuronAttributor:
    def __init__(self, model: torch.nn.Module, layers: Optional[list] = None, steps: int = 5,
                 rule: str = "riemann_right", target: str = "loss", positions: str = "answer",
                 max_rows: Optional[int] = None, backend: str = "auto", method: str = "ig",
                 mlp_modules: Optional[MlpModulesFn] = None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.modules = mlp_down_projections(model, mlp_modules)
        self.layers = list(range(len(self.modules))) if layers is None else [int(l) for l in layers]
        for layer in self.layers:
            if not 0 <= layer < len(self.modules):
                raise ValueError(f"layer {layer} out of range: the model has {len(self.modules)} MLP layers")
        widths = {intermediate_size(self.modules[l]) for l in self.layers}
        if len(widths) != 1:
            raise ValueError(f"the chosen layers have different MLP widths {sorted(widths)}; attribute them separately")
        self.width = widths.pop()
        self.method, self.rule, self.target, self.positions = method, rule, target, positions
        self.steps = 1 if method == "gradxact" else steps
        self.alphas, self.weights = ([1.0], [1.0]) if method == "gradxact" else quadrature(rule, steps)
        self.max_rows = max_rows
        self.backend = backend

    def attribute(self, batches: Iterable[dict], progress: bool = True) -> NeuronScores:
        device = next(self.model.parameters()).device
        scores = torch.zeros(len(self.layers), self.width, dtype=torch.float32, device=device)
        examples = 0
        total = len(batches) if hasattr(batches, "__len__") else None
        with attribution_mode(self.model):
            for batch in tqdm(batches, total=total, desc="attribution", disable=not progress, leave=False):
                ids, attn, labels = prepare_batch(batch, device)
                examples += ids.shape[0]
                for rows in self._passes(ids.shape[0]):
                    self._run_pass(rows, ids, attn, labels, scores)
        name = getattr(getattr(self.model, "config", None), "_name_or_path", "") or model_type_of(self.model) or ""
        metadata = dict(model=name, steps=self.steps, rule=self.rule if self.method == "ig" else "none",
                        target=self.target, positions=self.positions, method=self.method, examples=examples)
        return NeuronScores(scores, list(self.layers), metadata)

    def _passes(self, batch_size: int) -> list[list[tuple[int, int, int]]]:
        """Work items (layer slot, step, example) ordered by layer, split into as few equal passes as fit."""
        work = [(li, j, b) for li in range(len(self.layers)) for j in range(len(self.alphas)) for b in range(batch_size)]
        cap = self.max_rows or len(work)
        n_passes = math.ceil(len(work) / cap)
        size = math.ceil(len(work) / n_passes)
        return [work[i:i + size] for i in range(0, len(work), size)]

    def _run_pass(self, rows, ids, attn, labels, scores) -> None:
        device = ids.device
        example = torch.tensor([b for _, _, b in rows], device=device)
        ids_r, attn_r, labels_r = ids[example], attn[example], labels[example]
        pos = position_mask(labels_r, attn_r, self.positions)
        row_weight = torch.tensor([self.weights[j] for _, j, _ in rows], dtype=torch.float32, device=device)
        slices: dict[int, tuple[int, int]] = {}
        for r, (li, _, _) in enumerate(rows):
            lo, _ = slices.get(li, (r, r))
            slices[li] = (lo, r + 1)
        hooks, handles = [], []
        for li, (lo, hi) in slices.items():
            alphas = torch.tensor([self.alphas[j] for _, j, _ in rows[lo:hi]], dtype=torch.float32, device=device)
            hook = _ScaleAndAccumulate(lo, hi, alphas, row_weight[lo:hi], pos[lo:hi], scores[li], self.backend)
            hooks.append(hook)
            handles.append(self.modules[self.layers[li]].register_forward_pre_hook(hook))
        try:
            with torch.enable_grad():
                kwargs = {"use_cache": False} if getattr(getattr(self.model, "config", None), "use_cache", None) else {}
                out = self.model(input_ids=ids_r, attention_mask=attn_r, **kwargs)
                total = target_per_row(logits_of(out), labels_r, self.target).sum()
                leaves = [h.leaf for h in hooks if h.leaf is not None]
                if not leaves:
                    raise RuntimeError("attribution: the forward pass never reached a hooked MLP activation")
                # The backward runs the tensor hooks, which fold each layer's gradient into the scores.
                torch.autograd.grad(total, leaves, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()


class _ScaleAndAccumulate:
    """Forward pre-hook: scale rows lo:hi of the activation by their alphas; on backward, fold their
    `w * a * grad` into the layer's score row."""

    def __init__(self, lo, hi, alphas, weight, pos, out, backend):
        self.lo, self.hi, self.alphas, self.weight, self.pos, self.out = lo, hi, alphas, weight, pos, out
        self.backend = backend
        self.leaf = None

    def __call__(self, module, args):
        a = args[0]
        kept = a[self.lo:self.hi].detach()
        if self.hi - self.lo < a.shape[0]:
            kept = kept.clone()  # a view would keep the whole activation of every row alive
        scale = torch.ones(a.shape[0], dtype=a.dtype, device=a.device)
        scale[self.lo:self.hi] = self.alphas.to(a.dtype)
        scaled = a * scale[:, None, None]
        if not scaled.requires_grad:
            # The first hooked layer: nothing upstream carries a gradient (weights are frozen), so the
            # scaled activation becomes the leaf that every later hooked activation depends on.
            scaled.requires_grad_()
            self.leaf = scaled

        def accumulate(grad):
            ig_accumulate(self.out, kept, grad[self.lo:self.hi], self.weight, self.pos, backend=self.backend)

        scaled.register_hook(accumulate)
        return (scaled,) + tuple(args[1:])
