"""What every command shares about failing: the one-line user error, and warnings in the same form."""
from __future__ import annotations

import sys

PROG = "simu-fast"


class UsageError(Exception):
    """A mistake in what the user gave (reported as one line, exit code 2)."""


class Interrupted(Exception):
    """Ctrl-C during a run: its message says where it stopped and what was kept (exit code 130)."""


def warn(message: str) -> None:
    """One line on stderr, `simu-fast: warning: ...` (rank 0's business: callers print on the main process)."""
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split())
