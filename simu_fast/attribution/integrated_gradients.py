"""Batched integrated gradients over MLP neurons (docs/DESIGN.md, "Integrated gradients over MLP neurons").

    IG[l, k] = sum over examples, positions t in P:  a_l[t, k] * sum_j w_j * dF_l(alpha_j) / da'_l[t, k]

One forward/backward serves many (example, layer, step) work items: each batch row carries its own scale
per layer, so row r sees only its own layer scaled by its own alpha (exact per-layer IG). A forward
pre-hook on every down projection scales its input; a tensor hook on the scaled activation receives the
gradient during backward and folds `w * a * grad` over positions into the float32 [L, F] buffer with the
fused ig_accumulate kernel. Weights get no gradients. Rows are ordered by layer, so each layer's rows are a
contiguous slice: the hook keeps and reads only that slice. `max_rows` caps rows per pass.

positions="last" (attribution/targets.py): one row per (layer, step, answer token): the row keeps its example up
to that token, its target is that token alone, and its activation is scaled at the position that predicts the
token only (the scale is per row and per position), where IG is read. That is answer-tokens times the rows of
the other modes, so without max_rows a batch's rows are split into passes of the size the other modes' pass
has (batch x layers x steps rows). The shared-prefix scheme does not apply (its alpha = 1 base row would score
every answer token at once): the row scheme runs.

A pass over a DataLoader leaves its shuffle generator(s) and torch's global RNG as it found them
(data.loader_rng.loader_rng_kept): attributing over the training loaders does not change the batches training sees.

Distributed (DDP, FSDP2, or plain replicas in a torch.distributed job). Each rank attributes the batches it is
given (its share of the data); then the [L, F] scores and the example count are all-reduced (SUM) across
`group` (default: the default group, whenever torch.distributed is initialized with more than one rank), so
every rank returns the same NeuronScores, equal to one process's scores on the union of the data (up to
float32 summation order). attribute() is then a collective: every rank of the group must call it.
- DDP: the MLP modules are found in model.module and the passes call model.module: DDP's own forward would
  only add buffer broadcasts (collectives that would require equal pass counts on every rank), and as no
  weight gradient is computed its reducer has nothing to do.
- FSDP2 (fully_shard): the passes call the root module, whose forward and backward all-gather the parameter
  shards. Those are collectives, so every rank must run the same sequence of passes with the same backward
  structure: before each pass the ranks agree (one all-reduce of a flag) whether any rank still has work; a
  rank without work runs an empty pass (one two-token row, no answer positions: it adds exactly 0), and the
  backward is always taken down to the input embeddings (a leaf made there), so it runs through every layer
  on every rank whatever layers a pass hooks.
all_reduce=False keeps each rank's own scores (the passes of an FSDP2 model still run in lock step).
"""
from __future__ import annotations

import inspect
import math
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from .. import distributed as _dist
from ..lm import IGNORE_INDEX, logits_of
from ..ops.ig_accumulate import ig_accumulate
from .architectures import MlpModulesFn, decoder_layers, intermediate_size, mlp_down_projections, model_type_of
from ..data.loader_rng import loader_rng_kept
from .batches import prepare_batch
from .model_state import attribution_mode
from .quadrature import RULES, quadrature
from .scores import NeuronScores
from .targets import POSITIONS, TARGETS, answer_token_positions, position_mask, target_per_row

ATTRIBUTION_METHODS = ("ig", "gradxact")
SCHEMES = ("auto", "shared_prefix", "rows")


