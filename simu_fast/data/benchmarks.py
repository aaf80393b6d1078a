"""Loaders for local copies of the MUSE and WMDP benchmark files, in the layouts they are published in (nothing
is downloaded).

MUSE (Shi et al. 2024, arXiv 2407.06460; hub datasets muse-bench/MUSE-News and muse-bench/MUSE-Books; code
github.com/swj0419/muse_bench) comes in two layouts, one folder per subset in both:
- the hub's: <subset>/<split>-00000-of-00001.parquet, what `datasets.load_dataset("muse-bench/MUSE-News",
  subset, split=...)` reads. raw: forget, holdout, retain1, retain2 ({text}); verbmem: forget ({prompt, gt});
  knowmem: forget_qa, retain_qa, forget_qa_icl, retain_qa_icl ({question, answer}); privleak: forget,
  retain, holdout ({text}). (Older revisions of the hub repos name the retain splits retain2_qa / retain2.)
- muse_bench's load_data.py writes data/<news|books>/<subset>/<split>.json: a JSON array of strings (raw,
  privleak), of {"prompt", "gt"} (verbmem) or of {"question", "answer"} (knowmem), each on one line; and
  raw/<split>.txt, the texts of a split joined by blank lines, which muse_bench's unlearning baselines read
  as one token stream cut into windows (baselines/baselines/dataset.py).
The .json / .parquet files give one text per document; a .txt file cannot be split back into its documents.

WMDP (Li et al. 2024, arXiv 2403.03218; hub dataset cais/wmdp): wmdp-bio/, wmdp-chem/, wmdp-cyber/, each
test-00000-of-00001.parquet with rows {question, choices: [4 strings], answer: index of the right choice},
read into the item dicts simu_fast.eval.utility.multiple_choice_accuracy takes.

Every loader names the file and the row of a problem: "line 7" in JSON Lines, "row 3 (line 5)" in a JSON
array, "row 3" in Parquet.
"""
from __future__ import annotations

import glob
import json
import math
import numbers
import os

from .example import Example
from .json_rows import json_array_rows, json_lines_rows

