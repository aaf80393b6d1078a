"""Benchmark: integrated-gradient attribution over MLP neurons on a random-weight Llama.

    python -m bench.attribution [--quick] [--sizes 5M] [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]

Model: LlamaForCausalLM built from a config with random weights (nothing is downloaded); one batch of
`batch` sequences of `seq` random tokens, labels -100 on the first half (the prompt) and the tokens
themselves on the rest (the answer). IG over every layer's MLP neurons, target "loss", positions
"answer", rule riemann_right; all methods run on the same model and batch in one run.

Methods (each case is one (steps, max_rows) setting):
- loop:          simu_fast.attribution.reference_neuron_attribution: one forward/backward per
                 (layer, step) on the batch (the knowledge-neuron / captum-style loop). Baseline of "speedup".
                 It does not depend on max_rows but is timed in every case, interleaved with the others, so
                 each case's speedups come from the same rounds (the same load on a shared machine).
- batched_eager: NeuronAttributor(backend="reference"): the batched passes, a*grad materialised in the hook.
- cpu / cuda / triton: NeuronAttributor with the fused ig_accumulate backend (cpu on the CPU; cuda and
                 triton on a GPU, where built), in its default scheme: shared-prefix passes (rows branch off
                 each example's unscaled forward at the layer they scale).
- <backend>/rows: the same with scheme="rows": every row runs the whole model (the scheme before).
- bare_fwd_bwd:  the row scheme's lower bound: the same passes (the attributor's own split of the work rows into
                 max_rows-row passes), frozen weights, no scaling and no accumulation hooks: a pre-hook on
                 the pass's first hooked down projection makes its input a leaf that requires grad, then
                 forward, the same target, autograd.grad to that leaf. ratio_to_bare = median / bare median
                 (goal for ours: within 1.10).

Extra fields per row: peak_mem_mb (GPU: torch.cuda.max_memory_allocated during one warm call, above the
memory allocated before it, i.e. above weights and inputs; base_mem_mb is that baseline; None on the CPU,
where torch keeps no resettable peak counter), rel_err_vs_loop (max |scores - loop scores| / max |loop scores|,
both float32 [L, F]), scores_match (rel_err_vs_loop <= tol for the dtype), ratio_to_bare, steps, max_rows,
passes. The steps sweep at a fixed max_rows and the max_rows sweep at fixed steps show what sets peak
memory (GPU) and time.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import common

OP = "attribution"
RULE, TARGET, POSITIONS = "riemann_right", "loss", "answer"


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    seq: int
    batch: int
    steps: tuple            # steps sweep, at max_rows
    max_rows: Optional[int]
    more_max_rows: tuple    # further max_rows settings, at steps_for_rows
    steps_for_rows: int

    def cases(self) -> list[tuple[int, Optional[int]]]:
        out = [(s, self.max_rows) for s in self.steps]
        out += [(self.steps_for_rows, r) for r in self.more_max_rows if (self.steps_for_rows, r) not in out]
        return out


# name (parameter count): model shape, batch shape, and the (steps, max_rows) cases
SIZES = {
    "0.7M": Size(128, 2, 344, 1024, 4, seq=32, batch=2, steps=(3, 6), max_rows=4, more_max_rows=(12,),
                 steps_for_rows=3),
    "5M": Size(256, 4, 688, 4096, 4, seq=64, batch=4, steps=(5, 10), max_rows=16, more_max_rows=(80,),
               steps_for_rows=5),
    "375M": Size(1024, 24, 2816, 32000, 16, seq=128, batch=8, steps=(5, 10, 20), max_rows=128,
                 more_max_rows=(64, 256), steps_for_rows=5),
}
DEFAULT_SIZES = {"cpu": ["5M"], "cuda": ["375M"]}
QUICK_SIZES = {"cpu": ["0.7M"], "cuda": ["375M"]}
# --quick on a GPU: the big model, fewer cases
QUICK_CASES = {"375M": dict(steps=(5,), max_rows=128, more_max_rows=(64,), steps_for_rows=5)}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
# scores of the batched methods vs the loop: float32 sums in a different order (fp32); bf16 activations
# computed in batches of a different shape (other GEMM tilings) and scaled by bf16-rounded alphas (bf16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


# ----------------------------------------------------------------------------------------------
# model, batch, methods
# ----------------------------------------------------------------------------------------------


def build_model(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.ffn,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=max(512, size.seq),
                         use_cache=False)  # no KV cache in any method's forward
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def make_batch(size: Size, device: torch.device, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=gen)
    labels = ids.clone()
    labels[:, : size.seq // 2] = -100  # the prompt; the answer tokens are the rest
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def attributor(model, steps: int, max_rows: Optional[int], backend: str, scheme: str = "auto"):
    from simu_fast.attribution import NeuronAttributor

    return NeuronAttributor(model, steps=steps, rule=RULE, target=TARGET, positions=POSITIONS, max_rows=max_rows,
                            backend=backend, scheme=scheme)


def loop_fn(model, batches: list, steps: int) -> Callable[[], torch.Tensor]:
    from simu_fast.attribution import reference_neuron_attribution

    return lambda: reference_neuron_attribution(model, batches, steps=steps, rule=RULE, target=TARGET,
                                                positions=POSITIONS)


def batched_fn(model, batches: list, steps: int, max_rows: Optional[int], backend: str,
               scheme: str = "auto") -> Callable[[], torch.Tensor]:
    attr = attributor(model, steps, max_rows, backend, scheme)
    return lambda: attr.attribute(batches, progress=False).scores


def bare_passes(model, batch: dict, steps: int, max_rows: Optional[int]) -> list[tuple[torch.Tensor, int]]:
    """The batched method's passes: (example index of each row, first hooked layer) per pass."""
    attr = attributor(model, steps, max_rows, "reference", scheme="rows")
    device = batch["input_ids"].device
    out = []
    for rows in attr._passes(batch["input_ids"].shape[0]):  # the attributor's own split of the work rows
        example = torch.tensor([b for _, _, b in rows], device=device)
        out.append((example, min(attr.layers[li] for li, _, _ in rows)))
    return out


