"""`import simu_fast` from the folder above a clone named simu_fast imports the real package.

Python puts the current folder first on sys.path, and an editable install's finder comes after the path finder,
so the clone folder itself is found first. Without the repository root's __init__.py it became an empty
namespace package (`module 'simu_fast' has no attribute 'backends'`); with it, the real package is loaded in its
place. The clone is stood in for by a symlink named simu_fast to this repository, and Python runs in a fresh
process from the symlink's folder.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import os, sys
import simu_fast
info = simu_fast.backends()
assert info["reference"] is True, info
from simu_fast.optim import SophiaG
assert sys.modules["simu_fast"] is simu_fast
print(os.path.realpath(simu_fast.__file__))
"""

# The same with no installed simu_fast to find (an editable install's finder taken out of sys.meta_path): the
# package in the clone (./simu_fast/simu_fast) is the one loaded.
WITHOUT_EDITABLE_FINDER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
""" + CHECK


@pytest.fixture()
def parent_of_clone(tmp_path):
    link = tmp_path / "simu_fast"
    try:
        link.symlink_to(REPO, target_is_directory=True)
    except OSError as e:  # pragma: no cover - file systems without symlinks
        pytest.skip(f"cannot create a symlink here: {e}")
    return tmp_path


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # a plain `python`: the current folder first on sys.path (no PYTHONSAFEPATH), nothing added by PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("code", [CHECK, WITHOUT_EDITABLE_FINDER], ids=["installed", "not-installed"])
def test_import_from_the_clones_parent_folder(parent_of_clone, code):
    out = _run(code, parent_of_clone)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = Path(out.stdout.strip().splitlines()[-1])
    assert loaded.name == "__init__.py" and (loaded.parent / "_extension.py").is_file(), loaded
    assert loaded != (REPO / "__init__.py").resolve()
