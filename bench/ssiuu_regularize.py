"""Benchmark: Ssiuu's attribution regularizer (simu_fast.ops.ssiuu_regularize) against its eager reference.

    python -m bench.ssiuu_regularize [--quick] [--sizes 1M,10M,50M] [--device cpu|cuda] [--threads N]

Data: float32 g, phi, d, phi_prev, d_prev of n elements (1M, 10M, 50M; --quick: 1M only), torch.randn,
shared by every method of a size. Cases:
- norm:      penalty "norm" (the paper's), one tensor of n elements.
- squared:   penalty "squared", one tensor.
- norm-64t:  penalty "norm", the n elements split into 64 tensors of one call (a model's parameter list:
             the eager reference loops over them, the CUDA kernel is one multi-tensor launch).

Methods (same tensors; timed interleaved, one call of each per round; every call updates g in place):
- eager:          ssiuu_regularize(..., backend="reference"): the eager PyTorch reference (several full-size
                  temporaries per tensor). The speedup baseline.
- cpu / cuda / triton: ssiuu_regularize(..., backend=b): cpu on the CPU, cuda and triton on a GPU (where
                  built / installed). The op's Python input checks are included in every method.

Per row, besides the common fields: bytes = 6 * 4 * n (5 float32 tensors read, g written), GB/s = bytes /
median; check = the method's g after one call against the reference's, bitwise ("bit-exact", or the number
of differing elements and the largest difference in float32 ulps).
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch

from . import common

OP = "ssiuu_regularize"

SIZES = {"1M": 10**6, "10M": 10**7, "50M": 5 * 10**7}
DEFAULT_SIZES = ["1M", "10M", "50M"]
QUICK_SIZES = ["1M"]
CASES = (("norm", "norm", 1), ("squared", "squared", 1), ("norm-64t", "norm", 64))  # name, penalty, tensors
LAM = 1e-3
BYTES_PER_ELEMENT = 6 * 4  # g, phi, d, phi_prev, d_prev read, g written (float32)


def make_data(n: int, device: torch.device, seed: int = 0) -> dict:
    """g, phi, d, phi_prev, d_prev (float32, n elements each): attributions and deltas of both signs."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(scale):
        return torch.randn(n, generator=gen, device=device, dtype=torch.float32).mul_(scale)

    phi, d = randn(0.02), randn(1e-3)
    return {"g": randn(1e-3), "phi": phi, "d": d, "phi_prev": phi + randn(1e-3), "d_prev": d + randn(1e-4)}


