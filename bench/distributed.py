"""Benchmark: SIMU unlearning steps under DDP on the CPU, 1 and 2 processes (gloo), per rank.

    python -m bench.distributed [--quick] [--procs 1,2] [--steps N] [--batch B] [--threads T] [--no-write]

The script spawns the processes itself (torch.multiprocessing, gloo, one process group per run). Each
process builds the same random-weight Llama (nothing is downloaded) and the same synthetic forget and retain
sets, takes its share (simu_fast.data.sharding.make_distributed_loader, --batch examples per
process per step: weak scaling, 2 processes do twice the examples per step) and runs simu_fast's Unlearner
with the SIMU recipe and parallel="ddp" (one process: a process group of one, no DDP wrapper, the plain
loop). Per rank it reports:
- setup_ms: SIMU's setup (integrated-gradient attribution of the rank's share of forget and retain, scores
  all-reduced; neuron selection) and make_optimizer;
- median_ms / min_ms over the timed steps: wall time from the end of one optimizer step (method.after_step)
  to the end of the next, so one step = forward/backward of a forget and a retain batch, the gradient
  all-reduce (2 processes), clipping, the masked SophiaG step, and the GNB Hessian refresh every
  `hessian_every` steps; the first `warmup` steps are not timed;
- examples_per_s: forget examples per second over all ranks (world x batch / median step);
  speedup = examples_per_s / the one-process examples_per_s (ideal: the number of processes);
- peak_rss_mb: the rank's peak resident memory (VmHWM of /proc/self/status; resource.getrusage's ru_maxrss
  where there is no /proc, which a spawned child inherits from its parent and so may overstate). It includes
  python, torch and transformers: start_rss_mb is the resident memory before the model was built, so peak -
  start is what the model, data, optimizer and steps added.
torch threads per process: --threads (default 1, so 2 processes use 2 cores and 1 process 1 core; the
per-core cost is what compares). The benchmark runs on the CPU whatever --device says (one GPU cannot host
two NCCL ranks); on a multi-GPU machine use torchrun with `simu-fast unlearn` instead.
"""
from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from simu_fast.distributed import init_local_group, leave_process_group, new_store_file

from . import common

OP = "distributed"


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    seq: int


SIZES = {"8M": Size(256, 4, 1024, 4000, 4, 64), "1M": Size(128, 2, 512, 1000, 4, 32)}
DEFAULTS = dict(size="8M", steps=12, warmup=3, batch=4, examples=32)
QUICK = dict(size="1M", steps=7, warmup=2, batch=4, examples=32)
SIMU_ARGS = dict(ig_steps=2, fraction=0.05, lr=1e-4, hessian_every=5)



