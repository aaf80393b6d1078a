"""Shared timing and reporting for every bench module.

- time_fn(): median of repeated runs after warm-up; torch.cuda.synchronize() around each run on a GPU,
  plain time.perf_counter() on the CPU.
- copy_bandwidth(): the device's measured copy bandwidth (a large tensor copy; bytes read + written).
- metadata(): host, device, CPU, torch / triton / python versions, git commit, simu_fast.backends().
- write_results(): merges one op's rows into bench/results/<host>.json (other ops' entries are kept),
  written atomically (temp file + os.replace), and regenerates bench/results/<host>.md from it.

One row schema for all ops (ROW_FIELDS): a row is one (size, case, method) measurement.
<host> is the GPU's name slugified (e.g. nvidia-h100-80gb-hbm3) on a GPU, else "cpu-<nproc>core".
"""
from __future__ import annotations

import argparse
import datetime
import gc
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from importlib import metadata as importlib_metadata
from typing import Callable, Iterable, Optional

import torch

from simu_fast.io import write_atomic

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every op writes rows with these fields (extra fields are allowed and kept in the JSON).
ROW_FIELDS = (
    "op",            # bench module, e.g. "optim"
    "size",          # problem size label, e.g. "150M"
    "case",          # what is computed, e.g. "dense", "simu-5%", "mlp-1%"
    "method",        # eager_loop, eager_mask, compile, cpu, cuda, triton, ...
    "dtype",         # parameter / input dtype
    "median_ms",     # median wall time of one call (None when skipped)
    "min_ms",
    "reps",          # timed repetitions behind the median
    "speedup",       # baseline median / this median (baseline named in "baseline")
    "baseline",
    "bytes",         # bytes an ideal implementation must move for this case
    "gbps",          # bytes / median time
    "frac_copy_bw",  # gbps / measured device copy bandwidth
    "note",
)
MD_COLUMNS = (("size", "size"), ("case", "case"), ("method", "method"), ("dtype", "dtype"),
              ("median_ms", "median ms"), ("min_ms", "min ms"), ("speedup", "speedup"), ("gbps", "GB/s"),
              ("frac_copy_bw", "% copy BW"), ("note", "note"))


