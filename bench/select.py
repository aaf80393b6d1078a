"""Benchmark: exact top-k selection (radix select) against torch.topk, torch.kthvalue and a full sort.

    python -m bench.select [--quick] [--threads N] [--sizes 1e6,1e7] [--device cpu|cuda] [--time-limit S]

Data: float32, one tensor per (size, distribution), shared by every method and every k:
- normal: torch.randn. Nearly all values are distinct, but float32 has only so many values near the mode:
          from about 1e7 elements on a few repeat, so the k-th value itself can be tied (column ties@k).
- ties:   8 levels (randint(0, 8) / 4 - 1), at one size only (TIES_SIZE): every k cuts through a run of
          equal values, so the radix select needs its index passes (lower flat index first).
k = 0.1%, 1%, 10%, 50% of n.

Methods (same x, same k; timed interleaved, one call of each per round):
- torch.topk:      values, indices = torch.topk(x, k); mask = zeros(bool).scatter_(0, indices, True): what users
                   write. The speedup baseline of every row.
- topk_mask/<b>:   simu_fast.ops.radix_select.topk_mask(x, k, backend=b); b = cpu on the CPU, cuda and triton on a GPU.
- torch.sort:      values, indices = torch.sort(x, descending=True); the same scatter of indices[:k]. A full sort
                   costs the same for every k: on the CPU it is timed at every k up to SORT_EVERY_K elements only,
                   above that at k=SORT_K only (the other rows say so).
- torch.kthvalue:  torch.kthvalue(x, n - k + 1).values (the k-th largest).
- kth_largest/<b>: simu_fast.ops.radix_select.kth_largest(x, k, backend=b).

Per row, besides the common fields (median/min ms, speedup = torch.topk median / median):
- passes (ours): the kernel passes over x, counted by wrapping the driver's dispatches in one extra, untimed
  call; passes_detail: "4K+3I+M" = 4 key passes, 3 index passes, the mask pass (m: over a prefix of x, up
  to a tied cut-off); "B (+13 small)" = the
  bracket pass alone over x, then 13 passes over the sample (up to 65536 elements) and the candidates; full_passes:
  the passes that read all of x (index passes after the first only read the window of indices that can
  still match: 2^(shift+8) of them); bytes_moved: the bytes all passes read and write (the candidates'
  lists not counted). torch methods: None (not observable from outside).
- index_bytes: index memory the method allocates: ours 0 for the radix passes, the bracket's candidate lists
  (12 bytes per candidate, about 1-3% of n) not counted; torch.topk k*8 (its int64 indices); torch.sort
  n*8; torch.kthvalue on the CPU n*8 (ATen's kthvalue_out_impl_cpu copies x and allocates an int64 index per
  element), on a GPU None (radix select in place: see peak memory).
- peak_mem_mb: GPU only: torch.cuda.max_memory_allocated during one warm call, above what was allocated
  before it (x and the reference masks), outputs included. None on the CPU (torch's CPU allocator keeps no
  resettable peak counter; the process's max RSS never goes down).
- bytes / GB/s: what an ideal implementation must move: read x once, plus write the n-byte mask for the
  mask methods.
- check: mask methods: exactly k True (count_ok), and `match`: equal to the reference mask, which is
  torch.topk's mask when the k-th value is not tied across the cut (then the top k is unique), else
  the lower-flat-index tie-break reference (x > v, plus the first k - #(x > v) positions of x == v).
  Our masks must match; torch.topk and torch.sort break ties their own way, so with ties across the
  cut only their count is checked. k-th value methods: equal to the smallest value of torch.topk's.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import common

OP = "select"

SIZES = {"1e6": 10**6, "1e7": 10**7, "1e8": 10**8, "1e9": 10**9}
DEFAULT_SIZES = {"cpu": ["1e6", "1e7", "1e8"], "cuda": ["1e6", "1e7", "1e8", "1e9"]}
QUICK_SIZES = {"cpu": ["1e6", "1e7"], "cuda": ["1e6", "1e7", "1e8"]}
FRACTIONS = (0.001, 0.01, 0.10, 0.50)
TIES_SIZE = {"cpu": "1e7", "cuda": "1e8"}  # the one size that also gets the "ties" distribution
TIES_LEVELS = 8
SORT_K = 0.01  # the k at which a full sort is always timed
SORT_EVERY_K = {"cpu": 10**7, "cpu-quick": 10**6, "cuda": 10**9}  # up to this n: timed at every k
CPU_FEW_REPS_N = 10**8  # from this n on the CPU: min_reps 2 (one round of all methods takes 10-30 s)
DTYPE = torch.float32


# ----------------------------------------------------------------------------------------------
# data, reference, methods
# ----------------------------------------------------------------------------------------------


def make_data(dist: str, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    if dist == "normal":
        return torch.randn(n, generator=gen, device=device, dtype=DTYPE)
    if dist == "ties":
        levels = torch.randint(0, TIES_LEVELS, (n,), generator=gen, device=device, dtype=torch.int32)
        return levels.to(DTYPE).mul_(0.25).sub_(1.0)
    raise ValueError(dist)


def topk_scatter(x: torch.Tensor, k: int) -> torch.Tensor:
    """What users write: torch.topk, then the mask from its indices."""
    _, indices = torch.topk(x, k)
    return torch.zeros(x.numel(), dtype=torch.bool, device=x.device).scatter_(0, indices, True)


def sort_scatter(x: torch.Tensor, k: int) -> torch.Tensor:
    _, indices = torch.sort(x, descending=True)
    return torch.zeros(x.numel(), dtype=torch.bool, device=x.device).scatter_(0, indices[:k], True)


@dataclass
class Reference:
    k: int
    topk_mask: torch.Tensor  # torch.topk's mask (also the torch.topk method's first call)
    exact: torch.Tensor      # the exact top-k with lower-index tie-breaking
    kth: float               # the k-th largest value
    above: int               # elements > kth
    equal: int               # elements == kth

    @property
    def tied_cut(self) -> bool:
        """The k-th value's run of equal elements straddles the cut: more than one valid top-k set."""
        return self.equal > 1 and self.above + self.equal > self.k


