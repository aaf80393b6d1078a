"""Benchmark: what a SIMU run costs against what it moves, side by side with SO-GradDiff.

    python -m bench.simu_memory [--quick] [--sizes 210M,1B] [--steps N] [--device cpu|cuda] [--no-write]

SIMU updates attention plus 1% of each layer's MLP neurons (random neurons: the cost does not depend on
which); SO-GradDiff updates everything with the same SophiaG. Three cases on one random-weight Llama:
- so-graddiff: SOGradDiff (SOUL's settings);
- simu: SIMU with compact neuron slices (select/neuron_slices.py, the default);
- simu-dense: SIMU(sparse=False), the masked full weights it replaces.
Measured (one GradDiff step on a forget and a retain batch of `batch` x `seq` tokens, the loop's order:
loss, backward, clipping, SophiaG.step, zero_grad, the GNB refresh every 10 steps):
- grads_mb: the gradients that exist after backward (model parameters and SIMU's slices);
- state_mb: the optimizer state after the step (SophiaG: float32 m and h);
- act_mb: the tensors autograd saved for backward (saved_tensors_hooks; parameters excluded, each saved
  tensor counted once);
- extra_mb = grads + state + activations, and its ratio to SO-GradDiff's; peak_mb on a GPU
  (max_memory_allocated during a step, above the weights);
- step_ms: median wall time of a step after a warm-up step, and its ratio to SO-GradDiff's.
Dry runs (sizes "8B" = Llama-3-8B shape on one GPU with batch 1 x 512; "70B" = Llama-2-70B shape under
FSDP2 on 8 ranks with batch 1 x 2048 per rank; both bf16 weights): the model is built on the meta device,
the recipe's make_optimizer runs on it, and a GradDiff forward/backward runs on meta tensors (with and
without gradient checkpointing) to count the saved activations. Gradients are the trainable elements in the
weights' dtype; optimizer state is 8 bytes per trainable element (what the measured rows show SophiaG
allocating). Under FSDP2 the weights, the model's gradients and their state are split over the ranks; SIMU's
slices are replicated (every rank holds them whole), and each rank also holds the unsharded weights of the
layer it computes and the one it prefetches (2 layers).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import common

OP = "simu_memory"
FRACTION = 0.01
CASES = ("so-graddiff", "simu", "simu-dense")


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    ranks: int = 1        # FSDP2 ranks of a dry run
    measured: bool = True  # False: a meta-device dry run


SIZES = {
    "tiny": Shape(128, 512, 2, 4, 4, 1000, 2, 32),
    "22M": Shape(256, 1024, 4, 4, 4, 32000, 2, 64),
    "210M": Shape(1024, 4096, 12, 16, 16, 32000, 1, 128),
    "1B": Shape(2048, 5632, 22, 32, 4, 32000, 1, 128),  # TinyLlama-1.1B
    "8B": Shape(4096, 14336, 32, 32, 8, 128256, 1, 512, measured=False),  # Llama-3-8B
    "70B": Shape(8192, 28672, 80, 64, 8, 32000, 1, 2048, ranks=8, measured=False),  # Llama-2-70B
}
DEFAULT_SIZES = ["210M", "1B", "8B", "70B"]
QUICK_SIZES = ["22M", "8B", "70B"]
GPU_BUDGET_GB = {"8B": 40, "70B": 80}
COLUMNS = (("size", "size"), ("case", "case"), ("dtype", "dtype"), ("trainable_m", "trainable (M)"),
           ("grads_mb", "grads MB"), ("state_mb", "state MB"), ("act_mb", "activations MB"),
           ("extra_mb", "extra MB"), ("extra_ratio", "extra vs SO", common.number(".2f", "x")),
           ("peak_mb", "peak MB"), ("median_ms", "step ms"), ("step_ratio", "step vs SO", common.number(".2f", "x")),
           ("note", "note"))


def _config(shape: Shape):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=max(2048, shape.seq),
                       tie_word_embeddings=False)


def random_mask(shape: Shape, fraction: float = FRACTION, seed: int = 0):
    """ceil(fraction x F) random neurons in every layer, all forget-only."""
    from simu_fast.select.neuron_mask import NeuronMask
    k = max(1, math.ceil(fraction * shape.ffn - 1e-9))
    g = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(shape.layers, shape.ffn, dtype=torch.bool)
    for layer in range(shape.layers):
        chosen[layer, torch.randperm(shape.ffn, generator=g)[:k]] = True
    return NeuronMask(chosen, torch.zeros_like(chosen), list(range(shape.layers)))


def make_method(case: str, shape: Shape):
    from simu_fast.methods import SIMU, SOGradDiff
    if case == "so-graddiff":
        return SOGradDiff(lr=1e-5)
    return SIMU(mask=random_mask(shape), lr=1e-5, sparse=case == "simu")


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the context (parameters excluded, a tensor
    saved by several nodes counted once)."""

    def __init__(self, model: torch.nn.Module):
        self.params = {id(p) for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self._keep: list = []  # keep the saved tensors' ids from being reused while counting

    def _pack(self, t):
        base = t._base if t._base is not None else t
        if id(t) not in self.params and id(base) not in self.params and id(base) not in self.seen:
            self.seen[id(base)] = base.numel() * base.element_size()
            self._keep.append(base)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._keep = []

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _batch(shape: Shape, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g)
    labels = ids.clone()
    labels[:, : shape.seq // 2] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(optimizer) -> int:
    return _tensor_bytes(v for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)


def measure(case: str, shape: Shape, dtype: torch.dtype, device: torch.device, steps: int) -> dict:
    """One case on a real model: bytes after its first step and the median step time."""
    from transformers import LlamaForCausalLM

    from simu_fast.training.unlearner import clip_gradients
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(shape)).to(device=device, dtype=dtype)
    model.train()
    method = make_method(case, shape)
    optimizer = method.make_optimizer(model)
    forget, retain = _batch(shape, 1, device), _batch(shape, 2, device)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(method.detached_parameters())
    row = {"trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 2)}
    times = []
    for step in range(steps + 1):
        common.synchronize(device)
        if device.type == "cuda" and step == 0:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        saved = SavedBytes(model)
        with saved:
            loss = method.loss(model, forget, retain)
        loss.backward()
        if step == 0:
            row["grads_mb"] = _tensor_bytes(p.grad for p in [*model.parameters(), *method.detached_parameters()]
                                            if p.grad is not None) / 1e6
            row["act_mb"] = saved.total / 1e6
        clip_gradients([p for p in model.parameters() if p.grad is not None],
                       [p for p in method.detached_parameters() if p.grad is not None], 1.0)
        method.before_step(model, optimizer, forget, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(model, optimizer, forget, step)
        common.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - start)
        if step == 0:
            row["state_mb"] = _state_bytes(optimizer) / 1e6
            if device.type == "cuda":
                row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e6
    method.finish(model)
    row["median_ms"] = 1e3 * statistics.median(times)
    row["min_ms"] = 1e3 * min(times)
    row["reps"] = len(times)
    state_per_element = row["state_mb"] * 1e6 / max(1, sum(p.numel() for p in trainable))
    assert abs(state_per_element - 8.0) < 1e-6, f"SophiaG state is {state_per_element} bytes per element"
    return row


def _meta_loss(model, batch) -> torch.Tensor:
    """The answer NLL as the recipes compute it, without an attention mask (building the mask reads data,
    which meta tensors have not)."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def dry_run(case: str, shape: Shape, checkpointing: bool) -> dict:
    """Bytes per rank from the meta device: weights, gradients and state from the recipe's optimizer over a
    meta model, activations from a GradDiff forward/backward on meta tensors."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(shape)).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    method = make_method(case, shape)
    optimizer = method.make_optimizer(model)
    model_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    detached = sum(p.numel() for p in method.detached_parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids}
    saved = SavedBytes(model)
    # transformers looks for packed sequences in the position ids when there is no attention mask and no cache
    # (as with checkpointing), which reads data; there is none on meta, and none is packed
    from unittest import mock
    with saved, mock.patch("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None):
        loss = -_meta_loss(model, batch) + 2.0 * _meta_loss(model, batch)  # GradDiff: forget and retain graphs
        loss.backward()
    grads = _tensor_bytes(p.grad for p in [*model.parameters(), *method.detached_parameters()] if p.grad is not None)
    method.finish(model)
    del optimizer
    n = shape.ranks
    sharded_grads = grads - 2 * detached  # the model's gradients split over the ranks; the slices' not
    per_rank = {
        "weights": weights / n, "grads": sharded_grads / n + 2 * detached,
        "state": 8 * model_trainable / n + 8 * detached, "activations": saved.total,
        "unsharded_layers": 0 if n == 1 else 2 * weights / shape.layers,
    }
    total = sum(per_rank.values())
    return {"trainable_m": round((model_trainable + detached) / 1e6, 1), "weights_gb": per_rank["weights"] / 1e9,
            "grads_mb": per_rank["grads"] / 1e6, "state_mb": per_rank["state"] / 1e6,
            "act_mb": per_rank["activations"] / 1e6, "total_gb": total / 1e9,
            "extra_mb": (per_rank["grads"] + per_rank["state"] + per_rank["activations"]) / 1e6}


def run(quick: bool = False, device: Optional[str] = None, deadline: Optional[float] = None,
        sizes: Optional[list] = None, threads: Optional[int] = None, write: bool = True, steps: Optional[int] = None,
        log: Optional[Callable] = None) -> list[dict]:
    log, dev = common.bench_start(device, threads, log)
    t_start = time.time()
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    common.check_sizes(sizes, SIZES)
    steps = steps or (2 if quick else 3)
    meta = common.metadata(dev)
    meta.update(quick=quick, fraction=FRACTION, steps=steps)
    log(f"bench.simu_memory on {meta['device']} ({meta['host']}), torch {meta['torch']}, commit {meta['commit']}")
    rows, notes = [], []
    for name in sizes:
        shape = SIZES[name]
        if shape.measured:
            dtype = torch.float32 if shape.hidden <= 1024 or dev.type == "cuda" else torch.bfloat16
            if dev.type == "cuda":
                dtype = torch.bfloat16
            size_rows = {}
            for case in CASES:
                if deadline is not None and time.time() > deadline:
                    notes.append(f"{name} {case} skipped: out of time")
                    continue
                r = measure(case, shape, dtype, dev, steps)
                r.update(size=name, case=case, method="measured", dtype=str(dtype).replace("torch.", ""))
                r["extra_mb"] = r["grads_mb"] + r["state_mb"] + r["act_mb"]
                size_rows[case] = r
                log(f"{name} {case}: grads {r['grads_mb']:.1f} MB, state {r['state_mb']:.1f} MB, activations "
                    f"{r['act_mb']:.1f} MB, step {r['median_ms']:.1f} ms")
            _ratios(size_rows)
            rows += size_rows.values()
        else:
            for checkpointing in (False, True):
                size_rows = {}
                for case in CASES:
                    r = dry_run(case, shape, checkpointing)
                    budget = GPU_BUDGET_GB[name]
                    where = "1 GPU" if shape.ranks == 1 else f"FSDP2, {shape.ranks} ranks, per rank"
                    r.update(size=name, case=case, method="meta dry run" + (", checkpointing" if checkpointing else ""),
                             dtype="bfloat16",
                             note=f"{where}: {r['total_gb']:.1f} GB in all (weights {r['weights_gb']:.1f} GB); "
                                  f"{'fits' if r['total_gb'] <= budget else 'does not fit'} {budget} GB")
                    size_rows[case] = r
                    log(f"{name} {case} ({r['method']}): {r['note']}")
                _ratios(size_rows)
                rows += size_rows.values()
    for r in rows:
        for k in ("grads_mb", "state_mb", "act_mb", "extra_mb", "peak_mb", "median_ms", "min_ms"):
            if isinstance(r.get(k), float):
                r[k] = round(r[k], 1)
    log(common.text_table(rows, columns=COLUMNS))
    paths = None
    if write:
        paths = common.write_results(OP + ("-quick" if quick else ""), rows, meta,
                                     extra={"notes": notes, "columns": [list(c[:2]) for c in COLUMNS]})
    common.report_done(paths, OP, log, "bench.simu_memory", t_start)
    return rows


def _ratios(size_rows: dict) -> None:
    base = size_rows.get("so-graddiff")
    if base is None:
        return
    for r in size_rows.values():
        r["extra_ratio"] = r["extra_mb"] / base["extra_mb"]
        if r.get("median_ms") and base.get("median_ms"):
            r["step_ratio"] = r["median_ms"] / base["median_ms"]
            r["speedup"] = base["median_ms"] / r["median_ms"]
            r["baseline"] = "so-graddiff"


def main(argv=None) -> int:
    ap = common.bench_parser("bench.simu_memory", __doc__, SIZES, "small sizes, 2 timed steps")
    ap.add_argument("--steps", type=int, help="timed steps per case (after one warm-up step)")
    args = ap.parse_args(argv)
    run(**common.run_options(args), steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
