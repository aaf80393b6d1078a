"""Benchmark: one masked SophiaG step on a transformer-shaped parameter set.

    python -m bench.optim [--quick] [--sizes 10M,50M] [--dtype fp32|bf16] [--hessian gnb|squared_grad]

Parameters (per layer): q, k, v, o projections [d, d]; MLP gate and up [F, d], down [d, F]; two norms
[d]; plus an embedding [V, d]. Gradients have the parameters' dtype; exp_avg and hessian are float32.

Cases (each on the same tensors):
- dense:     every parameter updated, no mask.
- simu-X%:   SIMU's update: X% of each layer's MLP neurons selected (rows of gate/up, columns of down),
             attention and norms updated fully, the embedding frozen.
- mlp-X%:    only the selected MLP neurons move; everything else frozen (the sparse-mask case).

Methods (all on the same parameters, gradients and state):
- eager_loop:  the official SophiaG per-parameter loop over the parameters that get a gradient (no masks:
               what plain PyTorch runs when it cannot mask inside a tensor). Baseline of "speedup".
- eager_mask:  the same, written as masked updates are written in eager PyTorch: the full update
               multiplied by a per-element boolean mask, exp_avg (and hessian) kept by torch.where.
- compile:     torch.compile(dynamic=True) of the per-tensor eager step (eager_mask's for masked
               tensors), called on flattened views; the first call's compile time is in the note.
- cpu / cuda / triton: simu_fast.ops.sophia_step with precomputed UpdateMasks (one fused call, the op's
               input checks included).
- <backend>/kernel (GPU): the compiled kernel called with prebuilt arguments (no Python checks; the op's
               index range checks synchronise the GPU once per masked tensor).
- SophiaG.step/<backend>: simu_fast.SophiaG.step() (backend="auto"): what a user calls, with its launch plan
               (built at the first call) and its non-finite gradient check (a pass over the gradients).
- SophiaG.step(finite)/<backend>: step(grads_finite=True), as the Unlearner calls it after a finite
               gradient-clipping norm has shown every gradient finite (no check pass).

Bytes: for each selected element, read p, g, m, h and write p, m (and h with --hessian squared_grad),
at the tensors' dtype sizes; GB/s = bytes / median time, whatever the method actually moved.
"""
from __future__ import annotations

import functools

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import common

OP = "optim"

# name: (d_model, d_ff, layers, vocab)
SIZES = {
    "10M": (384, 1024, 4, 8192),
    "50M": (640, 1728, 8, 16384),
    "150M": (1024, 2816, 10, 16384),
    "500M": (1536, 4096, 16, 32000),
    "1.5B": (2048, 5632, 28, 32000),
}
DEFAULT_SIZES = {"cpu": ["10M", "50M", "150M"], "cuda": ["150M", "500M", "1.5B"]}
QUICK_SIZES = ["10M"]
FRACTIONS = (0.01, 0.05, 0.20)
HP = dict(lr=1e-4, beta1=0.965, beta2=0.99, rho=0.04, bs=5120.0, weight_decay=0.1, eps=1e-15)
CPU_EAGER_NOTE = ("CPU: the eager methods allocate full-size temporaries per tensor; with glibc's default malloc "
                  "these are fresh mmap'd pages (page faults) on many calls, which dominates eager time and "
                  "inflates speedups over eager_loop; compile is the fairer CPU comparator. % copy BW can exceed "
                  "100% on the CPU (the step reads 4 streams per 2 written; the copy reference is 1:1)")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# parameters and cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Param:
    name: str
    kind: str  # attn | norm | gate | up | down | embed
    layer: int
    p: torch.Tensor
    g: torch.Tensor
    m: torch.Tensor
    h: torch.Tensor


@dataclass
class Case:
    name: str
    params: list  # the Params that get a gradient (are updated)
    masks: dict = field(default_factory=dict)  # name -> UpdateMask (masked params only)
    sel: dict = field(default_factory=dict)  # name -> bool tensor shaped like p (masked params only)
    neurons: dict = field(default_factory=dict)  # layer -> int64 index of selected neurons