class NeuronAttributor:
    def __init__(self, model: torch.nn.Module, layers: Optional[list] = None, steps: int = 5,
                 rule: str = "riemann_right", target: str = "loss", positions: str = "answer",
                 max_rows: Optional[int] = None, backend: str = "auto", method: str = "ig",
                 mlp_modules: Optional[MlpModulesFn] = None, group=None, all_reduce: bool = True,
                 scheme: str = "auto"):
        if method not in ATTRIBUTION_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {ATTRIBUTION_METHODS}")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model  # the root: what the caller holds (maybe a DDP wrapper or an FSDP2-sharded model)
        self.module = _dist.unwrap_model(model)  # where the layers are (DDP: model.module)
        self.collective_forward = _dist.is_fsdp2(model)
        self._forward = self.model if self.collective_forward else self.module
        self.group, self.all_reduce = group, bool(all_reduce)
        self.modules = mlp_down_projections(self.module, mlp_modules)
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
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
        self.decoder_layers = None
        if scheme != "rows" and not self.collective_forward and mlp_modules is None:
            try:
                layers_ = decoder_layers(self.module)
            except ValueError:
                layers_ = None
            if layers_ is not None and len(layers_) == len(self.modules):
                self.decoder_layers = layers_
        if scheme == "shared_prefix" and self.decoder_layers is None:
            raise ValueError("scheme='shared_prefix' needs a registered architecture whose decoder layers hold the "
                             "MLPs, and a model that is not FSDP2-sharded; use scheme='rows'")
        if positions == "last":  # one row per answer token: no shared base row (module docstring)
            if scheme == "shared_prefix":
                raise ValueError("positions='last' runs the row scheme (scheme='rows' or 'auto')")
            self.decoder_layers = None
        self.scheme = "shared_prefix" if self.decoder_layers is not None else "rows"
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(self.module).forward).parameters

    def _reduces(self) -> bool:
        return self.all_reduce and _dist.is_initialized() and _dist.world_size(self.group) > 1

    def attribute(self, batches: Iterable[dict], progress: bool = True) -> NeuronScores:
        """Scores of `batches` (this rank's share in a distributed job; all-reduced: see the module docstring)."""
        device = next(self.module.parameters()).device
        scores = torch.zeros(len(self.layers), self.width, dtype=torch.float32, device=device)
        examples = 0
        total = len(batches) if hasattr(batches, "__len__") else None
        reduces = self._reduces()
        show = progress and (not reduces or _dist.rank(self.group) == 0)
        lockstep = self.collective_forward and _dist.is_initialized() and _dist.world_size(self.group) > 1

        def local_passes():
            nonlocal examples
            # tqdm gets a generator: tqdm.auto's asyncio tqdm calls iter() on an iterable in its __init__ and then
            # iterates it again (a DataLoader would start, and draw the order of, an epoch nobody reads)
            once = (batch for batch in batches)
            for batch in tqdm(once, total=total, desc="attribution", disable=not show, leave=False):
                ids, attn, labels = prepare_batch(batch, device)
                examples += ids.shape[0]
                if self.scheme == "shared_prefix":
                    for chosen, slots in self._prefix_passes(ids.shape[0]):
                        yield ("prefix", chosen, slots), ids, attn, labels
                    continue
                passes = (self._token_passes(answer_token_positions(labels, attn), ids.shape[0])
                          if self.positions == "last" else self._passes(ids.shape[0]))
                for rows in passes:
                    yield rows, ids, attn, labels

        with attribution_mode(self.module), loader_rng_kept(batches):
            work = local_passes()
            while True:
                item = next(work, None)
                if lockstep:
                    more = torch.tensor([0 if item is None else 1], dtype=torch.int32, device=device)
                    _dist.all_reduce_(more, "max", self.group)
                    if int(more.item()) == 0:
                        break
                    if item is None:
                        self._empty_pass(device, scores)
                        continue
                elif item is None:
                    break
                if isinstance(item[0], tuple) and item[0][0] == "prefix":
                    self._run_prefix_pass(item[0][1], item[0][2], *item[1:], scores)
                else:
                    self._run_pass(*item, scores)
        world = 1
        if reduces:
            count = torch.tensor([float(examples)], dtype=torch.float64, device=device)
            _dist.all_reduce_(scores, "sum", self.group)
            _dist.all_reduce_(count, "sum", self.group)
            examples, world = int(count.item()), _dist.world_size(self.group)
        name = (getattr(getattr(self.module, "config", None), "_name_or_path", "") or model_type_of(self.module)
                or "")
        metadata = dict(model=name, steps=self.steps, rule=self.rule if self.method == "ig" else "none",
                        target=self.target, positions=self.positions, method=self.method, examples=examples)
        if world > 1:
            metadata["world_size"] = world
        return NeuronScores(scores, list(self.layers), metadata)

    def _empty_pass(self, device, scores) -> None:
        """A pass that adds nothing (lock-step FSDP2 ranks without work): one row, no answer positions."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        self._run_pass([(li, 0, 0, -1) for li in range(len(self.layers))], ids, torch.ones_like(ids),
                       torch.full_like(ids, IGNORE_INDEX), scores)

    def _passes(self, batch_size: int) -> list[list[tuple[int, int, int, int]]]:
        """Work items (layer slot, step, example, -1: every position) ordered by layer, split into as few equal
        passes as fit."""
        work = [(li, j, b, -1) for li in range(len(self.layers)) for j in range(len(self.alphas))
                for b in range(batch_size)]
        return _split(work, self.max_rows or len(work))

    def _token_passes(self, token_positions: list, batch_size: int) -> list[list[tuple[int, int, int, int]]]:
        """positions="last": work items (layer slot, step, example, the position that predicts an answer token)
        ordered by layer; without max_rows, passes of at most the other modes' pass size (batch x layers x steps)."""
        work = [(li, j, b, t) for li in range(len(self.layers)) for j in range(len(self.alphas))
                for b, positions in enumerate(token_positions) for t in positions]
        if not work:
            return []
        return _split(work, self.max_rows or batch_size * len(self.layers) * len(self.alphas))

    def _branch_steps(self) -> tuple[Optional[int], list[int]]:
        """(the step with alpha = 1, or None; the other steps). The alpha = 1 step of every layer is the unscaled
        model itself, which the base rows of the shared-prefix scheme compute anyway."""
        shared = next((j for j, a in enumerate(self.alphas) if a == 1.0), None)
        return shared, [j for j in range(len(self.alphas)) if j != shared]

    def _prefix_passes(self, batch_size: int) -> list[tuple[list[int], list[int]]]:
        """(examples, layer slots) per shared-prefix pass. A pass gives each of its examples 1 + (steps with
        alpha < 1) x its layer slots rows; max_rows caps that total (examples split first, then layers)."""
        slots = sorted(range(len(self.layers)), key=lambda li: self.layers[li])
        m = len(self._branch_steps()[1])
        cap = self.max_rows or batch_size * (1 + m * len(slots))
        if 1 + m * len(slots) <= cap:
            per_pass = cap // (1 + m * len(slots))
            n_passes = math.ceil(batch_size / per_pass)
            size = math.ceil(batch_size / n_passes)
            return [(list(range(i, min(i + size, batch_size))), slots) for i in range(0, batch_size, size)]
        per_pass = max(1, (cap - 1) // max(1, m))
        n_chunks = math.ceil(len(slots) / per_pass)
        size = math.ceil(len(slots) / n_chunks)
        return [([b], slots[i:i + size]) for b in range(batch_size) for i in range(0, len(slots), size)]

    def _run_prefix_pass(self, examples, slots, ids, attn, labels, scores) -> None:
        """One pass of the shared-prefix scheme. Rows that scale layer l see the unscaled activations below l,
        which are every example's own unscaled forward: so the pass starts with one unscaled ("base") row per
        example and, at the input of each hooked decoder layer l, appends (steps with alpha < 1) x examples
        rows that copy the base rows' hidden states (detached: nothing below l needs their gradient); in l's
        MLP those rows are scaled by their alphas and become the leaves whose gradients are folded into the
        scores. The base rows are the alpha = 1 step of every layer at once (the gradient at layer l of the
        unscaled model), when the rule has that step (riemann_right, riemann_trapezoid, gradxact). Each row's
        forward is one the row scheme computes, so the scores are the same up to float32 summation order, with
        fewer rows: layer i runs examples x (1 + (steps - 1) x the hooked layers up to i) rows instead of
        examples x steps x all hooked layers. Batch-dimension inputs of the decoder layers (the attention
        mask) are expanded to the rows."""
        device = ids.device
        chosen = torch.tensor(examples, device=device)
        ids_e, attn_e, labels_e = ids[chosen], attn[chosen], labels[chosen]
        n_ex = len(examples)
        shared, branched = self._branch_steps()
        m = len(branched)
        alphas = torch.tensor([self.alphas[j] for j in branched], dtype=torch.float32, device=device)
        alphas = alphas.repeat_interleave(n_ex)
        weights = torch.tensor([self.weights[j] for j in branched], dtype=torch.float32, device=device)
        weights = weights.repeat_interleave(n_ex)
        base_weight = torch.full((n_ex,), self.weights[shared] if shared is not None else 0.0, device=device)
        base_pos = position_mask(labels_e, attn_e, self.positions)
        branch_pos = position_mask(labels_e.repeat(m, 1), attn_e.repeat(m, 1), self.positions)
        # each row's example: the base rows, then steps x examples more at each hooked layer, in layer order
        row_example = torch.cat([torch.arange(n_ex, device=device)] +
                                [torch.arange(n_ex, device=device).repeat(m)] * (len(slots) if m else 0))
        blocks: dict[int, tuple[int, int]] = {}
        by_layer = {self.layers[li]: li for li in slots}
        first = min(by_layer)
        handles, leaves = [], []

        def expand(module, args, kwargs, layer=None):
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer in by_layer and m:  # append this layer's rows: copies of the base rows, once per step
                lo = hidden.shape[0]
                hidden = torch.cat([hidden, hidden[:n_ex].detach().repeat(m, *([1] * (hidden.dim() - 1)))])
                blocks[by_layer[layer]] = (lo, hidden.shape[0])
            rows = row_example[:hidden.shape[0]]

            def per_row(v):  # an input with one entry per example (the attention mask): one per row
                return (v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == n_ex
                        else v)
            kwargs = {k: (v if k == "hidden_states" else per_row(v)) for k, v in kwargs.items()}
            if args:
                return (hidden,) + tuple(per_row(v) for v in args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        def fold(li, kept, weight, pos):
            def accumulate(grad):
                ig_accumulate(scores[li], kept, grad, weight, pos, backend=self.backend)
            return accumulate

        def scale(li):
            def hook(module, args):
                a = args[0]
                parts = [a[:n_ex]]
                if shared is not None:  # the base rows: this layer's alpha = 1 step
                    base = a[:n_ex] if a.requires_grad else a[:n_ex].detach().requires_grad_()
                    if base.is_leaf:
                        leaves.append(base)
                    base.register_hook(fold(li, a[:n_ex].detach(), base_weight, base_pos))
                    parts = [base]
                lo, hi = blocks.get(li, (a.shape[0], a.shape[0]))
                parts.append(a[n_ex:lo])
                if hi > lo:
                    kept = a[lo:hi].detach()
                    leaf = (kept * alphas.to(a.dtype)[:, None, None]).requires_grad_()
                    leaves.append(leaf)
                    leaf.register_hook(fold(li, kept, weights, branch_pos))
                    parts.append(leaf)
                return (torch.cat(parts + [a[hi:]]),) + tuple(args[1:])
            return hook

        for index, layer_module in enumerate(self.decoder_layers):
            if index >= first:
                handles.append(layer_module.register_forward_pre_hook(
                    lambda mod, args, kwargs, layer=index: expand(mod, args, kwargs, layer), with_kwargs=True))
        for li in slots:
            handles.append(self.modules[self.layers[li]].register_forward_pre_hook(scale(li)))
        row_labels = labels_e.index_select(0, row_example).clone()
        if shared is None:
            row_labels[:n_ex] = IGNORE_INDEX  # the base rows only carry the prefix: no target
        self._backward_through_hooks(handles, lambda: self._target(ids_e, attn_e, row_labels), lambda: leaves)

    def _backward_through_hooks(self, handles: list, forward_target, leaves_of) -> None:
        """forward_target() with gradients on, then the backward to leaves_of() that runs the tensor hooks
        folding each layer's gradient into the scores; the hooks come off either way."""
        try:
            with torch.enable_grad():
                total = forward_target()
                leaves = leaves_of()
                if not leaves:
                    raise RuntimeError("attribution: the forward pass never reached a hooked MLP activation")
                torch.autograd.grad(total, leaves, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()

    def _run_pass(self, rows, ids, attn, labels, scores) -> None:
        device = ids.device
        example = torch.tensor([b for _, _, b, _ in rows], device=device)
        ids_r, attn_r, labels_r = ids[example], attn[example], labels[example]
        at = None  # positions="last": the one position each row scales and reads
        if rows and rows[0][3] >= 0:
            at = torch.tensor([t for _, _, _, t in rows], device=device)
            width = int(at.max()) + 2  # nothing after the last row's answer token matters (causal attention)
            ids_r, attn_r = ids_r[:, :width], attn_r[:, :width]
            r = torch.arange(len(rows), device=device)
            token_labels = torch.full_like(labels_r[:, :width], IGNORE_INDEX)
            token_labels[r, at + 1] = labels_r[r, at + 1]  # each row's target: its own answer token
            labels_r = token_labels
            pos = torch.zeros_like(labels_r, dtype=torch.bool)
            pos[r, at] = True
        else:
            pos = position_mask(labels_r, attn_r, self.positions)
        row_weight = torch.tensor([self.weights[j] for _, j, _, _ in rows], dtype=torch.float32, device=device)
        slices: dict[int, tuple[int, int]] = {}
        for r, (li, _, _, _) in enumerate(rows):
            lo, _ = slices.get(li, (r, r))
            slices[li] = (lo, r + 1)
        hooks, handles = [], []
        root_leaf = None
        if self.collective_forward:  # FSDP2: backward through every layer on every rank (see the docstring)
            embeddings = self._input_embeddings()

            def make_leaf(module, args, output):
                nonlocal root_leaf
                root_leaf = output.detach().requires_grad_()
                return root_leaf

            handles.append(embeddings.register_forward_hook(make_leaf))
        for li, (lo, hi) in slices.items():
            alphas = torch.tensor([self.alphas[j] for _, j, _, _ in rows[lo:hi]], dtype=torch.float32, device=device)
            hook = _ScaleAndAccumulate(lo, hi, alphas, row_weight[lo:hi], pos[lo:hi], scores[li], self.backend,
                                       None if at is None else at[lo:hi])
            hooks.append(hook)
            handles.append(self.modules[self.layers[li]].register_forward_pre_hook(hook))
        self._backward_through_hooks(
            handles, lambda: self._target(ids_r, attn_r, labels_r),
            lambda: [root_leaf] if root_leaf is not None else [h.leaf for h in hooks if h.leaf is not None])

    def _target(self, ids, attn, labels) -> torch.Tensor:
        """The summed target of a pass's rows. Only the positions from the first one that predicts an answer
        token on get logits (transformers' logits_to_keep, where the model has it): the others have no target,
        and the LM head over the whole vocabulary is a large part of a small model's pass."""
        kwargs = {"use_cache": False} if getattr(getattr(self.module, "config", None), "use_cache", None) else {}
        answers = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
        keep = ids.shape[1] - int(answers[0]) if answers.numel() else 1  # logits at positions >= first answer - 1
        if self._keeps_logits and keep < ids.shape[1]:
            kwargs["logits_to_keep"] = keep
            labels = labels[:, ids.shape[1] - keep:]
        out = self._forward(input_ids=ids, attention_mask=attn, **kwargs)
        return target_per_row(logits_of(out), labels, self.target).sum()

    def _input_embeddings(self) -> torch.nn.Module:
        get = getattr(self.module, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        if not isinstance(embeddings, torch.nn.Module):
            raise ValueError("attribution of an FSDP2-sharded model needs model.get_input_embeddings() (the "
                             "transformers API) to run the backward through every layer on every rank")
        return embeddings


class _ScaleAndAccumulate:
    """Forward pre-hook: scale rows lo:hi of the activation by their alphas (at every position, or with `at`
    only at position at[r] of row r); on backward, fold their `w * a * grad` into the layer's score row."""

    def __init__(self, lo, hi, alphas, weight, pos, out, backend, at=None):
        self.lo, self.hi, self.alphas, self.weight, self.pos, self.out = lo, hi, alphas, weight, pos, out
        self.backend, self.at = backend, at
        self.leaf = None

    def __call__(self, module, args):
        a = args[0]
        kept = a[self.lo:self.hi].detach()
        if self.hi - self.lo < a.shape[0]:
            kept = kept.clone()  # a view would keep the whole activation of every row alive
        if self.at is None:
            scale = torch.ones(a.shape[0], dtype=a.dtype, device=a.device)
            scale[self.lo:self.hi] = self.alphas.to(a.dtype)
            scaled = a * scale[:, None, None]
        else:
            scale = torch.ones(a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
            scale[torch.arange(self.lo, self.hi, device=a.device), self.at] = self.alphas.to(a.dtype)
            scaled = a * scale[:, :, None]
        if not scaled.requires_grad:
            # The first hooked layer: nothing upstream carries a gradient (weights are frozen), so the
            # scaled activation becomes the leaf that every later hooked activation depends on.
            scaled.requires_grad_()
            self.leaf = scaled

        def accumulate(grad):
            ig_accumulate(self.out, kept, grad[self.lo:self.hi], self.weight, self.pos, backend=self.backend)

        scaled.register_hook(accumulate)
        return (scaled,) + tuple(args[1:])


def _split(work: list, cap: int) -> list[list]:
    """`work` in as few passes of at most `cap` items as fit, of equal sizes (the last one smaller)."""
    n_passes = math.ceil(len(work) / cap)
    size = math.ceil(len(work) / n_passes)
    return [work[i:i + size] for i in range(0, len(work), size)]
