"""Imports run downward only: no module of simu_fast imports one of a higher layer.

Layers, top first (a module may import its own layer and any layer below it):
    cli                      the command line (cli/, __main__.py)
    workloads                the demo and the benchmark protocol's model builders; the package root
                             (simu_fast/__init__.py re-exports the Unlearner)
    eval                     metrics; above training because the relearning attack fine-tunes a copy of the model
                             with the training loop (training takes its evaluation as an eval_fn, it imports none)
    training, integrations   the loop, checkpoints, RNG state, fine-tuning; the transformers Trainer
    methods                  unlearning objectives and recipes
    selftest                 `simu-fast selftest`: every kernel against its reference on this machine
    optim, select, attribution
    ops                      the ops and the kernels they dispatch to (_extension, triton_kernels)
    data                     loaders, tokenization, each rank's share of the data
    lm, io, distributed      what every layer shares
Every import counts, those inside functions and under TYPE_CHECKING too (a lazy import is still a dependency).
"""
import ast
import os

import pytest

import simu_fast

PACKAGE_DIR = os.path.dirname(os.path.abspath(simu_fast.__file__))
LAYERS = [
    {"cli", "__main__"},
    {"workloads", "<root>"},
    {"eval"},
    {"training", "integrations"},
    {"methods"},
    {"selftest"},
    {"optim", "select", "attribution"},
    {"ops", "_extension", "triton_kernels"},
    {"data"},
    {"lm", "io", "distributed"},
]
RANK = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str:
    """The first component below simu_fast ('<root>' for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _is_module(dotted: str) -> bool:
    path = os.path.join(os.path.dirname(PACKAGE_DIR), *dotted.split("."))
    return os.path.isdir(path) or os.path.isfile(path + ".py")


def imported_modules(path: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every simu_fast module that the file at `path` imports."""
    package = module if is_package else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from . import distributed` imports the submodule simu_fast.distributed
                target = f"{base}.{alias.name}"
                out.append((node.lineno, target if _is_module(target) else base))
    return [(line, name) for line, name in out if name == "simu_fast" or name.startswith("simu_fast.")]


def modules():
    root = os.path.dirname(PACKAGE_DIR)
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                is_package = name == "__init__.py"
                yield path, (dotted[:-len(".__init__")] if is_package else dotted), is_package


def upward_imports() -> list[str]:
    found = []
    for path, module, is_package in modules():
        here = room_of(module)
        for line, target in imported_modules(path, module, is_package):
            there = room_of(target)
            if RANK[there] < RANK[here]:
                found.append(f"{os.path.relpath(path, os.path.dirname(PACKAGE_DIR))}:{line}: {here} imports "
                             f"{target} ({there} is a higher layer)")
    return found


def test_every_room_has_a_layer():
    rooms = {room_of(module) for _, module, _ in modules()}
    assert rooms - set(RANK) == set(), "give the new room a layer in LAYERS"


def test_imports_run_downward():
    assert upward_imports() == []


def test_an_upward_import_is_found(tmp_path, monkeypatch):
    """The check itself can fail: a module of ops that imports training is reported."""
    bad = os.path.join(PACKAGE_DIR, "ops", "update_mask.py")
    source = open(bad, encoding="utf-8").read()
    copy = tmp_path / "update_mask.py"
    copy.write_text(source + "\n\ndef _upward():\n    from ..training import Unlearner\n", encoding="utf-8")
    real_modules = modules

    def patched():
        for path, module, is_package in real_modules():
            yield (str(copy) if path == bad else path), module, is_package
    monkeypatch.setitem(globals(), "modules", patched)
    found = upward_imports()
    assert len(found) == 1 and "ops imports simu_fast.training (training is a higher layer)" in found[0]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