def _status_mb(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> Optional[float]:
    now = _status_mb("VmRSS")
    if now is None:
        try:
            import psutil
            now = psutil.Process().memory_info().rss / 2**20
        except ImportError:
            pass
    return now


def _peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM (Linux); else getrusage's ru_maxrss, which a spawned process
    inherits from its parent across fork/exec, so it may overstate a child's own peak."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 1024


def _features(n: int, size: Size, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size.vocab, (n, size.seq), generator=g)
    half = size.seq // 2
    return [{"input_ids": row.tolist(), "labels": [-100] * half + row[half:].tolist()} for row in ids]


def _worker(rank: int, world: int, store: str, size: Size, cfg: dict, threads: int, results) -> None:
    torch.set_num_threads(threads)
    start_rss = _rss_mb()
    import torch.distributed as dist
    init_local_group(rank, world, store)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        from simu_fast import Unlearner
        from simu_fast.data.sharding import make_distributed_loader
        from simu_fast.methods.simu import SIMU

        marks: list[float] = []

        class TimedSIMU(SIMU):
            def make_optimizer(self, model):
                optimizer = super().make_optimizer(model)
                marks.append(time.perf_counter())  # setup ends here; the loop starts
                return optimizer

            def after_step(self, model, optimizer, forget_batch, step):
                super().after_step(model, optimizer, forget_batch, step)
                marks.append(time.perf_counter())

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.ffn, num_hidden_layers=size.layers,
            num_attention_heads=size.heads, num_key_value_heads=size.heads, max_position_embeddings=size.seq,
            tie_word_embeddings=False)).float()
        params = sum(p.numel() for p in model.parameters())
        forget = make_distributed_loader(_features(cfg["examples"], size, 1), cfg["batch"], shuffle=True, seed=1,
                                         pad_token_id=0)
        retain = make_distributed_loader(_features(cfg["examples"], size, 2), cfg["batch"], shuffle=True, seed=2,
                                         pad_token_id=0)
        steps = cfg["warmup"] + cfg["steps"]
        t0 = time.perf_counter()
        Unlearner(model, TimedSIMU(**SIMU_ARGS), forget, retain, max_steps=steps, progress=False,
                  parallel="ddp" if world > 1 else None).run()
        step_s = [b - a for a, b in zip(marks[cfg["warmup"]:], marks[cfg["warmup"] + 1:])]
        results[rank] = {"rank": rank, "world_size": world, "params": params, "setup_ms": (marks[0] - t0) * 1e3,
                         "median_ms": statistics.median(step_s) * 1e3, "min_ms": min(step_s) * 1e3,
                         "reps": len(step_s), "peak_rss_mb": _peak_rss_mb(), "start_rss_mb": start_rss}
    except BaseException:
        leave_process_group(ok=False)
        raise
    leave_process_group()