MUSE_PARTS = {  # name -> (subset, candidate split names, kind); the first split name found is used
    "verbmem_forget": ("verbmem", ("forget",), "verbmem"),
    "knowmem_forget_qa": ("knowmem", ("forget_qa",), "knowmem"),
    "knowmem_forget_qa_icl": ("knowmem", ("forget_qa_icl",), "knowmem"),
    "knowmem_retain_qa": ("knowmem", ("retain_qa", "retain2_qa"), "knowmem"),
    "knowmem_retain_qa_icl": ("knowmem", ("retain_qa_icl", "retain2_qa_icl"), "knowmem"),
    "privleak_forget": ("privleak", ("forget",), "texts"),
    "privleak_retain": ("privleak", ("retain", "retain2"), "texts"),
    "privleak_holdout": ("privleak", ("holdout",), "texts"),
    "raw_forget": ("raw", ("forget",), "texts"),
    "raw_holdout": ("raw", ("holdout",), "texts"),
    "raw_retain1": ("raw", ("retain1",), "texts"),
    "raw_retain2": ("raw", ("retain2",), "texts"),
}
_ROW_TYPES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def load_muse_texts(path, paragraphs: bool = False) -> list[str]:
    """The texts of a MUSE raw or privleak split: a JSON array of strings (or of {"text"} objects), JSON Lines
    of {"text"} objects, a Parquet file with a "text" column, or muse_bench's raw/<split>.txt. A .txt file is
    returned whole, as one text (its documents were joined by blank lines and cannot be told apart);
    paragraphs=True splits it at blank lines instead."""
    path = _check_path(path)
    if path.lower().endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ValueError(f"{path} is empty: no texts to load")
        if not paragraphs:
            return [text]
        return [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    texts = []
    for where, row in _rows(path):
        if isinstance(row, dict):
            value = _text(path, where, row, "text")
        elif isinstance(row, str):
            value = row
        else:
            raise ValueError(f"{path}: {where} is a {_json_type(row)}, not a text (a string or an object with a "
                             "'text' field)")
        if not value.strip():
            raise ValueError(f"{path}: {where} is an empty text")
        texts.append(value)
    return texts


def load_muse_knowmem(path) -> list[Example]:
    """A MUSE knowmem split (forget_qa, retain_qa and their few-shot _icl files): {question, answer} rows as
    Examples (prompt = question, answer = answer, task "muse_knowmem"; other fields go into extra)."""
    return _examples(path, "question", "answer", "muse_knowmem")


def load_muse_verbmem(path) -> list[Example]:
    """MUSE's verbmem forget split: {prompt, gt} rows (an excerpt of a forget document and its true
    continuation) as Examples (prompt = prompt, answer = gt, task "muse_verbmem")."""
    return _examples(path, "prompt", "gt", "muse_verbmem")


def muse_files(root) -> dict[str, list[str]]:
    """{part: [paths]} of the MUSE files found under `root` (a corpus folder: a snapshot of the hub dataset, or
    muse_bench's data/news or data/books), for the parts of MUSE_PARTS that are there: the hub's
    <subset>/<split>-*.parquet shards first (what `datasets` reads), else muse_bench's <subset>/<split>.json."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no MUSE folder at {root}")
    found = {}
    for part, (subset, splits, _) in MUSE_PARTS.items():
        for split in splits:
            shards = sorted(glob.glob(os.path.join(glob.escape(root), subset, f"{glob.escape(split)}-*.parquet")))
            if shards:
                found[part] = shards
                break
            candidate = os.path.join(root, subset, f"{split}.json")
            if os.path.isfile(candidate):
                found[part] = [candidate]
                break
    if not found:
        raise FileNotFoundError(f"no MUSE files under {root}: expected <subset>/<split>-*.parquet (the hub's "
                                "layout) or <subset>/<split>.json (muse_bench's load_data.py) for the subsets "
                                "verbmem, knowmem, privleak, raw")
    return found


def load_muse(root, parts=None) -> dict:
    """{part: data} for the MUSE parts found under `root` (see muse_files): list[Example] for verbmem and
    knowmem parts, list[str] for privleak and raw parts. parts: the names wanted (an error names any missing);
    None: every part found."""
    found = muse_files(root)
    if parts is None:
        wanted = list(found)
    else:
        wanted = [parts] if isinstance(parts, str) else list(parts)
        unknown = [p for p in wanted if p not in MUSE_PARTS]
        if unknown:
            raise ValueError(f"unknown MUSE part(s) {unknown}; choose from {', '.join(MUSE_PARTS)}")
        missing = [p for p in wanted if p not in found]
        if missing:
            raise FileNotFoundError(f"{os.fspath(root)} lacks the MUSE part(s) {missing} (found: "
                                    f"{', '.join(found) or 'none'})")
    loaders = {"verbmem": load_muse_verbmem, "knowmem": load_muse_knowmem, "texts": load_muse_texts}
    out = {}
    for part in wanted:
        kind = MUSE_PARTS[part][2]
        out[part] = []
        for path in found[part]:
            out[part] += loaders[kind](path)
    return out


def load_wmdp(path) -> list[dict]:
    """WMDP multiple-choice items from a local cais/wmdp file (Parquet, a JSON array or JSON Lines): each row
    {question, choices, answer} checked and returned as {"question": str, "choices": [str, ...], "answer":
    int}, the item format of simu_fast.eval.utility.multiple_choice_accuracy (other fields are left out)."""
    path = _check_path(path)
    items = []
    for where, row in _rows(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} is a {_json_type(row)}, not an object with question, choices and "
                             "answer")
        question = _text(path, where, row, "question")
        if not question.strip():
            raise ValueError(f"{path}: {where}: field 'question' is empty")
        choices = row.get("choices")
        if _missing(choices):
            raise ValueError(f"{path}: {where} has no 'choices' field (missing or null)")
        if (not isinstance(choices, (list, tuple)) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise ValueError(f"{path}: {where}: field 'choices' must be a list of two or more non-empty strings, "
                             f"got {choices!r}")
        answer = row.get("answer")
        if _missing(answer):
            raise ValueError(f"{path}: {where} has no 'answer' field (missing or null)")
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(choices):
            raise ValueError(f"{path}: {where}: field 'answer' must be the index of the right choice (0 to "
                             f"{len(choices) - 1}), got {answer!r}")
        items.append({"question": question, "choices": list(choices), "answer": int(answer)})
    return items


# ------------------------------------------------------------------------------------------------ reading rows
def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data file at {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give the path of one data file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: nothing to load")
    return path


def _rows(path: str) -> list[tuple[str, object]]:
    """[(where, row)] of a JSON array, JSON Lines or Parquet file; "where" is "row N (line L)", "line L" or
    "row N". A JSON file that does not start with '[' is read as JSON Lines."""
    ext = os.path.splitext(path)[1].lower()
    file_type = _ROW_TYPES.get(ext)
    if file_type is None:
        raise ValueError(f"cannot tell the file type of {path} from its extension (known: "
                         f"{', '.join(_ROW_TYPES)})")
    if file_type == "parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise ValueError(f"could not read {path} as parquet: {type(e).__name__}: {e}") from e
        located = [(f"row {i + 1}", row) for i, row in enumerate(rows)]
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if file_type == "json" and text.lstrip().startswith("["):
            located = json_array_rows(path, text)
        else:
            located = json_lines_rows(path, text)
    if not located:
        raise ValueError(f"{path} has no rows: nothing to load")
    return located


# ------------------------------------------------------------------------------------------------ fields
def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json_type(value) -> str:
    return {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), f"JSON {type(value).__name__}")


def _text(path, where, row, field) -> str:
    value = row.get(field)
    if _missing(value):
        raise ValueError(f"{path}: {where} has no {field!r} field (missing or null)")
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: field {field!r} must be text, got a {type(value).__name__}")
    return value


def _examples(path, prompt_field: str, answer_field: str, task: str) -> list[Example]:
    path = _check_path(path)
    examples = []
    for where, row in _rows(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} is a {_json_type(row)}, not an object with {prompt_field!r} and "
                             f"{answer_field!r} fields")
        prompt = _text(path, where, row, prompt_field)
        answer = _text(path, where, row, answer_field)
        extra = {k: v for k, v in row.items() if k not in (prompt_field, answer_field) and not _missing(v)}
        examples.append(Example(prompt=prompt, answer=answer, task=task, extra=extra))
    return examples