def reference(x: torch.Tensor, k: int) -> Reference:
    values, indices = torch.topk(x, k)
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device).scatter_(0, indices, True)
    kth = values.min()
    del values, indices
    above = int((x > kth).sum())
    eq = x == kth
    equal = int(eq.sum())
    if above + equal == k or equal == 1:  # the top k is unique: torch.topk's mask is the exact one
        exact = mask
    else:
        exact = x > kth
        exact[eq.nonzero().squeeze(1)[: k - above]] = True
    del eq
    return Reference(k, mask, exact, float(kth), above, equal)


def count_passes(fn: Callable[[], object], n: int) -> dict:
    """Run fn once with the driver's kernel dispatches wrapped; count and size the passes over x (n elements)
    and those over smaller tensors (the bracket's sample and candidates)."""
    from simu_fast.ops import radix_select as rs

    calls = []
    originals = rs._histogram, rs._select_mask, rs._bracket_mask

    def histogram(x, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal, backend):
        calls.append(("K" if mode == rs.KEYS else "I", x.numel(), prefix_bits, shift))
        return originals[0](x, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal, backend)

    def select(x, *args):
        # a mask pass over a prefix of x (up to a tied cut-off) is "m": it reads part of x, not a small tensor
        prefix = x.numel() < n and x.untyped_storage().nbytes() >= n * x.element_size()
        calls.append(("m" if prefix else "M", x.numel(), 0, 0))
        return originals[1](x, *args)

    def bracket(x, *args, **kwargs):
        calls.append(("B", x.numel(), 0, 0))
        return originals[2](x, *args, **kwargs)

    rs._histogram, rs._select_mask, rs._bracket_mask = histogram, select, bracket
    try:
        fn()
    finally:
        rs._histogram, rs._select_mask, rs._bracket_mask = originals
    itemsize = torch.tensor([], dtype=DTYPE).element_size()
    read = written = 0
    full, small, detail = 0, 0, {}
    for kind, numel, prefix_bits, shift in calls:
        # an index pass with a prefix only visits the window of indices that pass it: 2^(shift+8)
        visited = min(numel, 1 << (shift + 8)) if kind == "I" and prefix_bits else numel
        read += visited * itemsize
        written += numel if kind in ("M", "m", "B") else 0
        if numel < n and kind != "m":
            small += 1
            continue
        detail[kind] = detail.get(kind, 0) + 1
        full += visited == n
    text = "+".join(f"{count}{kind}" if count > 1 or kind in "KI" else kind
                    for kind, count in sorted(detail.items(), key=lambda kv: "BKIMm".index(kv[0])))
    if small:
        text += f" (+{small} small)"
    return dict(passes=sum(detail.values()), full_passes=full, passes_detail=text, small_passes=small,
                bytes_moved=read + written)


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------------
# one case: (size, distribution, k)
# ----------------------------------------------------------------------------------------------