def bare_fn(model, batch: dict, steps: int, max_rows: Optional[int]) -> Callable[[], None]:
    """Forward + backward of the same passes, no scaling or accumulation: the batched method's lower bound."""
    from simu_fast.attribution import mlp_down_projections
    from simu_fast.attribution.batches import prepare_batch
    from simu_fast.attribution.model_state import attribution_mode
    from simu_fast.attribution.targets import target_per_row
    from simu_fast.lm import logits_of

    modules = mlp_down_projections(model)
    passes = bare_passes(model, batch, steps, max_rows)

    def run() -> None:
        with attribution_mode(model):  # frozen weights, eval: as attribute() runs
            ids, attn, labels = prepare_batch(batch, batch["input_ids"].device)
            for example, first in passes:
                ids_r, attn_r, labels_r = ids[example], attn[example], labels[example]
                leaf = {}

                def make_leaf(module, args):
                    leaf["a"] = args[0].detach().requires_grad_()
                    return (leaf["a"],) + tuple(args[1:])

                handle = modules[first].register_forward_pre_hook(make_leaf)
                try:
                    with torch.enable_grad():
                        out = model(input_ids=ids_r, attention_mask=attn_r)
                        total = target_per_row(logits_of(out), labels_r, TARGET).sum()
                        torch.autograd.grad(total, leaf["a"])
                finally:
                    handle.remove()
    return run