def param_shapes(d: int, f: int, layers: int, vocab: int) -> list[tuple[str, str, int, tuple]]:
    shapes = [("embed_tokens", "embed", -1, (vocab, d))]
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"layers.{i}.self_attn.{proj}", "attn", i, (d, d)))
        shapes.append((f"layers.{i}.mlp.gate_proj", "gate", i, (f, d)))
        shapes.append((f"layers.{i}.mlp.up_proj", "up", i, (f, d)))
        shapes.append((f"layers.{i}.mlp.down_proj", "down", i, (d, f)))
        shapes.append((f"layers.{i}.input_layernorm", "norm", i, (d,)))
        shapes.append((f"layers.{i}.post_attention_layernorm", "norm", i, (d,)))
    return shapes


def count_params(size: str) -> int:
    total = 0
    for _, _, _, shape in param_shapes(*SIZES[size]):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def build_params(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[Param]:
    torch.manual_seed(seed)
    out = []
    for name, kind, layer, shape in param_shapes(*SIZES[size]):
        p = (torch.randn(shape, device=device) * 0.02).to(dtype)
        g = (torch.randn(shape, device=device) * 1e-3).to(dtype)
        m = torch.randn(shape, device=device) * 1e-3
        # h spread so that some updates are clipped (q >= 1) and some are not
        h = torch.rand(shape, device=device) * 1e-4
        p.requires_grad_(True)
        p.grad = g
        out.append(Param(name, kind, layer, p, g, m, h))
    return out


def neuron_selection(params: list[Param], frac: float, d_ff: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(frac * d_ff))
    layers = sorted({q.layer for q in params if q.kind in ("gate", "up", "down")})
    return {layer: torch.randperm(d_ff, generator=gen)[:k].sort().values for layer in layers}


def masked_case(name: str, params: list[Param], neurons: dict, mlp_only: bool) -> Case:
    from simu_fast.ops import make_mask

    if mlp_only:
        updated = [q for q in params if q.kind in ("gate", "up", "down")]
    else:
        updated = [q for q in params if q.kind != "embed"]
    case = Case(name, updated, neurons=neurons)
    for q in updated:
        if q.kind in ("gate", "up"):
            mask = make_mask(q.p, rows=neurons[q.layer], name=q.name)
        elif q.kind == "down":
            mask = make_mask(q.p, cols=neurons[q.layer], name=q.name)
        else:
            continue
        case.masks[q.name] = mask
        case.sel[q.name] = mask.element_mask(q.p)
    return case


def selected_elements(case: Case) -> int:
    return sum(case.masks[q.name].selected_of(q.p.numel()) if q.name in case.masks else q.p.numel()
               for q in case.params)


def bytes_moved(case: Case, update_h: bool) -> int:
    """Read p, g, m, h and write p, m (and h) for each selected element."""
    total = 0
    for q in case.params:
        n = case.masks[q.name].selected_of(q.p.numel()) if q.name in case.masks else q.p.numel()
        per = 2 * q.p.element_size() + q.g.element_size() + 2 * q.m.element_size() + q.h.element_size()
        if update_h:
            per += q.h.element_size()
        total += n * per
    return total


# ----------------------------------------------------------------------------------------------
# the eager steps
# ----------------------------------------------------------------------------------------------


def make_eager_steps(update_h: bool) -> tuple[Callable, Callable]:
    lr, beta1, beta2 = HP["lr"], HP["beta1"], HP["beta2"]
    rho_bs, wd, eps = HP["rho"] * HP["bs"], HP["weight_decay"], HP["eps"]

    def eager_step(p, g, m, h):
        # the official SophiaG loop body (github.com/Liuhong99/Sophia, sophia.py), float32 state
        if update_h:
            h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.mul_(1 - lr * wd)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = (m.abs() / (rho_bs * h + eps)).clamp(None, 1)
        p.addcmul_(m.sign(), ratio, value=-lr)

    def eager_mask_step(p, g, m, h, sel):
        # a masked update as written in eager PyTorch: full update times a per-element mask
        h_new = h * beta2 + (g * g) * (1 - beta2) if update_h else h
        m_new = m * beta1 + g * (1 - beta1)
        ratio = (m_new.abs() / (rho_bs * h_new + eps)).clamp(None, 1)
        update = p * (lr * wd) + m_new.sign() * ratio * lr
        p.sub_(update * sel)
        m.copy_(torch.where(sel, m_new, m))
        if update_h:
            h.copy_(torch.where(sel, h_new, h))

    return eager_step, eager_mask_step


class Compiled:
    """torch.compile of the per-tensor eager steps, shared by every size and case of one run."""

    def __init__(self, update_h: bool):
        self.step, self.mask_step = make_eager_steps(update_h)
        self.c_step = self.c_mask_step = None
        self.error: Optional[str] = None
        self.compile_s: dict = {}
        try:
            self.c_step = torch.compile(self.step, dynamic=True)
            self.c_mask_step = torch.compile(self.mask_step, dynamic=True)
        except Exception as exc:  # no compiler, unsupported platform, ...
            self.error = _first_line(exc)

    def warm(self, args: list) -> Optional[str]:
        """Compile (first calls) for this argument list; returns an error note or None."""
        if self.error:
            return self.error
        seen = set()
        for a in args:
            key = (len(a), a[0].dtype, a[1].dtype)
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    (self.c_mask_step if len(a) == 5 else self.c_step)(*a)
            except Exception as exc:
                self.error = _first_line(exc)
                return self.error
            self.compile_s[key] = time.perf_counter() - t0
        return None


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def kernel_fn(backend: str, case: Case, update_h: bool, device: torch.device) -> Callable:
    """The compiled kernel with prebuilt arguments (what sophia_step calls after its checks)."""
    from simu_fast._extension import extension
    from simu_fast.ops.multi_tensor_checks import kernel_mask_args
    from simu_fast.ops.update_mask import full_mask

    masks = [case.masks.get(q.name) or full_mask(q.p) for q in case.params]
    kinds, mask_tensors, row_lens = kernel_mask_args(masks, device)
    lr = HP["lr"]
    args = ([q.p for q in case.params], [q.g for q in case.params], [q.m for q in case.params],
            [q.h for q in case.params], kinds, mask_tensors, row_lens, float(lr),
            float(1.0 - lr * HP["weight_decay"]), float(HP["beta1"]), float(HP["beta2"]) if update_h else -1.0,
            float(HP["rho"] * HP["bs"]), float(HP["eps"]), False, [-1] * len(case.params))
    if backend == "triton":
        from simu_fast.triton_kernels import sophia_step as triton_sophia

        return lambda: triton_sophia.sophia_step(*args)
    fn = extension().sophia_step_cuda if backend == "cuda" else extension().sophia_step_cpu
    return lambda: fn(*args)


def bench_case(case: Case, size: str, device: torch.device, dtype_name: str, update_h: bool,
               compiled: Optional[Compiled], timing: dict, log: Callable) -> list[dict]:
    """Time every method on this case, interleaved (one call of each per round); return the rows."""
    from simu_fast import SophiaG
    from simu_fast._extension import resolve_backend
    from simu_fast.ops import sophia_step
    from simu_fast.ops.update_mask import full_mask

    eager_step, eager_mask_step = make_eager_steps(update_h)
    nbytes = bytes_moved(case, update_h)
    bw = common.copy_bandwidth(str(device))
    base = dict(size=size, case=case.name, dtype=dtype_name, bytes=nbytes,
                params=sum(q.p.numel() for q in case.params), selected=selected_elements(case),
                loadavg_1m=(common.loadavg() or [None])[0])
    methods: dict = {}  # name -> callable
    notes: dict = {}  # name -> note
    skipped: dict = {}  # name -> reason

    # (a) eager_loop: the official loop over the parameters with a gradient
    def loop():
        for q in case.params:
            eager_step(q.p, q.g, q.m, q.h)
    methods["eager_loop"] = loop

    # (b) eager_mask
    if case.masks:
        def masked_loop():
            for q in case.params:
                s = case.sel.get(q.name)
                if s is None:
                    eager_step(q.p, q.g, q.m, q.h)
                else:
                    eager_mask_step(q.p, q.g, q.m, q.h, s)
        methods["eager_mask"] = masked_loop

    # (c) torch.compile of the eager step, per tensor, on flattened views
    if compiled is not None:
        flat = []
        for q in case.params:
            a = [q.p.detach().view(-1), q.g.view(-1), q.m.view(-1), q.h.view(-1)]
            if q.name in case.sel:
                a.append(case.sel[q.name].view(-1))
            flat.append(a)
        before = dict(compiled.compile_s)
        err = compiled.warm(flat)
        if err:
            skipped["compile"] = f"torch.compile failed: {err}"
        else:
            new = {k: v for k, v in compiled.compile_s.items() if k not in before}
            if new:
                notes["compile"] = f"first-call compile {sum(new.values()):.1f}s"

            def compiled_loop():
                for a in flat:
                    (compiled.c_mask_step if len(a) == 5 else compiled.c_step)(*a)
            methods["compile"] = compiled_loop

    # (d) our backends through the fused op, then the bare kernel on a GPU
    ps, gs, ms, hs = ([getattr(q, k) for q in case.params] for k in ("p", "g", "m", "h"))
    masks = [case.masks.get(q.name) or full_mask(q.p) for q in case.params]
    names = [q.name for q in case.params]
    hp = dict(lr=HP["lr"], beta1=HP["beta1"], rho=HP["rho"], bs=HP["bs"], weight_decay=HP["weight_decay"],
              eps=HP["eps"], hessian_beta2=HP["beta2"] if update_h else None)
    for backend in common.our_backends(device):
        methods[backend] = (lambda b=backend: sophia_step(ps, gs, ms, hs, masks, backend=b, names=names, **hp))
    if device.type == "cuda":
        for backend in common.our_backends(device):
            methods[f"{backend}/kernel"] = kernel_fn(backend, case, update_h, device)

    # (e) the optimizer's step() on the same tensors and state
    opt = None
    try:
        chosen = resolve_backend("auto", device, "sophia_step")
        opt = SophiaG([(q.name, q.p) for q in case.params], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]),
                      rho=HP["rho"], weight_decay=HP["weight_decay"], bs=HP["bs"], eps=HP["eps"],
                      hessian="squared_grad" if update_h else "gnb", backend="auto")
        for q in case.params:
            opt.state[q.p] = {"step": torch.tensor(0.0), "exp_avg": q.m, "hessian": q.h}
            if q.name in case.masks:
                idx = case.neurons[q.layer]
                if q.kind == "down":
                    opt.set_mask(q.p, cols=idx)
                else:
                    opt.set_mask(q.p, rows=idx)
        methods[f"SophiaG.step/{chosen}"] = opt.step
        methods[f"SophiaG.step(finite)/{chosen}"] = functools.partial(opt.step, grads_finite=True)
    except Exception as exc:
        skipped["SophiaG.step"] = f"failed: {_first_line(exc)}"

    with torch.no_grad():
        times = common.time_interleaved(methods, device, **timing)
    del opt

    base_ms = times["eager_loop"]["median_ms"]
    rows = []
    for name, t in times.items():
        gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append(dict(base, method=name, median_ms=t["median_ms"], min_ms=t["min_ms"], reps=t["reps"],
                         speedup=base_ms / t["median_ms"], baseline="eager_loop", gbps=gbps,
                         frac_copy_bw=gbps / bw, note=notes.get(name)))
        log(f"  {size:>5} {case.name:<9} {name:<22} {t['median_ms']:10.3f} ms  x{base_ms / t['median_ms']:7.2f}"
            f"  (min {t['min_ms']:.3f}, {t['reps']} reps)")
    for name, why in skipped.items():
        rows.append(dict(base, method=name, baseline="eager_loop", note=why))
        log(f"  {size:>5} {case.name:<9} {name:<22} skipped: {why}")
    return rows


