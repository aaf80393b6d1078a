"""The rows of a JSON array or JSON Lines text, each with where it stands ("row N (line L)", "line L"), so that a
loader's error can name the row and line (json.loads would lose them). Used by the benchmark loaders
(benchmarks.py) and the multiple-choice reader (eval/utility.py)."""
from __future__ import annotations

import json


def json_lines_rows(path: str, text: str) -> list:
    """[("line L", row)] of a JSON Lines text (blank lines skipped); a ValueError naming the line of bad JSON."""
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            rows.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from None
    return rows


def json_array_rows(path: str, text: str) -> list:
    """The elements of a JSON array, each located by its index and the line it starts on."""
    decoder, rows = json.JSONDecoder(), []
    i = _skip_space(text, text.index("[") + 1)
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            start = i
            try:
                row, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {len(rows) + 1} (line {e.lineno}) is not valid JSON: {e.msg} "
                                 f"(column {e.colno})") from None
            rows.append((f"row {len(rows) + 1} (line {text.count(chr(10), 0, start) + 1})", row))
            i = _skip_space(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip_space(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i += 1
                break
            raise ValueError(f"{path}: invalid JSON at line {text.count(chr(10), 0, i) + 1}: expected ',' or ']' "
                             f"after row {len(rows)} of the array")
    if text[i:].strip():
        raise ValueError(f"{path}: unexpected text after the JSON array at line {text.count(chr(10), 0, i) + 1}")
    return rows


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i
