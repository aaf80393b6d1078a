"""How the training loop shows its progress: a tqdm bar, or a line every few seconds to stderr.

A bar suits a terminal. Where stderr is a file or a pipe (CI logs, nohup, `| tee`) a bar writes either nothing
readable or a carriage-return soup, so "lines" prints one plain line at the first step, then at most one
every `every_s` seconds, and one at the end of the run:

unlearning: step 40/200 (20%)  loss 1.2345  forget_rougeL 0.412 (at step 40)  win_rate 0.21  elapsed 1m02s  left ~4m10s

The loop makes one with make_progress(mode, ...) on the rank that prints (None on the others, or when off)
and calls step(...) after every optimizer step, close() when the steps stop (also on error: the bar goes), then
finish(...) once the run has ended normally (the last line, with the final evaluation).
step_metrics is a callable: the numbers it reads (an optimizer's win_rate synchronises the device) are read
only for a line that is printed.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

MODES = ("bar", "lines", "auto")
STEP_METRICS_SHOWN = 3  # a method's per-step numbers beyond these make the line too long to scan


def progress_mode(progress) -> Optional[str]:
    """The mode a `progress` argument asks for: True -> "bar" (what True always meant), False/None -> None
    (nothing), "bar" / "lines" / "auto" as given. Anything else is a ValueError."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return "bar"
    if isinstance(progress, str) and progress in MODES:
        return progress
    raise ValueError(f"progress must be True, False, 'bar', 'lines' or 'auto', got {progress!r}")


def check_every_s(every_s) -> float:
    if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not (every_s >= 0 and every_s != math.inf):
        raise ValueError(f"progress_every_s must be a finite number >= 0, got {every_s!r}")
    return float(every_s)


def make_progress(mode: Optional[str], total: Optional[int], initial: int, desc: str, every_s: float):
    """A _Bar or _Lines for mode ("auto": a bar when stderr is a terminal, lines otherwise); None for None."""
    if mode is None:
        return None
    if mode == "auto":
        mode = "bar" if _stderr_is_terminal() else "lines"
    if mode == "bar":
        return _Bar(total, initial, desc)
    return _Lines(total, initial, desc, every_s)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


class _Bar:
    def __init__(self, total, initial, desc):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, evaluation: Optional[dict], step_metrics: Callable[[], dict]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def finish(self, step: int, loss: Optional[float], evaluation: Optional[dict],
               step_metrics: Callable[[], dict]) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


class _Lines:
    def __init__(self, total, initial, desc, every_s):
        self.total, self.initial, self.desc, self.every_s = total, initial, desc, every_s
        self.start = time.monotonic()
        self.last_printed: Optional[float] = None  # when the last line went out
        self.printed_state = None  # (step, evaluated step) of the last line: finish() repeats no line

    def step(self, step: int, loss: float, evaluation: Optional[dict], step_metrics: Callable[[], dict]) -> None:
        now = time.monotonic()
        if self.last_printed is None or now - self.last_printed >= self.every_s:
            self._print(step, loss, evaluation, step_metrics, now)

    def finish(self, step: int, loss: Optional[float], evaluation: Optional[dict],
               step_metrics: Callable[[], dict]) -> None:
        """The last line: the final step and the evaluation after it, unless the last line said just that."""
        if step > self.initial and self.printed_state != (step, _evaluated_step(evaluation)):
            self._print(step, loss, evaluation, step_metrics, time.monotonic())

    def close(self) -> None:
        pass

    def _print(self, step, loss, evaluation, step_metrics, now) -> None:
        self.last_printed, self.printed_state = now, (step, _evaluated_step(evaluation))
        elapsed = now - self.start
        parts = [f"{self.desc}: step {step}" + (f"/{self.total} ({100 * step // self.total}%)" if self.total else "")]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        shown = _forget_score(evaluation)
        if shown is not None:
            parts.append(f"{shown[0]} {shown[1]:.4g} (at step {evaluation['step']})")
        parts += [f"{name} {value:.4g}" for name, value in list(step_metrics().items())[:STEP_METRICS_SHOWN]]
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = step - self.initial
        if self.total and done > 0 and step < self.total:
            parts.append(f"left ~{format_duration(elapsed / done * (self.total - step))}")
        print("  ".join(parts), file=sys.stderr, flush=True)


def _evaluated_step(evaluation: Optional[dict]):
    return None if not evaluation else evaluation.get("step")


def _forget_score(evaluation: Optional[dict]):
    """(name, value) of the evaluation's forget score: forget_rougeL when there, else the first number whose
    name starts with "forget", else its first number; None without one."""
    if not evaluation:
        return None
    numbers = [(k, v) for k, v in evaluation.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for pick in (lambda k: k == "forget_rougeL", lambda k: k.startswith("forget"), lambda k: True):
        for name, value in numbers:
            if pick(name):
                return name, float(value)
    return None


def format_duration(seconds: float) -> str:
    """12s, 1m02s, 1h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
