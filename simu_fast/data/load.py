"""load_examples: local JSON / JSON Lines / CSV / Parquet files (LUME, TOFU or any prompt/answer columns) to Examples.

Files are read through the `datasets` library's packaged builders ("json", "csv", "parquet") with local
`data_files` only, a private temporary cache and the result kept in memory: nothing is downloaded and
nothing is left behind in the user's datasets cache. JSON files are first scanned with the `json` module
so that a syntax error names its line (the `datasets` error would not).
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile

from .example import Example

FORMATS = ("auto", "lume", "tofu", "json", "jsonl", "csv", "parquet")
PROMPT_FIELDS = ("input", "question", "prompt", "instruction")  # detection order
ANSWER_FIELDS = ("output", "answer", "response", "completion")
_FIXED_FIELDS = {"lume": ("input", "output"), "tofu": ("question", "answer")}
_TOFU_LIST_FIELDS = ("paraphrased_answer", "perturbed_answer")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
               ".pq": "parquet"}


def load_examples(path, format: str = "auto", prompt_field: str | None = None,
                  answer_field: str | None = None) -> list[Example]:
    """Read every row of a local file as an Example.

    format: "auto" (from the file's extension), "lume" ({id, input, output, task} rows), "tofu" ({question,
    answer} rows; optional paraphrased_answer / perturbed_answer, kept in `extra` as lists of strings), or a
    file type "json" (a JSON array of objects, or JSON Lines), "jsonl", "csv", "parquet". Outside lume/tofu the
    prompt and answer columns are `prompt_field` / `answer_field` or, when not given, the first present of
    input/question/prompt/instruction and output/answer/response/completion. Columns "id" and "task" fill
    Example.id / Example.task; every other column goes into Example.extra (null values left out).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data file at {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give the path of one data file")
    if format in _FIXED_FIELDS:
        fixed = _FIXED_FIELDS[format]
        for given, default, role in ((prompt_field, fixed[0], "prompt_field"), (answer_field, fixed[1], "answer_field")):
            if given is not None and given != default:
                raise ValueError(f"format={format!r} reads the fields {fixed[0]!r}/{fixed[1]!r}; {role}={given!r} "
                                 "needs a plain file format (format='json', 'jsonl', 'csv' or 'parquet')")
        prompt_field, answer_field = fixed
    if prompt_field is not None and prompt_field == answer_field:
        raise ValueError(f"prompt_field and answer_field are both {prompt_field!r}")
    file_type = _file_type(path, format)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: no examples to load")

    locations = _scan(path, file_type)  # where each row is, for error messages ("line 7", "row 3")
    rows = _read(path, file_type)
    if not rows:
        raise ValueError(f"{path} has no rows: no examples to load")
    if locations is None or len(locations) != len(rows):
        locations = [f"row {i + 1}" for i in range(len(rows))]

    columns = {key for row in rows for key in row if not key.startswith("__index_level_")}
    prompt_field = _pick_field(path, columns, prompt_field, PROMPT_FIELDS, "prompt", format)
    answer_field = _pick_field(path, columns, answer_field, ANSWER_FIELDS, "answer", format)
    if prompt_field == answer_field:
        raise ValueError(f"{path}: prompt and answer would both come from column {prompt_field!r}; "
                         "pass prompt_field= and answer_field=")
    return [_example(path, where, row, prompt_field, answer_field, format) for where, row in zip(locations, rows)]


def _file_type(path: str, format: str) -> str:
    if format in ("json", "jsonl", "csv", "parquet"):
        return format
    name = path.lower()
    for ext, file_type in _EXTENSIONS.items():
        if name.endswith(ext):
            return file_type
    what = f"format={format!r} data" if format != "auto" else "the format"
    raise ValueError(f"cannot tell {what} file type of {path} from its extension (known: "
                     f"{', '.join(_EXTENSIONS)}); pass format= one of {', '.join(FORMATS[3:])}")


def _scan(path: str, file_type: str) -> list[str] | None:
    """Check JSON syntax with the json module; return each row's location ('line N' / 'row N'). For CSV and
    Parquet check only that there is a row (`datasets` fails on none with an obscure message)."""
    if file_type == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)  # the header
            if not any(any(cell.strip() for cell in row) for row in reader):
                raise ValueError(f"{path} has no rows after its CSV header: no examples to load")
        return None
    if file_type == "parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            raise ValueError(f"could not read {path} as parquet: {type(e).__name__}: {e}") from e
        if rows == 0:
            raise ValueError(f"{path} has no rows: no examples to load")
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if file_type == "json" and text.lstrip().startswith("["):  # a JSON array of objects
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not data:
            raise ValueError(f"{path} holds an empty JSON array: no examples to load")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {i + 1} of the JSON array is a {type(row).__name__}, not an object "
                                 "with prompt and answer fields")
        return [f"row {i + 1}" for i in range(len(data))]
    locations = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if lineno == 1:
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    hint = " (the file holds one JSON object; rows must be a JSON array of objects or JSON Lines)"
            raise ValueError(f"{path}: line {lineno} is not valid JSON: {e.msg} (column {e.colno}){hint}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object with prompt and "
                             "answer fields")
        locations.append(f"line {lineno}")
    if not locations:
        raise ValueError(f"{path} has only blank lines: no examples to load")
    return locations