def split(data: dict, pieces: int) -> list[list[torch.Tensor]]:
    """[grads, params, prob_grads, prev_params, prev_prob_grads], each the flat tensors cut into `pieces`."""
    n = data["g"].numel()
    sizes = [n // pieces] * pieces
    sizes[-1] += n - sum(sizes)
    return [list(data[k].split(sizes)) for k in ("g", "phi", "d", "phi_prev", "d_prev")]


def compare(out: torch.Tensor, ref: torch.Tensor) -> str:
    bad = out.view(torch.int32) != ref.view(torch.int32)
    mismatched = int(bad.sum())
    if mismatched == 0:
        return "bit-exact"
    ulps = (out.view(torch.int32).long() - ref.view(torch.int32).long()).abs().max()
    return f"{mismatched} differ (max {int(ulps)} ulp)"


def bench_case(data: dict, size: str, case: str, penalty: str, pieces: int, device: torch.device, timing: dict,
               log: Callable) -> list[dict]:
    from simu_fast.ops.ssiuu_regularize import ssiuu_regularize

    n = data["g"].numel()
    lists = split(data, pieces)
    names = [f"t{i}" for i in range(pieces)]
    methods = {"eager": "reference", **{b: b for b in common.our_backends(device)}}

    # the check: one call of each method on its own copy of g, against the reference's
    ref_g = None
    checks = {}
    for name, b in methods.items():
        g = data["g"].clone()
        ssiuu_regularize(list(g.split([t.numel() for t in lists[0]])), *lists[1:], lam=LAM, penalty=penalty,
                         backend=b, names=names)
        if ref_g is None:
            ref_g = g
            checks[name] = "reference"
        else:
            checks[name] = compare(g, ref_g)
        del g
    del ref_g

    fns = {name: (lambda b=b: ssiuu_regularize(*lists, lam=LAM, penalty=penalty, backend=b, names=names))
           for name, b in methods.items()}
    times = common.time_interleaved(fns, device, **timing)
    bw = common.copy_bandwidth(str(device))
    nbytes = BYTES_PER_ELEMENT * n
    base_ms = times["eager"]["median_ms"]
    rows = []
    for name, t in times.items():
        gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append(dict(size=size, case=case, method=name, dtype="float32", median_ms=t["median_ms"],
                         min_ms=t["min_ms"], reps=t["reps"], speedup=base_ms / t["median_ms"], baseline="eager",
                         bytes=nbytes, gbps=gbps, frac_copy_bw=gbps / bw, note=checks[name], check=checks[name],
                         penalty=penalty, tensors=pieces, elements=n, loadavg_1m=(common.loadavg() or [None])[0]))
        log(f"  {size:>4} {case:<9} {name:<7} {t['median_ms']:10.3f} ms  x{base_ms / t['median_ms']:7.2f}  "
            f"{gbps:8.1f} GB/s  {checks[name]}  ({t['reps']} reps)")
    return rows


def run(quick: bool = False, sizes: Optional[list] = None, device: Optional[str] = None,
        deadline: Optional[float] = None, threads: Optional[int] = None, write: bool = True,
        log: Optional[Callable] = None) -> list[dict]:
    """Run the benchmark; returns the rows (and writes them via bench.common unless write=False)."""
    log, dev = common.bench_start(device, threads, log)
    if sizes is None:
        sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    common.check_sizes(sizes, SIZES)
    if dev.type == "cuda":
        timing = dict(warmup=2, min_reps=5, max_reps=50, budget_s=0.5 if quick else 1.0)
    else:
        timing = dict(warmup=1, min_reps=3, max_reps=20, budget_s=0.3 if quick else 1.0)

    op_key = OP + ("-quick" if quick else "")
    meta = common.metadata(dev)
    meta.update(quick=quick, dtype="float32", timing=timing, lam=LAM)
    log(f"bench.ssiuu_regularize on {meta['device']} ({meta['host']}), torch {meta['torch']}, triton "
        f"{meta['triton']}, commit {meta['commit']}, {meta['torch_threads']} torch threads, load average "
        f"{meta['loadavg']}; copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s")
    log(f"sizes {sizes}, cases {[c[0] for c in CASES]}, our backends {common.our_backends(dev)}")
    notes = [
        "g += scale [A < 0] s d with A = phi d, A_prev = phi_prev d_prev (simu_fast.ops.ssiuu_regularize), "
        f"float32, lam = {LAM}; cases: norm / squared = the penalty on one tensor of n elements, norm-64t = "
        "norm on the n elements split into 64 tensors of one call",
        "eager = the op with backend='reference' (eager PyTorch), the speedup baseline; cpu / cuda / triton = "
        "the op with that backend; every method includes the op's Python input checks",
        "bytes = 6 x 4 x n (g, phi, d, phi_prev, d_prev read, g written); GB/s = bytes / median",
        "check: g after one call of the method vs the reference's, bitwise",
    ]
    if quick:
        notes.append("quick run: 1M only, fewer repetitions")

    all_rows: list[dict] = []
    paths = None
    s_per_element = None  # seconds per element of the last size measured (all cases and methods)
    t_start = time.time()
    for size in sizes:
        n = SIZES[size]
        if common.out_of_time(size, s_per_element, n, deadline, log, notes):
            continue
        t0 = time.time()
        data = make_data(n, dev)
        log(f"\n[{size}] n={n:,} float32 ({BYTES_PER_ELEMENT * n / 1e9:.2f} GB moved per call); "
            f"load average {common.loadavg()}")
        size_rows: list[dict] = []
        for case, penalty, pieces in CASES:
            if deadline is not None and time.time() > deadline:
                log("time limit reached: the remaining cases are skipped")
                notes.append(f"{size}: cases from {case} on skipped (time limit)")
                break
            size_rows += bench_case(data, size, case, penalty, pieces, dev, timing, log)
        del data
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        s_per_element = (time.time() - t0) / n
        paths = common.size_done(op_key, size_rows, all_rows, meta, notes, write, log, paths=paths)
    bad = [f"{r['size']} {r['case']} {r['method']} ({r['check']})" for r in all_rows
           if r["check"] not in ("reference", "bit-exact")]
    if bad:
        log("\nnot bit-exact: " + ", ".join(bad))
    common.report_done(paths, op_key, log, "bench.ssiuu_regularize", t_start)
    return all_rows


def main(argv=None):
    args = common.bench_parser("bench.ssiuu_regularize", __doc__, SIZES,
                               "the 1M size only, fewer repetitions").parse_args(argv)
    run(**common.run_options(args))

if __name__ == "__main__":
    main()
