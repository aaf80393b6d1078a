"""The repository's root folder, not the package (that is ./simu_fast).

A clone kept in a folder named `simu_fast`, with Python started in the folder above it: `import simu_fast` then
finds the clone itself first (the current folder comes first on sys.path, and an editable install's finder
comes after the path finder). Without this file the clone would be imported as an empty namespace package and
fail on its first attribute (`module 'simu_fast' has no attribute 'backends'`). With it, that import loads the
real package in its place: the installed one (editable or not), else the one in this clone (./simu_fast).

Under any other name (pytest imports this file as the root of the tests' folder tree, under the name of the
clone's folder) it does nothing.
"""
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys


def _real_spec(name: str, here: str):
    """The spec the import of `name` would find were this folder not in the way; the spec of ./simu_fast
    when nothing else provides the package."""
    parent = _os.path.realpath(_os.path.dirname(here))
    path = [entry for entry in _sys.path if _os.path.realpath(entry or _os.curdir) != parent]
    for finder in _sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(name, path) if finder is _machinery.PathFinder else find_spec(name, None)
        except (ImportError, ValueError):
            continue
        if spec is None or spec.origin is None or spec.loader is None:  # not found, or a namespace portion
            continue
        if _os.path.realpath(spec.origin) == _os.path.realpath(_os.path.join(here, "__init__.py")):
            continue
        return spec
    inner = _os.path.join(here, name, "__init__.py")
    if not _os.path.isfile(inner):
        raise ImportError(f"{here} is a clone of the simu_fast repository, imported as `{name}` because Python "
                          f"runs in the folder above it, and {inner} is missing; run Python from another folder, "
                          "or install the package (pip install --no-build-isolation -e .)", name=name)
    return _util.spec_from_file_location(name, inner)


if __name__ == "simu_fast":
    _spec = _real_spec(__name__, _os.path.dirname(_os.path.abspath(__file__)))
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_module)
