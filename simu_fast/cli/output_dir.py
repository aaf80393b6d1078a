"""A command's --out directory: never an input, never another run's files unless asked, one run at a time.

- An input (the model directory, a data file, ...) is never in --out, and --out is never the model directory or
  inside it: a run writes config.json, model.safetensors and the tokenizer files into --out, and --overwrite
  removes what an earlier run wrote there.
- --out must be new or empty. One that holds an earlier simu-fast run's outputs is refused unless
  --overwrite (then exactly what that run wrote is removed first: a stale mask.safetensors from a SIMU run
  never sits beside a later GA model) or --resume (an unlearn run continues from its checkpoint). Files that
  no simu-fast run wrote are never removed: such an --out is refused even with --overwrite.
- What a run writes is listed in --out/.simu-fast-outputs.json as it goes (that list is what --overwrite
  removes); a run that wrote nothing leaves no directory it made.
- One run per --out at a time: an exclusive lock (flock) on --out/.simu-fast.lock for the whole run; a second
  run fails at once, naming the first one's process. The lock goes with the process, so a killed run never
  leaves a stale lock.
- Files are written atomically (io.write_atomic) or staged: a save interrupted by Ctrl-C or a full disk
  leaves no half-written file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from ..io import write_atomic
from .errors import UsageError

MANIFEST = ".simu-fast-outputs.json"
LOCK = ".simu-fast.lock"
OWN = (MANIFEST, LOCK)


def check_not_an_input(out: str, flag: str, inputs: dict) -> None:
    """UsageError when --out is an input directory (or inside one), or holds an input.
    inputs: {flag: path} of what the command reads (None values are skipped)."""
    target = os.path.realpath(out)
    for name, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        source = os.path.realpath(path)
        if os.path.isdir(source) and (target == source or target.startswith(source + os.sep)):
            where = "is" if target == source else "is inside"
            raise UsageError(f"{flag} {out} {where} the {name} directory {path}: writing there would overwrite the "
                             f"input; choose another {flag}")
        if source.startswith(target + os.sep):
            raise UsageError(f"{flag} {out} holds the {name} {path}: a run's outputs (and --overwrite) would "
                             f"overwrite or remove it; choose another {flag}")


class OutputDir:
    """The --out directory of one run (module docstring). Use as a context manager around the whole run."""

    def __init__(self, path: str, flag: str = "--out"):
        self.path, self.flag = os.fspath(path), flag
        self._lock = None
        self._made = self._lock_made = self._taken = False
        self._written: list = []

    # ---- opening -------------------------------------------------------------------------------------
    def open(self, overwrite: bool = False, resume: bool = False) -> "OutputDir":
        self._check_parent()
        self._made = not os.path.isdir(self.path)
        os.makedirs(self.path, exist_ok=True)
        try:
            self._take_lock()
            entries = [n for n in os.listdir(self.path) if n not in OWN]
            earlier = self._read_manifest()
            if entries and not resume:
                foreign = [n for n in entries if n not in earlier and not n.startswith((".saving-", ".checkpoint.tmp-"))]
                if foreign:
                    raise UsageError(f"{self.flag} {self.path} is not empty and holds files no simu-fast run wrote "
                                     f"({', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); "
                                     f"choose a new or empty {self.flag}")
                if not overwrite:
                    raise UsageError(f"{self.flag} {self.path} holds the outputs of an earlier run "
                                     f"({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}); "
                                     "add --overwrite to replace them, or choose another directory")
                for name in entries:  # exactly what earlier runs wrote, and their leftovers
                    self._remove(name)
                earlier = []
            self._written = list(earlier)
            self._write_manifest()
            self._taken = True
        except BaseException:
            self.close()
            raise
        return self

    def _check_parent(self) -> None:
        out = self.path
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"{self.flag} {out} is a file, not a directory")
        parent = os.path.abspath(out)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"{self.flag} {out}: {parent} is a file, so the directory cannot be made")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{self.flag} {out}: {parent} is not writable")

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs into one --out are not serialized there
            return
        path = os.path.join(self.path, LOCK)
        self._lock_made = not os.path.exists(path)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            self._lock_made = False  # the other run's
            raise UsageError(f"{self.flag} {self.path} is in use by another simu-fast run ({holder}); wait for it to "
                             f"finish or choose another {self.flag}")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    # ---- what the run writes --------------------------------------------------------------------------
    def record(self, *names: str) -> None:
        """Add names (entries of --out) to the list of what this run wrote."""
        new = [n for n in names if n not in self._written]
        if new:
            self._written += new
            self._write_manifest()

    def write_text(self, name: str, text: str) -> str:
        self.record(name)
        return write_atomic(os.path.join(self.path, name), text)

    def save_staged(self, write) -> list:
        """write(directory) into a fresh staging directory inside --out, then each entry moved into --out with
        os.replace: an interrupted save leaves no half-written file, and the staging directory is removed
        either way. Returns the names moved in."""
        staging = tempfile.mkdtemp(prefix=".saving-", dir=self.path)
        try:
            write(staging)
            names = sorted(os.listdir(staging))
            self.record(*names)
            for name in names:
                target = os.path.join(self.path, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, name), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return names

    def produced(self) -> bool:
        """Whether --out holds anything besides the run's own bookkeeping."""
        return any(n not in OWN for n in os.listdir(self.path)) if os.path.isdir(self.path) else False

    # ---- closing --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the lock; a directory this run made and left without outputs is removed, and so is the lock
        file of a run that was refused before it took the directory."""
        if self._lock is not None:
            if self._lock_made and not self._taken:
                os.unlink(os.path.join(self.path, LOCK))
            self._lock.close()
            self._lock = None
        if self._made and os.path.isdir(self.path) and not self.produced():
            shutil.rmtree(self.path, ignore_errors=True)
            self._made = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- the manifest ---------------------------------------------------------------------------------
    def _read_manifest(self) -> list:
        path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(path):
            return []
        try:
            with open(path, encoding="utf-8") as f:
                names = json.load(f).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [n for n in names if isinstance(n, str) and n and os.sep not in n and n not in ("..", ".")]

    def _write_manifest(self) -> None:
        write_atomic(os.path.join(self.path, MANIFEST), json.dumps({"outputs": self._written}, indent=1) + "\n")

    def _remove(self, name: str) -> None:
        path = os.path.join(self.path, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