def pct(frac: float) -> str:
    return f"{100 * frac:g}%"


def check_mask(mask: torch.Tensor, ref: Reference, ours: bool) -> dict:
    count = int(mask.sum())
    count_ok = count == ref.k
    if ours or not ref.tied_cut:
        match = bool(torch.equal(mask.reshape(-1), ref.exact))
        if match:
            text = "exact"
        else:
            text = f"{int((mask.reshape(-1) != ref.exact).sum())} positions differ"
    else:  # torch's own tie-breaking: count only
        match = None
        text = "count ok (ties: own order)" if count_ok else ""
    if not count_ok:
        text = f"{count} True, k={ref.k}" + (f"; {text}" if text else "")
    return dict(count_ok=count_ok, match=match, check=text)


def check_value(value, ref: Reference) -> dict:
    v = float(value)
    ok = v == ref.kth
    return dict(count_ok=None, match=ok, check="exact" if ok else f"{v!r} != {ref.kth!r}")


def bench_case(x: torch.Tensor, size: str, dist: str, frac: float, device: torch.device, timing: dict,
               time_sort: bool, sort_note: Optional[str], log: Callable) -> list[dict]:
    from simu_fast.ops.radix_select import kth_largest, topk_mask

    n = x.numel()
    k = max(1, round(frac * n))
    case = f"{dist} k={pct(frac)}"
    ref = reference(x, k)
    backends = common.our_backends(device)

    # name -> (fn, kind) with kind "mask" or "value"
    methods: dict = {"torch.topk": (lambda: topk_scatter(x, k), "mask")}
    for b in backends:
        methods[f"topk_mask/{b}"] = (lambda b=b: topk_mask(x, k, backend=b), "mask")
    if time_sort:
        methods["torch.sort"] = (lambda: sort_scatter(x, k), "mask")
    methods["torch.kthvalue"] = (lambda: torch.kthvalue(x, n - k + 1).values, "value")
    for b in backends:
        methods[f"kth_largest/{b}"] = (lambda b=b: kth_largest(x, k, backend=b), "value")

    # first calls: correctness (and Triton's compile) before timing; a method that fails is skipped
    checks: dict = {"torch.topk": check_mask(ref.topk_mask, ref, ours=False)}
    skipped: dict = {}
    if not time_sort:
        skipped["torch.sort"] = sort_note
    for name, (fn, kind) in methods.items():
        if name == "torch.topk":
            continue
        try:
            out = fn()
        except Exception as exc:
            if device.type == "cuda" and _is_oom(exc):
                torch.cuda.empty_cache()
                skipped[name] = f"out of GPU memory: {_first_line(exc)}"
            else:
                skipped[name] = f"failed: {_first_line(exc)}"
            continue
        ours = "/" in name
        checks[name] = check_mask(out, ref, ours) if kind == "mask" else check_value(out, ref)
        del out
    timed = {name: fn for name, (fn, _) in methods.items() if name not in skipped}

    passes = {}
    for name in timed:
        if "/" in name:
            passes[name] = count_passes(timed[name], n)

    times = common.time_interleaved(timed, device, **timing)
    mem = {name: common.peak_memory(fn, device)[0] for name, fn in timed.items()}

    bw = common.copy_bandwidth(str(device))
    itemsize = x.element_size()
    base_ms = times["torch.topk"]["median_ms"]
    kthvalue_ms = times.get("torch.kthvalue", {}).get("median_ms")
    index_bytes = {"torch.topk": k * 8, "torch.sort": n * 8,
                   "torch.kthvalue": n * 8 if device.type == "cpu" else None}
    base = dict(size=size, case=case, dtype="float32", n=n, k=k, fraction=frac, dist=dist, baseline="torch.topk",
                ties_at_kth=ref.equal, tied_cut=ref.tied_cut, loadavg_1m=(common.loadavg() or [None])[0])
    rows = []
    for name in methods:
        kind = methods[name][1]
        nbytes = n * itemsize + (n if kind == "mask" else 0)
        if name in skipped:
            rows.append(dict(base, method=name, bytes=nbytes, index_bytes=index_bytes.get(name, 0),
                             note=skipped[name]))
            log(f"  {size:>4} {case:<16} {name:<18} skipped: {skipped[name]}")
            continue
        t = times[name]
        gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
        row = dict(base, method=name, median_ms=t["median_ms"], min_ms=t["min_ms"], reps=t["reps"],
                   speedup=base_ms / t["median_ms"], bytes=nbytes, gbps=gbps, frac_copy_bw=gbps / bw,
                   index_bytes=index_bytes.get(name, 0), peak_mem_mb=None if mem[name] is None else round(mem[name], 1),
                   passes=None, full_passes=None, passes_detail=None, bytes_moved=None)
        row.update(passes.get(name, {}))
        row.update(checks[name])
        if name.startswith("kth_largest") and kthvalue_ms:
            row["speedup_vs_kthvalue"] = round(kthvalue_ms / t["median_ms"], 4)
        parts = [row["check"]]
        if row["passes_detail"]:
            parts.append(f"passes {row['passes_detail']}")
        if row["peak_mem_mb"] is not None:
            parts.append(f"peak +{row['peak_mem_mb']:.0f} MB")
        if row.get("speedup_vs_kthvalue"):
            parts.append(f"{row['speedup_vs_kthvalue']:.2f}x kthvalue")
        row["note"] = "; ".join(p for p in parts if p)
        rows.append(row)
        log(f"  {size:>4} {case:<16} {name:<18} {t['median_ms']:10.3f} ms  x{row['speedup']:7.2f}  "
            f"{row['passes_detail'] or '':<9} {row['check']}  ({t['reps']} reps)")
    del ref
    return rows


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def warm_up(device: torch.device) -> None:
    """First calls on a small tensor: Triton compiles its kernels (both histogram modes) outside the timing."""
    from simu_fast.ops.radix_select import kth_largest, topk_mask

    for dist in ("normal", "ties"):
        x = make_data(dist, 1 << 16, device, seed=1)
        for b in common.our_backends(device):
            topk_mask(x, 100, backend=b)
            kth_largest(x, 100, backend=b)
        topk_scatter(x, 100)
        sort_scatter(x, 100)
        torch.kthvalue(x, 100)
    common.synchronize(device)