def measure(world: int, size: Size, cfg: dict, threads: int) -> list[dict]:
    """Spawn `world` processes, run the steps, return one dict per rank."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.start_processes(_worker, args=(world, new_store_file(), size, cfg, threads, results), nprocs=world, join=True,
                       start_method="spawn")
    return [results[r] for r in range(world)]


TABLE_COLUMNS = (("size", "size"), ("case", "case"), ("method", "method"), ("rank", "rank"),
                 ("median_ms", "step ms"), ("min_ms", "min ms"), ("setup_ms", "setup ms", common.number(".0f")),
                 ("examples_per_s", "ex/s (all)", common.number(".0f")), ("speedup", "vs 1 proc"),
                 ("peak_rss_mb", "peak RSS MB", common.number(".0f")),
                 ("start_rss_mb", "start RSS MB", common.number(".0f")), ("reps", "reps"))


def run(quick: bool = False, device: Optional[str] = None, deadline: Optional[float] = None,
        procs: Optional[list] = None, steps: Optional[int] = None, batch: Optional[int] = None,
        threads: int = 1, write: bool = True, log: Optional[Callable] = None) -> list[dict]:
    """Run the benchmark; returns the rows (and writes them via bench.common unless write=False)."""
    log = log or functools.partial(print, flush=True)
    cfg = dict(QUICK if quick else DEFAULTS)
    if steps is not None:
        cfg["steps"] = int(steps)
    if batch is not None:
        cfg["batch"] = int(batch)
    size = SIZES[cfg["size"]]
    procs = list(procs or (1, 2))
    dev = torch.device("cpu")
    meta = common.metadata(dev)
    meta.update(quick=quick, threads_per_process=threads, simu=SIMU_ARGS, config=cfg, backend="gloo")
    op_key = OP + ("-quick" if quick else "")
    log(f"bench.distributed on {meta['cpu']} ({meta['host']}, {meta['nproc']} cores), torch {meta['torch']}, commit "
        f"{meta['commit']}, load average {meta['loadavg']}")
    if device and torch.device(device).type != "cpu":
        log(f"  (--device {device} ignored: this benchmark runs CPU processes with gloo)")
    log(f"model {cfg['size']} (hidden {size.hidden}, {size.layers} layers, F {size.ffn}, vocab {size.vocab}, seq "
        f"{size.seq}); SIMU {SIMU_ARGS}; {cfg['batch']} forget + {cfg['batch']} retain examples per process per "
        f"step; {cfg['warmup']} warm-up + {cfg['steps']} timed steps; {threads} torch thread(s) per process")
    notes = [
        f"SIMU ({SIMU_ARGS}) unlearning steps through simu_fast's Unlearner on a random-weight Llama {cfg['size']} "
        f"(hidden {size.hidden}, {size.layers} layers, F {size.ffn}, vocab {size.vocab}, seq {size.seq}); CPU "
        f"processes spawned by the script, gloo, DDP for 2+ processes; {threads} torch thread(s) per process",
        f"weak scaling: {cfg['batch']} forget + {cfg['batch']} retain examples per process per step; step ms = "
        "median over the timed steps of one rank (after_step to after_step), setup = attribution + selection + "
        "optimizer; ex/s = world x batch / median step; vs 1 proc = ex/s over the 1-process ex/s",
        "peak RSS = the rank's VmHWM (/proc/self/status; includes python/torch/transformers); start RSS = "
        "resident memory before the model was built",
    ]
    load = common.loadavg()
    if load and load[0] >= 0.5 * common.nproc():
        notes.append(f"load average {load[0]} at the start on {common.nproc()} cores: other work was running, so "
                     "the processes competed for cores with it; the timings (2 processes most) are skewed")
    rows: list[dict] = []
    base_rate = None
    name = None
    for world in procs:
        if world > common.nproc():
            notes.append(f"{world} processes on {common.nproc()} cores: oversubscribed")
        if deadline is not None and time.time() > deadline:
            log(f"skipping {world} process(es): time limit reached")
            notes.append(f"{world} process(es) skipped: not enough time left in the run")
            continue
        t0 = time.time()
        per_rank = measure(world, size, cfg, threads)
        name = name or f"{per_rank[0]['params'] / 1e6:.1f}M"
        slowest = max(r["median_ms"] for r in per_rank)  # a DDP step ends when the slowest rank's does
        rate = world * cfg["batch"] / (slowest / 1e3)
        if base_rate is None and world == 1:
            base_rate = rate
        for r in per_rank:
            rows.append({"size": name, "case": f"simu b{cfg['batch']}/proc", "method": f"ddp x{world}" if world > 1
                         else "1 process", "dtype": "float32", "median_ms": r["median_ms"], "min_ms": r["min_ms"],
                         "reps": r["reps"], "speedup": None if base_rate is None else rate / base_rate,
                         "baseline": "1 process", "rank": r["rank"], "world_size": world,
                         "setup_ms": r["setup_ms"], "examples_per_s": rate, "peak_rss_mb": r["peak_rss_mb"],
                         "start_rss_mb": r["start_rss_mb"], "threads_per_process": threads,
                         "note": f"rank {r['rank']}/{world}; peak RSS {r['peak_rss_mb']:.0f} MB (start "
                                 f"{r['start_rss_mb'] or 0:.0f}); setup {r['setup_ms'] / 1e3:.1f} s; "
                                 f"{rate:.0f} ex/s"})
        log(f"  {world} process(es): {time.time() - t0:.0f}s")
    if rows:
        log("")
        log(common.text_table(rows, columns=TABLE_COLUMNS))
        if write:
            paths = common.write_results(op_key, rows, meta, extra={"notes": notes})
            common.report_done(paths, op_key, log)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 1M-parameter model and fewer steps")
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    ap.add_argument("--steps", type=int, help="timed steps per run")
    ap.add_argument("--batch", type=int, help="forget (and retain) examples per process per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--device", help="ignored: the benchmark runs on the CPU")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch bench/results")
    ap.add_argument("--time-limit", type=float, help="seconds; skip process counts once the time is up")
    args = ap.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",") if p.strip()]
    deadline = time.time() + args.time_limit if args.time_limit else None
    run(quick=args.quick, device=args.device, deadline=deadline, procs=procs, steps=args.steps, batch=args.batch,
        threads=args.threads, write=not args.no_write)


if __name__ == "__main__":
    main()
