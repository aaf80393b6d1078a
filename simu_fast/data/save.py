"""save_examples: Examples to JSON Lines, written atomically (a temporary file in the same directory, then rename).

Rows use LUME's field names, {"id", "input", "output", "task", **extra}, so load_examples reads them back
with format "auto", "jsonl" or "lume". Fields that are None are left out.
"""
from __future__ import annotations

import json

from ..io import write_atomic
from .example import Example

_RESERVED = ("id", "input", "output", "task")


def _row(example: Example, index: int) -> dict:
    if not isinstance(example, Example):
        raise TypeError(f"save_examples takes Example objects; item {index} is {type(example).__name__}")
    clash = [k for k in example.extra if k in _RESERVED]
    if clash:
        raise ValueError(f"example {index} (id {example.id!r}): extra has the reserved field(s) {clash}, which "
                         f"would overwrite the row's own {', '.join(_RESERVED)}")
    row = {"id": example.id, "input": example.prompt, "output": example.answer, "task": example.task}
    row = {k: v for k, v in row.items() if v is not None}
    row.update(example.extra)
    return row


def save_examples(examples, path) -> None:
    """Write `examples` to `path` as JSON Lines (UTF-8, one object a line)."""
    examples = list(examples)
    lines = []
    for i, example in enumerate(examples):
        try:
            lines.append(json.dumps(_row(example, i), ensure_ascii=False))
        except TypeError as e:  # json cannot encode something in extra
            if isinstance(example, Example):
                raise TypeError(f"example {i} (id {example.id!r}) cannot be written as JSON: {e}") from e
            raise
    write_atomic(path, "".join(line + "\n" for line in lines))