# ----------------------------------------------------------------------------------------------
# devices and hosts
# ----------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def host_name(device: Optional[torch.device] = None) -> str:
    """Short machine name for the results files: the GPU's name on a GPU, else cpu-<nproc>core."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return f"cpu-{nproc()}core"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, min_reps: int = 3,
            max_reps: int = 30, budget_s: float = 1.0) -> dict:
    """Median wall time of fn() in ms after `warmup` calls.

    The number of timed calls adapts to the cost of one call: as many as fit in budget_s, at least
    min_reps and at most max_reps. Each call is timed on its own (synchronising a GPU before and after).
    """
    device = torch.device(device)
    first = None
    for _ in range(max(1, warmup)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "reps": reps}


def time_interleaved(fns: dict, device: torch.device, *, warmup: int = 1, min_reps: int = 3, max_reps: int = 30,
                     budget_s: float = 1.0) -> dict:
    """time_fn for several functions at once, in rounds (one call of each per round).

    Compares methods on a shared or noisy machine fairly: a burst of load from elsewhere hits every
    method of a round, not one method's whole series. budget_s is the time for all functions together.
    Returns {name: {"median_ms", "min_ms", "reps"}} in fns' order.
    """
    device = torch.device(device)
    names = list(fns)
    last = {}
    for _ in range(max(1, warmup)):
        for name in names:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            last[name] = time.perf_counter() - t0
    per_round = max(sum(last.values()), 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / per_round)))
    times = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "reps": reps}
            for name, ts in times.items()}


@functools.lru_cache(None)
def copy_bandwidth(device_str: str, nbytes: Optional[int] = None) -> float:
    """Measured copy bandwidth of the device in GB/s (bytes read + bytes written per second)."""
    device = torch.device(device_str)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, min_reps=5, max_reps=20, budget_s=0.5)
    del src, dst
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[list]:
    """1, 5 and 15 minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def metadata(device: Optional[torch.device] = None) -> dict:
    device = torch.device(device) if device is not None else default_device()
    try:
        import simu_fast

        backends = simu_fast.backends()
    except Exception as exc:  # the bench still records what it can
        backends = {"error": repr(exc)}
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain")
    meta = {
        "host": host_name(device),
        "hostname": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": _cpu_model(),
        "nproc": nproc(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "simu_fast": _version("simu_fast"),
        "commit": commit,
        "dirty": None if dirty is None else bool(dirty),
        "backends": backends,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": round(copy_bandwidth(str(device)), 2),
        "loadavg": loadavg(),
    }
    return meta


# ----------------------------------------------------------------------------------------------
# results files
# ----------------------------------------------------------------------------------------------


def results_paths(host: str, results_dir: str = RESULTS_DIR) -> tuple[str, str]:
    return os.path.join(results_dir, f"{host}.json"), os.path.join(results_dir, f"{host}.md")


def load_results(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("ops"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"ops": {}}


def write_results(op: str, rows: list[dict], meta: dict, *, results_dir: str = RESULTS_DIR,
                  extra: Optional[dict] = None) -> tuple[str, str]:
    """Replace `op`'s entry in <host>.json with these rows (other ops kept); regenerate <host>.md."""
    host = meta["host"]
    json_path, md_path = results_paths(host, results_dir)
    data = load_results(json_path)
    data["host"] = host
    data["updated"] = meta.get("date")
    entry = {"meta": meta, "rows": [normalize_row(op, r) for r in rows]}
    if extra:
        entry.update(extra)
    data["ops"][op] = entry
    write_atomic(json_path, json.dumps(data, indent=1, sort_keys=False) + "\n")
    write_atomic(md_path, markdown_report(data))
    return json_path, md_path


def normalize_row(op: str, row: dict) -> dict:
    out = {k: row.get(k) for k in ROW_FIELDS}
    out["op"] = op
    for k, v in row.items():
        if k not in out:
            out[k] = v
    for k in ("median_ms", "min_ms", "speedup", "gbps", "frac_copy_bw"):
        if isinstance(out.get(k), float):
            out[k] = round(out[k], 4)
    return out


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------


def fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "median_ms" or key == "min_ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if key == "speedup":
        return f"{value:.2f}x"
    if key == "gbps":
        return f"{value:.1f}"
    if key == "frac_copy_bw":
        return f"{100 * value:.0f}%"
    if key == "bytes":
        return human_bytes(value)
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def cell(column: tuple, row: dict) -> str:
    """One table cell. A column is (key, title) or (key, title, format): format(value, row) -> str, for the
    columns fmt() does not know (it is given None values too)."""
    key = column[0]
    if len(column) > 2:
        return column[2](row.get(key), row)
    return fmt(key, row.get(key))


def number(spec: str, suffix: str = ""):
    """A column format: the value with format spec `spec` (e.g. ".0f"), "-" for None."""
    return lambda value, row: "-" if value is None else f"{value:{spec}}{suffix}"


def report_done(paths, op_key: str, log, name: Optional[str] = None, t_start: Optional[float] = None) -> None:
    """The end of a benchmark's log: how long it took (given name and t_start) and where it wrote."""
    if name is not None and t_start is not None:
        log(f"\n{name}: {time.time() - t_start:.0f}s")
    if paths:
        log(f"\nwrote {paths[0]} and {paths[1]} (entry {op_key!r})")


def our_backends(device: torch.device) -> list:
    """The compiled backends a benchmark times on `device`: cuda and triton on a GPU, cpu on the CPU (never
    the Triton interpreter, which is not a CPU backend)."""
    import simu_fast
    avail = simu_fast.backends()
    if device.type == "cuda":
        return [b for b in ("cuda", "triton") if avail.get(b)]
    return ["cpu"] if avail.get("cpu") else []


def peak_memory(fn, device: torch.device) -> tuple:
    """(peak MB allocated during one call of fn above what was allocated before it, that baseline in MB) on a
    GPU; (None, None) on the CPU."""
    if device.type != "cuda":
        return None, None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20, base / 2**20


def text_table(rows: Iterable[dict], columns=MD_COLUMNS) -> str:
    rows = list(rows)
    header = [column[1] for column in columns]
    body = [[cell(column, r) for column in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    prev_group = None
    for r, b in zip(rows, body):
        group = (r.get("size"), r.get("case"))
        if prev_group is not None and group != prev_group and group[0] != prev_group[0]:
            lines.append("")
        prev_group = group
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(rows: Iterable[dict], columns=MD_COLUMNS) -> str:
    lines = ["| " + " | ".join(column[1] for column in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(column, r).replace("|", "\\|") for column in columns) + " |")
    return "\n".join(lines)


def markdown_report(data: dict) -> str:
    out = [f"# Benchmarks on {data.get('host', '?')}", ""]
    out.append("Generated by `python -m bench` (bench/common.py) from the JSON file beside this one; "
               "speedup = baseline median / median; GB/s counts the bytes an ideal kernel must move; "
               "% copy BW = GB/s over the device's measured copy bandwidth.")
    out.append("")
    for op, entry in sorted(data.get("ops", {}).items()):
        meta = entry.get("meta", {})
        out.append(f"## {op}")
        out.append("")
        keys = ("device", "cpu", "nproc", "torch", "triton", "commit", "dirty", "date", "copy_bandwidth_gbps",
                "loadavg")
        out.append("- " + ", ".join(f"{k}: {meta.get(k)}" for k in keys))
        for line in entry.get("notes", []):
            out.append(f"- {line}")
        out.append("")
        columns = [tuple(c) for c in entry["columns"]] if entry.get("columns") else MD_COLUMNS  # an op's own
        out.append(markdown_table(entry.get("rows", []), columns))
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# the command line every op bench shares
# ----------------------------------------------------------------------------------------------


def bench_parser(module: str, doc: str, sizes, quick_help: str, threads: bool = True) -> argparse.ArgumentParser:
    """`python -m bench.<op>`'s parser with the options every op bench takes: --quick, --sizes, --device,
    --threads (CPU), --no-write, --time-limit. A bench adds its own options to it."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--sizes", help=f"comma-separated, from {', '.join(sizes)}")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    if threads:
        ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch bench/results")
    ap.add_argument("--time-limit", type=float, help="seconds; skip what would not finish in time")
    return ap


def run_options(args) -> dict:
    """run() keyword arguments from bench_parser's options: quick, sizes, device, deadline, write (and
    threads where the parser has it)."""
    out = dict(quick=args.quick, device=args.device, write=not args.no_write,
               sizes=[s.strip() for s in args.sizes.split(",")] if args.sizes else None,
               deadline=time.time() + args.time_limit if args.time_limit else None)
    if hasattr(args, "threads"):
        out["threads"] = args.threads
    return out


def out_of_time(size: str, seconds_per_unit, units: int, deadline, log, notes: list) -> bool:
    """True (and logged, and noted) when the size would not finish before `deadline`, estimated as 1.2 x the
    last size's seconds per unit (element, parameter) x this size's units; False with no deadline or estimate."""
    if deadline is None or seconds_per_unit is None:
        return False
    estimate = 1.2 * seconds_per_unit * units
    if time.time() + estimate <= deadline:
        return False
    log(f"skipping {size}: about {estimate:.0f}s needed, {deadline - time.time():.0f}s left")
    notes.append(f"{size} skipped: not enough time left in the run")
    return True


def size_done(op_key: str, size_rows: list, all_rows: list, meta: dict, notes: list, write: bool, log,
              columns=MD_COLUMNS, paths=None):
    """The end of one size: its rows join all_rows and are printed; with write, everything measured so far is
    written (a run cut short keeps what it measured). Returns the written paths (or `paths` unchanged)."""
    all_rows += size_rows
    if size_rows:
        log("")
        log(text_table(size_rows, columns=columns))
    if write and all_rows:
        paths = write_results(op_key, all_rows, meta, extra={"notes": notes})
    return paths


def check_sizes(sizes, known) -> None:
    """SystemExit naming the first size of `sizes` that is not a key of `known`."""
    for s in sizes:
        if s not in known:
            raise SystemExit(f"unknown size {s!r}; choose from {', '.join(known)}")


def bench_start(device, threads=None, log=None):
    """(log, device) for an op bench's run(): print with flush unless a log is given, the named device or the
    default one, and torch's CPU thread count when `threads` is set."""
    if threads:
        torch.set_num_threads(threads)
    return (log or functools.partial(print, flush=True),
            torch.device(device) if device else default_device())