def cases_for(params: list[Param], d_ff: int, fractions, seed: int):
    """Yield the cases one at a time (masks for one fraction live only while its cases run)."""
    yield Case("dense", list(params))
    for frac in fractions:
        neurons = neuron_selection(params, frac, d_ff, seed + int(frac * 1000))
        pct = f"{100 * frac:g}%"
        yield masked_case(f"simu-{pct}", params, neurons, mlp_only=False)
        yield masked_case(f"mlp-{pct}", params, neurons, mlp_only=True)


def run(quick: bool = False, sizes: Optional[list] = None, device: Optional[str] = None, dtype: str = "fp32",
        hessian: str = "gnb", compile: bool = True, deadline: Optional[float] = None, write: bool = True,
        log: Optional[Callable] = None) -> list[dict]:
    """Run the benchmark; returns the rows (and writes them via bench.common unless write=False)."""
    log, dev = common.bench_start(device, log=log)
    if sizes is None:
        sizes = QUICK_SIZES if quick else DEFAULT_SIZES["cuda" if dev.type == "cuda" else "cpu"]
    common.check_sizes(sizes, SIZES)
    if dtype not in DTYPES:
        raise SystemExit(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    dtype_name = "bfloat16" if DTYPES[dtype] == torch.bfloat16 else "float32"
    update_h = hessian == "squared_grad"
    if dev.type == "cuda":
        timing = dict(warmup=2, min_reps=5, max_reps=50, budget_s=1.0 if quick else 2.0)
    else:
        timing = dict(warmup=1, min_reps=3, max_reps=30, budget_s=1.5 if quick else 2.0)

    # one entry per variant in the results file: optim, optim-bf16, optim-squared_grad, optim-quick, ...
    op_key = "-".join([OP] + (["bf16"] if dtype_name == "bfloat16" else []) + (["squared_grad"] if update_h else [])
                      + (["quick"] if quick else []))
    meta = common.metadata(dev)
    meta.update(quick=quick, dtype=dtype_name, hessian=hessian, hyperparameters=HP)
    log(f"bench.optim on {meta['device']} ({meta['host']}), torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit']}; copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s")
    log(f"sizes {sizes}, params {dtype_name}, state float32, hessian {hessian}, backends {common.our_backends(dev)}")
    compiled = Compiled(update_h) if compile else None
    notes = [
        "one SophiaG step on a transformer-shaped parameter set (per layer q,k,v,o [d,d], gate/up [F,d], "
        "down [d,F], 2 norms [d]; plus embedding [V,d]); sizes as (d, F, layers, V): "
        + ", ".join(f"{s}={SIZES[s]}" for s in sizes),
        "cases: dense = all parameters; simu-X% = X% of MLP neurons (gate/up rows, down columns) plus full "
        "attention and norms, embedding frozen; mlp-X% = only the selected MLP neurons, all else frozen",
        "eager_loop = official SophiaG loop over the parameters with a gradient (no masks), the speedup "
        "baseline; eager_mask = full update x per-element mask, m (h) via torch.where; compile = "
        "torch.compile(dynamic=True) of the per-tensor eager step; cpu/cuda/triton = "
        "simu_fast.ops.sophia_step with precomputed UpdateMasks; <backend>/kernel = the kernel without "
        "the op's Python checks; SophiaG.step = the optimizer",
        "bytes = selected elements x (read p, g, m, h + write p, m" + (", h" if update_h else "")
        + "); GB/s = bytes / median",
    ]
    if not compile:
        notes.append("torch.compile skipped (--no-compile)")
    if dev.type == "cpu":
        notes.append(CPU_EAGER_NOTE)

    all_rows: list[dict] = []
    t_per_param = None
    for size in sizes:
        n = count_params(size)
        if common.out_of_time(size, t_per_param, n, deadline, log, notes):
            continue
        t0 = time.time()
        d, f, layers, vocab = SIZES[size]
        log(f"\n[{size}] {n / 1e6:.1f}M parameters (d={d}, F={f}, layers={layers}, V={vocab}); "
            f"load average {common.loadavg()}")
        params = build_params(size, dev, DTYPES[dtype])
        size_rows = []
        compile_before = sum(compiled.compile_s.values()) if compiled else 0.0
        for case in cases_for(params, f, FRACTIONS, seed=1):
            if deadline is not None and time.time() > deadline:
                log(f"time limit reached: the remaining cases of {size} are skipped")
                notes.append(f"{size}: cases after {size_rows[-1]['case'] if size_rows else 'none'} skipped "
                             "(time limit)")
                break
            size_rows += bench_case(case, size, dev, dtype_name, update_h, compiled, timing, log)
            del case
        del params
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        all_rows += size_rows
        compile_s = (sum(compiled.compile_s.values()) if compiled else 0.0) - compile_before
        t_per_param = max(time.time() - t0 - compile_s, 0.0) / n
        log("")
        log(common.text_table(size_rows))
        if write:  # after every size: a run cut short keeps what it measured
            paths = common.write_results(op_key, all_rows, meta, extra={"notes": notes})
    if write and all_rows:
        common.report_done(paths, op_key, log)
    return all_rows


def main(argv=None):
    ap = common.bench_parser("bench.optim", __doc__, SIZES, "the 10M size only, fewer repetitions", threads=False)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter dtype (state is float32)")
    ap.add_argument("--hessian", default="gnb", choices=["gnb", "squared_grad"],
                    help="squared_grad also updates h inside the step (SOUL)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = ap.parse_args(argv)
    run(dtype=args.dtype, hessian=args.hessian, compile=not args.no_compile, **common.run_options(args))

if __name__ == "__main__":
    main()