def rel_err(scores: torch.Tensor, ref: torch.Tensor) -> float:
    scores, ref = scores.detach().double().cpu(), ref.detach().double().cpu()
    return ((scores - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def case_name(steps: int, max_rows: Optional[int]) -> str:
    return f"steps={steps} max_rows={max_rows if max_rows else 'all'}"


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


@dataclass
class SizeState:
    """What the cases of one size share: the model, the batch, the probe time."""
    name: str
    size: Size
    model: torch.nn.Module
    batch: dict
    params: int
    t_fwd_bwd: float  # one forward/backward of the batch (the loop's unit of work), seconds


def probe_fwd_bwd(model, batch: dict, device: torch.device) -> float:
    """Seconds for one forward/backward of the batch (bare, first layer hooked): the unit the estimates use."""
    fn = bare_fn(model, batch, steps=1, max_rows=batch["input_ids"].shape[0])
    # steps=1 over L layers -> L rows of batch examples; max_rows=batch -> L passes of `batch` rows
    n_passes = len(bare_passes(model, batch, 1, batch["input_ids"].shape[0]))
    t = common.time_fn(fn, device, warmup=1, min_reps=1, max_reps=1, budget_s=0.0)
    return t["median_ms"] * 1e-3 / n_passes


def estimate_case_s(st: SizeState, steps: int, n_methods: int, calls: int) -> float:
    """Every method does about layers*steps forward/backwards of `batch` rows' worth of tokens per call."""
    return n_methods * calls * st.size.layers * steps * st.t_fwd_bwd


def bench_case(st: SizeState, steps: int, max_rows: Optional[int], device: torch.device, dtype_name: str,
               timing: dict, log: Callable) -> list[dict]:
    size, model, batch = st.size, st.model, st.batch
    batches = [batch]
    case = case_name(steps, max_rows)
    results: dict = {}

    def keep(name: str, fn: Callable):
        def call():
            results[name] = fn()
        return call

    methods: dict = {"loop": keep("loop", loop_fn(model, batches, steps))}
    methods["batched_eager"] = keep("batched_eager", batched_fn(model, batches, steps, max_rows, "reference"))
    for backend in common.our_backends(device):
        methods[backend] = keep(backend, batched_fn(model, batches, steps, max_rows, backend))
        methods[f"{backend}/rows"] = keep(f"{backend}/rows", batched_fn(model, batches, steps, max_rows, backend,
                                                                        scheme="rows"))
    methods["bare_fwd_bwd"] = bare_fn(model, batch, steps, max_rows)
    n_passes = len(bare_passes(model, batch, steps, max_rows))
    work_rows = size.layers * steps * size.batch

    times = common.time_interleaved(methods, device, **timing)
    mem = {name: common.peak_memory(fn, device) for name, fn in methods.items()}  # warm calls (after the timing)

    loop_t, loop_scores = times["loop"], results["loop"]
    bare_ms = times["bare_fwd_bwd"]["median_ms"]
    tol = TOL.get(next(model.parameters()).dtype, 5e-2)
    base = dict(size=st.name, case=case, dtype=dtype_name, steps=steps, max_rows=max_rows, passes=n_passes,
                work_rows=work_rows, layers=size.layers, ffn=size.ffn, seq=size.seq, batch=size.batch,
                params=st.params, baseline="loop", loadavg_1m=(common.loadavg() or [None])[0])
    rows = []
    for name, t in times.items():
        err = rel_err(results[name], loop_scores) if name in results and name != "loop" else None
        peak, base_mb = mem[name]
        row = dict(base, method=name, median_ms=t["median_ms"], min_ms=t["min_ms"], reps=t["reps"],
                   speedup=loop_t["median_ms"] / t["median_ms"],
                   ratio_to_bare=round(t["median_ms"] / bare_ms, 4),
                   peak_mem_mb=None if peak is None else round(peak, 1),
                   base_mem_mb=None if base_mb is None else round(base_mb, 1),
                   rel_err_vs_loop=err, scores_match=None if err is None else bool(err <= tol), tol=tol)
        if name == "loop":
            row.update(passes=size.layers * steps, max_rows=None)
        parts = [f"{row['ratio_to_bare']:.2f}x bare"]
        if peak is not None:
            parts.append(f"peak +{peak:.0f} MB")
        if err is not None:
            parts.append(f"err {err:.1e}" + ("" if row["scores_match"] else f" > tol {tol:g}"))
        if name == "loop":
            parts.append(f"{size.layers * steps} passes of {size.batch} rows")
        elif name == "bare_fwd_bwd" or name == "batched_eager":
            parts.append(f"{n_passes} passes")
        row["note"] = "; ".join(parts)
        rows.append(row)
        log(f"  {st.name:>5} {case:<22} {name:<14} {t['median_ms']:10.1f} ms  x{row['speedup']:6.2f}  "
            f"{row['ratio_to_bare']:5.2f}x bare  "
            + (f"peak +{peak:8.0f} MB  " if peak is not None else "")
            + (f"err {err:.1e}" if err is not None else "") + f"  ({t['reps']} reps)")
    return rows


TABLE_COLUMNS = (("size", "size"), ("case", "case"), ("method", "method"), ("dtype", "dtype"),
                 ("median_ms", "median ms"), ("min_ms", "min ms"), ("speedup", "vs loop"),
                 ("ratio_to_bare", "/ bare", common.number(".2f", "x")), ("peak_mem_mb", "peak MB", common.number(".0f")),
                 ("rel_err_vs_loop", "rel err", lambda err, r: "-" if err is None else
                  f"{err:.1e}" + ("" if r.get("scores_match") else " (!)")),
                 ("passes", "passes"), ("reps", "reps"))


def run(quick: bool = False, device: Optional[str] = None, deadline: Optional[float] = None,
        sizes: Optional[list] = None, dtype: Optional[str] = None, threads: Optional[int] = None,
        write: bool = True, log: Optional[Callable] = None) -> list[dict]:
    """Run the benchmark; returns the rows (and writes them via bench.common unless write=False)."""
    log, dev = common.bench_start(device, threads, log)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    if sizes is None:
        sizes = (QUICK_SIZES if quick else DEFAULT_SIZES)[kind]
    common.check_sizes(sizes, SIZES)
    dtype = dtype or DEFAULT_DTYPE[kind]
    if dtype not in DTYPES:
        raise SystemExit(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    torch_dtype = DTYPES[dtype]
    dtype_name = "bfloat16" if torch_dtype == torch.bfloat16 else "float32"
    if dev.type == "cuda":
        timing = dict(warmup=1, min_reps=3, max_reps=20, budget_s=2.0 if quick else 5.0)
    else:
        timing = dict(warmup=1, min_reps=3, max_reps=10, budget_s=1.0 if quick else 3.0)
    calls_per_method = 1 + timing["min_reps"] + (1 if dev.type == "cuda" else 0)

    # one entry per variant in the results file: attribution, attribution-quick, attribution-fp32 (GPU), ...
    short = "bf16" if torch_dtype == torch.bfloat16 else "fp32"
    op_key = "-".join([OP] + ([short] if short != DEFAULT_DTYPE[kind] else []) + (["quick"] if quick else []))
    meta = common.metadata(dev)
    meta.update(quick=quick, dtype=dtype_name, rule=RULE, target=TARGET, positions=POSITIONS, timing=timing)
    log(f"bench.attribution on {meta['device']} ({meta['host']}), torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit']}, {meta['torch_threads']} torch threads, load average {meta['loadavg']}")
    log(f"sizes {sizes}, dtype {dtype_name}, fused backends {common.our_backends(dev)}")
    notes = [
        "IG over every layer's MLP neurons (down-projection input) of a random-weight LlamaForCausalLM; target "
        f"{TARGET}, positions {POSITIONS}, rule {RULE}; one batch, labels -100 on the first half of each sequence; "
        "sizes as (hidden, layers, F, vocab, heads; seq, batch): "
        + ", ".join(f"{s}=({SIZES[s].hidden}, {SIZES[s].layers}, {SIZES[s].ffn}, {SIZES[s].vocab}, "
                    f"{SIZES[s].heads}; {SIZES[s].seq}, {SIZES[s].batch})" for s in sizes),
        "loop = reference_neuron_attribution (one forward/backward per layer and step), the speedup baseline, "
        "timed in every case interleaved with the other methods; batched_eager = NeuronAttributor("
        "backend='reference'), a*grad materialised; cpu/cuda/triton = NeuronAttributor with the fused "
        "ig_accumulate; bare_fwd_bwd = the same passes with no scaling/accumulation hooks (frozen weights, "
        "the pass's first hooked down-projection input made a leaf, autograd.grad to it): the lower bound",
        "note column: time / bare_fwd_bwd time; peak = GPU max_memory_allocated during one warm call above what "
        "was allocated before it (weights, batch); err = max|scores - loop scores| / max|loop scores| "
        f"(scores_match: err <= {TOL.get(torch_dtype, 5e-2):g} for {dtype_name})",
    ]
    if dev.type != "cuda":
        notes.append("peak memory not measured on the CPU (peak_mem_mb None): torch's CPU allocator keeps no "
                     "resettable peak counter and the process's max RSS never goes down; time only")
    if quick:
        notes.append("quick run: a small model and few repetitions")

    all_rows: list[dict] = []
    paths = None
    for name in sizes:
        size = SIZES[name]
        if quick and dev.type == "cuda" and name in QUICK_CASES:
            size = dataclasses.replace(size, **QUICK_CASES[name])
        if deadline is not None and time.time() > deadline:
            log(f"skipping {name}: time limit reached")
            notes.append(f"{name} skipped: not enough time left in the run")
            continue
        log(f"\n[{name}] hidden {size.hidden}, {size.layers} layers, F {size.ffn}, vocab {size.vocab}; "
            f"seq {size.seq}, batch {size.batch}; cases {[case_name(*c) for c in size.cases()]}")
        model = build_model(size, dev, torch_dtype)
        batch = make_batch(size, dev)
        st = SizeState(name, size, model, batch, count_params(model), probe_fwd_bwd(model, batch, dev))
        log(f"  {st.params / 1e6:.1f}M parameters ({dtype_name}); one forward/backward of the batch "
            f"{st.t_fwd_bwd * 1e3:.1f} ms; load average {common.loadavg()}")
        size_rows: list[dict] = []
        for steps, max_rows in size.cases():
            n_methods = 3 + 2 * len(common.our_backends(dev))
            estimate = estimate_case_s(st, steps, n_methods, calls_per_method)
            if deadline is not None and time.time() + estimate > deadline:
                log(f"  skipping {case_name(steps, max_rows)}: about {estimate:.0f}s needed, "
                    f"{deadline - time.time():.0f}s left")
                notes.append(f"{name} {case_name(steps, max_rows)} skipped: not enough time left in the run")
                continue
            size_rows += bench_case(st, steps, max_rows, dev, dtype_name, timing, log)
        del st, model, batch
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        paths = common.size_done(op_key, size_rows, all_rows, meta, notes, write, log, columns=TABLE_COLUMNS,
                                 paths=paths)
    mismatched = [f"{r['size']} {r['case']} {r['method']} ({r['rel_err_vs_loop']:.1e})" for r in all_rows
                  if r.get("scores_match") is False]
    if mismatched:
        log("\nscores differ from the loop beyond tolerance: " + ", ".join(mismatched))
    common.report_done(paths, op_key, log)
    return all_rows


def main(argv=None):
    ap = common.bench_parser("bench.attribution", __doc__, SIZES, "small model on the CPU / fewer cases on a GPU")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="model dtype (default: fp32 on the CPU, bf16 on a GPU)")
    args = ap.parse_args(argv)
    run(dtype=args.dtype, **common.run_options(args))

if __name__ == "__main__":
    main()