def estimate_size_s(rounds: list, n_prev: int, n: int, n_cases: int, timing: dict) -> float:
    """Seconds for n_cases cases at n elements, from the previous size's per-case round times (one call of
    every method): besides the timed rounds (warmup + at least min_reps, or budget_s), each case makes about
    3 more calls of each method (reference / first call, pass counting, peak memory on a GPU); a round
    scales a little faster than n (the sorts)."""
    per_round = max(rounds) * (n / n_prev) * 1.2
    timed = max(timing["budget_s"], (timing["warmup"] + timing["min_reps"]) * per_round)
    return n_cases * (timed + 3 * per_round)


TABLE_COLUMNS = (("size", "size"), ("case", "case"), ("method", "method"), ("median_ms", "median ms"),
                 ("min_ms", "min ms"), ("speedup", "vs topk"), ("passes_detail", "passes"),
                 ("index_bytes", "index mem", lambda v, r: "-" if v is None else common.human_bytes(v)),
                 ("peak_mem_mb", "peak MB", common.number(".0f")), ("ties_at_kth", "ties@k"),
                 ("check", "check", lambda v, r: f"skipped: {r.get('note')}" if r.get("median_ms") is None
                  else common.fmt("check", v)), ("reps", "reps"))


def run(quick: bool = False, device: Optional[str] = None, deadline: Optional[float] = None,
        sizes: Optional[list] = None, threads: Optional[int] = None, write: bool = True,
        log: Optional[Callable] = None) -> list[dict]:
    """Run the benchmark; returns the rows (and writes them via bench.common unless write=False)."""
    log, dev = common.bench_start(device, threads, log)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    if sizes is None:
        sizes = (QUICK_SIZES if quick else DEFAULT_SIZES)[kind]
    common.check_sizes(sizes, SIZES)
    ties_size = TIES_SIZE[kind] if TIES_SIZE[kind] in sizes else sizes[-1]
    sort_every_k = SORT_EVERY_K["cpu-quick" if quick and kind == "cpu" else kind]
    if dev.type == "cuda":
        timing = dict(warmup=1, min_reps=5, max_reps=30, budget_s=0.5 if quick else 1.0)
    else:
        timing = dict(warmup=1, min_reps=3, max_reps=20, budget_s=0.3 if quick else 1.0)

    op_key = OP + ("-quick" if quick else "")
    meta = common.metadata(dev)
    meta.update(quick=quick, dtype="float32", timing=timing, fractions=list(FRACTIONS), ties_levels=TIES_LEVELS)
    log(f"bench.select on {meta['device']} ({meta['host']}), torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit']}, {meta['torch_threads']} torch threads, load average {meta['loadavg']}; "
        f"copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s")
    log(f"sizes {sizes} (ties at {ties_size}), k = {', '.join(pct(f) for f in FRACTIONS)} of n, "
        f"our backends {common.our_backends(dev)}")
    notes = [
        "exact top-k of a float32 vector: normal = torch.randn; ties = randint(0, 8) / 4 - 1 (8 levels, at "
        f"{ties_size} only); k = {', '.join(pct(f) for f in FRACTIONS)} of n",
        "torch.topk = torch.topk(x, k) then zeros(bool).scatter_(indices, True), the speedup baseline; "
        "topk_mask/<b> and kth_largest/<b> = simu_fast.ops.radix_select with backend b; torch.sort = "
        "sort(descending) + the same scatter of indices[:k]; torch.kthvalue = kthvalue(x, n - k + 1)",
        "passes (ours): histogram passes counted by wrapping the driver's dispatch (K key, I index) + M the mask "
        "pass (m: over a prefix of x, up to a tied cut-off); index passes after the first read only a window of "
        "x (full_passes, bytes_moved in the JSON); "
        "index mem: ours 0, torch.topk k*8, torch.sort n*8, torch.kthvalue n*8 on the CPU (ATen copies x "
        "and allocates an int64 index per element)",
        "check: mask methods have exactly k True and equal the exact top-k (lower flat index first among equal "
        "values: torch.topk's own mask when the k-th value is not tied across the cut); where it is tied "
        "(ties@k > 1 and not all selected) torch.topk / torch.sort are checked for the count only; "
        "k-th value methods equal torch.topk's smallest value",
        "bytes / GB/s: the ideal traffic, x read once (+ the n-byte mask written for mask methods)",
    ]
    if dev.type == "cuda":
        notes.append("peak = torch.cuda.max_memory_allocated during one warm call above what was allocated "
                     "before it (x, reference masks): the method's temporaries and outputs")
    else:
        notes.append("peak memory not measured on the CPU (peak_mem_mb None): torch's CPU allocator keeps no "
                     "resettable peak counter and the process's max RSS never goes down")
        notes.append(f"torch.sort is timed at every k up to n = {sort_every_k:.0e}, above that at "
                     f"k={pct(SORT_K)} only (a full sort does not depend on k); from n = {CPU_FEW_REPS_N:.0e} on, "
                     "at least 2 timed repetitions instead of 3")
    if quick:
        notes.append("quick run: fewer sizes and repetitions")

    warm_up(dev)
    all_rows: list[dict] = []
    paths = None
    prev = None  # (n, per-case round times in s) of the last size measured, for the time limit
    t_start = time.time()
    for size in sizes:
        n = SIZES[size]
        dists = ["normal"] + (["ties"] if size == ties_size else [])
        if deadline is not None and prev is not None:
            estimate = estimate_size_s(prev[1], prev[0], n, len(dists) * len(FRACTIONS), timing)
            if time.time() + estimate > deadline:
                log(f"skipping {size}: about {estimate:.0f}s needed, {deadline - time.time():.0f}s left")
                notes.append(f"{size} skipped: not enough time left in the run")
                continue
        time_sort_everywhere = n <= sort_every_k
        sort_fits = True
        if dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(dev)
            if free < 12 * n:  # x, the reference masks, the method outputs
                log(f"skipping {size}: {free / 1e9:.1f} GB free on the GPU, about {12 * n / 1e9:.0f} GB needed")
                notes.append(f"{size} skipped: does not fit in GPU memory")
                continue
            sort_fits = free >= 36 * n  # + sort's values, int64 indices and its double buffers
        # on the CPU a round at 1e8 takes seconds to tens of seconds (torch.topk at k=50%, the sort): 2 timed reps
        size_timing = dict(timing, min_reps=2) if dev.type == "cpu" and n >= CPU_FEW_REPS_N else timing
        size_rows: list[dict] = []
        for dist in dists:
            x = make_data(dist, n, dev)
            log(f"\n[{size} {dist}] n={n:,} float32 ({n * 4 / 1e9:.2f} GB); load average {common.loadavg()}")
            for frac in FRACTIONS:
                if deadline is not None and time.time() > deadline:
                    log("time limit reached: the remaining cases are skipped")
                    notes.append(f"{size} {dist}: cases from k={pct(frac)} on skipped (time limit)")
                    break
                if not sort_fits:
                    time_sort, sort_note = False, "does not fit in GPU memory next to x (about 36 bytes per element)"
                elif time_sort_everywhere or frac == SORT_K:
                    time_sort, sort_note = True, None
                else:
                    time_sort, sort_note = False, (f"not timed at this k: a full sort does not depend on k "
                                                   f"(timed at k={pct(SORT_K)})")
                try:
                    size_rows += bench_case(x, size, dist, frac, dev, size_timing, time_sort, sort_note, log)
                except Exception as exc:  # e.g. the reference torch.topk itself out of GPU memory
                    if not (dev.type == "cuda" and _is_oom(exc)):
                        raise
                    log(f"  {size} {dist} k={pct(frac)} skipped: {_first_line(exc)}")
                    notes.append(f"{size} {dist} k={pct(frac)} skipped: out of GPU memory")
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            del x
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rounds: dict = {}
        for r in size_rows:
            if r.get("median_ms") is not None:
                rounds[r["case"]] = rounds.get(r["case"], 0.0) + r["median_ms"] * 1e-3
        if rounds:
            prev = (n, list(rounds.values()))
        paths = common.size_done(op_key, size_rows, all_rows, meta, notes, write, log, columns=TABLE_COLUMNS,
                                 paths=paths)
    bad = [f"{r['size']} {r['case']} {r['method']} ({r['check']})" for r in all_rows
           if r.get("count_ok") is False or r.get("match") is False]
    if bad:
        log("\nCHECK FAILED: " + ", ".join(bad))
    failed = [f"{r['size']} {r['case']} {r['method']} ({r['note']})" for r in all_rows
              if str(r.get("note") or "").startswith("failed")]
    if failed:
        log("\nFAILED: " + ", ".join(failed))
    common.report_done(paths, op_key, log, "bench.select", t_start)
    return all_rows


def main(argv=None):
    args = common.bench_parser("bench.select", __doc__, SIZES, "smaller sizes, fewer repetitions").parse_args(argv)
    run(**common.run_options(args))

if __name__ == "__main__":
    main()