def _read(path: str, file_type: str) -> list[dict]:
    try:
        import datasets
        from datasets.utils import logging as datasets_logging
    except ImportError as e:  # pragma: no cover - datasets is in requirements.txt
        raise ImportError("load_examples needs the `datasets` package (pip install datasets)") from e
    builder = "json" if file_type in ("json", "jsonl") else file_type
    kwargs = _csv_kwargs(path) if file_type == "csv" else {}
    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="simu_fast_data_") as cache:
            ds = datasets.load_dataset(builder, data_files=[os.path.abspath(path)], split="train", cache_dir=cache,
                                       keep_in_memory=True, **kwargs)
            return ds.to_list()
    except Exception as e:
        raise ValueError(f"could not read {path} as {file_type}: {type(e).__name__}: {e}") from e
    finally:
        if bars:
            datasets_logging.enable_progress_bar()


def _csv_kwargs(path: str) -> dict:
    """Keep every CSV cell as the text written (no number parsing, '0012' stays '0012'); only empty cells are null."""
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"{path} has no CSV header row: no examples to load")
    return dict(converters={name: str for name in header}, keep_default_na=False, na_values=[""])


def _pick_field(path, columns, given, candidates, role, format) -> str:
    if given is not None:
        if given not in columns:
            source = f"format={format!r} needs" if format in _FIXED_FIELDS else f"{role}_field is"
            raise ValueError(f"{path}: no column {given!r} ({source} {given!r}); the columns are {sorted(columns)}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{path}: cannot tell which column holds the {role}: none of {', '.join(candidates)} is present "
                     f"(the columns are {sorted(columns)}); pass {role}_field=")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(path, where, row, field) -> str:
    value = row.get(field)
    if _missing(value):
        raise ValueError(f"{path}: {where} has no {field!r} field (missing or null)")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):  # bool is an int
        return str(value)
    raise ValueError(f"{path}: {where}: field {field!r} must be text, got a {type(value).__name__}")


def _example(path, where, row, prompt_field, answer_field, format) -> Example:
    prompt = _text(path, where, row, prompt_field)
    answer = _text(path, where, row, answer_field)
    ident = None if _missing(row.get("id")) else str(row["id"])
    task = None if _missing(row.get("task")) else str(row["task"])
    used = {prompt_field, answer_field, "id", "task"}
    extra = {k: v for k, v in row.items() if k not in used and not k.startswith("__index_level_") and not _missing(v)}
    if format == "tofu":
        for name in _TOFU_LIST_FIELDS:
            if name in extra:
                extra[name] = _string_list(path, where, name, extra[name])
    return Example(prompt=prompt, answer=answer, id=ident, task=task, extra=extra)


def _string_list(path, where, name, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{path}: {where}: field {name!r} must be a string or a list of strings, "
                     f"got {type(value).__name__}")
