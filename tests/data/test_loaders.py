"""load_examples and save_examples: every format round-trips, LUME on the real files, TOFU, every error path."""
import csv
import json
import os
from pathlib import Path

import pytest

from simu_fast.data import FORMATS, Example, load_examples, save_examples

LUME = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lume"  # <repo>/../shared/data/lume

EXAMPLES = [
    Example("Where was Ilsa Mornay born?", "Ilsa Mornay was born in Varnholt.", id="p0-birthplace", task="people",
            extra={"person": "Ilsa Mornay"}),
    Example("Finish: the ferry left", " at dawn, ünïcode and \"quotes\", too", id="p1-sc", task="people",
            extra={"person": "Dorn Vask"}),
    Example("In which year?", "0012", id="p2", task="people", extra={"person": "Kel Brae"}),
]


def write_jsonl(path, rows, blank_after=()):
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if i in blank_after:
                f.write("\n")
    return path


def rows_of(examples):
    return [{"id": e.id, "input": e.prompt, "output": e.answer, "task": e.task, **e.extra} for e in examples]


# ----------------------------------------------------------------------------------------------- round trips
def test_save_and_load_jsonl_round_trip(tmp_path):
    path = tmp_path / "sub" / "examples.jsonl"
    save_examples(EXAMPLES, path)
    assert os.listdir(path.parent) == ["examples.jsonl"]  # no temporary file left behind
    for format in ("auto", "jsonl", "json", "lume"):
        assert load_examples(path, format=format) == EXAMPLES
    save_examples(EXAMPLES[:1], path)  # overwrites
    assert load_examples(str(path)) == EXAMPLES[:1]


def test_json_array_round_trip(tmp_path):
    path = tmp_path / "examples.json"
    path.write_text(json.dumps(rows_of(EXAMPLES), indent=2), encoding="utf-8")
    assert load_examples(path) == EXAMPLES
    assert load_examples(path, format="json") == EXAMPLES


def test_unicode_line_separators_inside_strings(tmp_path):
    rows = [{"input": "a\u2028b\x85c", "output": "d\re"}, {"input": "f", "output": "g"}]
    path = tmp_path / "seps.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    assert [(e.prompt, e.answer) for e in load_examples(path)] == [("a\u2028b\x85c", "d\re"), ("f", "g")]


def test_json_lines_in_a_dot_json_file(tmp_path):
    path = write_jsonl(tmp_path / "examples.json", rows_of(EXAMPLES))
    assert load_examples(path) == EXAMPLES


def test_csv_round_trip_keeps_text_as_written(tmp_path):
    path = tmp_path / "examples.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "input", "output", "task", "person"])
        writer.writeheader()
        writer.writerows(rows_of(EXAMPLES))
        writer.writerow({"id": 7, "input": "multi\nline prompt", "output": "NA", "task": "people", "person": ""})
    loaded = load_examples(path)
    assert loaded[:3] == EXAMPLES  # "0012" stays text
    assert loaded[3] == Example("multi\nline prompt", "NA", id="7", task="people", extra={})  # "NA" is an answer


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "examples.parquet"
    pq.write_table(pa.Table.from_pylist(rows_of(EXAMPLES)), path)
    assert load_examples(path) == EXAMPLES
    assert load_examples(path, format="parquet") == EXAMPLES


def test_field_detection_and_explicit_fields(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "say hi", "completion": "hi", "source": "x"}])
    assert load_examples(path) == [Example("say hi", "hi", extra={"source": "x"})]
    path = write_jsonl(tmp_path / "b.jsonl", [{"q": "one?", "a": 1, "input": "ignored"}])
    assert load_examples(path, prompt_field="q", answer_field="a") == [
        Example("one?", "1", extra={"input": "ignored"})]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r", "question": "q"}])
    assert load_examples(path)[0].prompt == "q"  # detection order: input, question, prompt, instruction


# ----------------------------------------------------------------------------------------------- LUME and TOFU
@pytest.mark.skipif(not LUME.is_dir(), reason=f"LUME data not found at {LUME} (../shared/data/lume from the repo root)")
@pytest.mark.parametrize("split", ["forget", "retain"])
def test_lume_real_files(split):
    path = LUME / f"{split}.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = load_examples(path, format="lume")
    assert len(examples) == len(lines) > 2000
    for row, ex in zip(lines, examples):
        assert (ex.id, ex.prompt, ex.answer, ex.task, ex.extra) == (row["id"], row["input"], row["output"],
                                                                     row["task"], {})
    assert {ex.task for ex in examples} == {"Task1", "Task2", "Task3"}
    assert any(ex.id.endswith("qa0") for ex in examples) and any("sc" in ex.id for ex in examples)
    assert load_examples(path) == examples  # auto finds the same fields


def test_tofu_with_optional_fields(tmp_path):
    rows = [{"question": "Who wrote X?", "answer": "A. Bel wrote X.", "paraphrased_answer": "X is by A. Bel.",
             "perturbed_answer": ["C. Dee wrote X.", "E. Eff wrote X."]},
            {"question": "When?", "answer": "In 1990."}]
    for path in (write_jsonl(tmp_path / "tofu.jsonl", rows), tmp_path / "tofu.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(rows), encoding="utf-8")
        examples = load_examples(path, format="tofu")
        assert examples[0] == Example("Who wrote X?", "A. Bel wrote X.", extra={
            "paraphrased_answer": ["X is by A. Bel."], "perturbed_answer": ["C. Dee wrote X.", "E. Eff wrote X."]})
        assert examples[1] == Example("When?", "In 1990.")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a", "perturbed_answer": [1, 2]},
                                               {"question": "q", "answer": "a", "perturbed_answer": ["x"]}])
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1: field 'perturbed_answer' must be a string or a list"):
        load_examples(bad, format="tofu")


# ----------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_examples(tmp_path)


def test_unknown_format_lists_the_choices(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(EXAMPLES))
    with pytest.raises(ValueError, match="unknown format 'xml'") as e:
        load_examples(path, format="xml")
    assert all(name in str(e.value) for name in FORMATS)
    other = tmp_path / "a.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"cannot tell the format file type of .*a.txt from its extension.*pass format="):
        load_examples(other)


def test_malformed_json_line_names_file_and_line(tmp_path):
    rows = rows_of(EXAMPLES)
    path = write_jsonl(tmp_path / "broken.jsonl", [rows[0], rows[1], '{"id": "x", "input": "a", "output": '],
                       blank_after=(0,))  # a blank line 2 counts: the bad row is on line 4
    with pytest.raises(ValueError, match=r"broken.jsonl: line 4 is not valid JSON"):
        load_examples(path)
    path = write_jsonl(tmp_path / "list.jsonl", [rows[0], "[1, 2]"])
    with pytest.raises(ValueError, match=r"list.jsonl: line 2 is a JSON list, not an object"):
        load_examples(path)
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps({"data": rows}, indent=1))
    with pytest.raises(ValueError, match="line 1 is not valid JSON.*holds one JSON object"):
        load_examples(path)


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"input": "a", "output": "b"},\n  {"input": "c" "output": "d"}\n]\n')
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON at line 3, column"):
        load_examples(path)
    path.write_text('[{"input": "a", "output": "b"}, "text"]')
    with pytest.raises(ValueError, match=r"broken.json: row 2 of the JSON array is a str"):
        load_examples(path)


def test_row_missing_a_field_names_row_and_field(tmp_path):
    rows = rows_of(EXAMPLES)
    del rows[2]["output"]
    path = write_jsonl(tmp_path / "holes.jsonl", rows, blank_after=(0,))
    with pytest.raises(ValueError, match=r"holes.jsonl: line 4 has no 'output' field"):
        load_examples(path)
    rows = rows_of(EXAMPLES)
    rows[1]["input"] = None
    path = write_jsonl(tmp_path / "null.jsonl", rows)
    with pytest.raises(ValueError, match=r"null.jsonl: line 2 has no 'input' field \(missing or null\)"):
        load_examples(path, format="lume")
    path = tmp_path / "holes.csv"
    path.write_text("input,output\na,b\nc,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holes.csv: row 2 has no 'output' field"):
        load_examples(path)
    rows = rows_of(EXAMPLES)
    rows[0]["output"] = {"nested": 1}
    path = write_jsonl(tmp_path / "typed.jsonl", rows)
    with pytest.raises(ValueError, match=r"typed.jsonl: line 1: field 'output' must be text, got a dict"):
        load_examples(path)


def test_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"text": "a", "label": "b"}])
    with pytest.raises(ValueError, match=r"cannot tell which column holds the prompt.*\['label', 'text'\].*prompt_field="):
        load_examples(path)
    with pytest.raises(ValueError, match=r"cannot tell which column holds the answer.*answer_field="):
        load_examples(path, prompt_field="text")
    with pytest.raises(ValueError, match=r"no column 'body' \(prompt_field is 'body'\)"):
        load_examples(path, prompt_field="body", answer_field="label")
    lume = write_jsonl(tmp_path / "lume.jsonl", rows_of(EXAMPLES))
    with pytest.raises(ValueError, match=r"no column 'question' \(format='tofu' needs 'question'\)"):
        load_examples(lume, format="tofu")
    with pytest.raises(ValueError, match=r"format='lume' reads the fields 'input'/'output'"):
        load_examples(lume, format="lume", prompt_field="task")
    with pytest.raises(ValueError, match="both 'input'"):
        load_examples(lume, prompt_field="input", answer_field="input")


def test_empty_files(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.csv", "empty.parquet"):
        (tmp_path / name).write_text("")
        with pytest.raises(ValueError, match=f"{name} is empty"):
            load_examples(tmp_path / name)
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="blank.jsonl has only blank lines"):
        load_examples(tmp_path / "blank.jsonl")
    (tmp_path / "array.json").write_text("[]")
    with pytest.raises(ValueError, match="array.json holds an empty JSON array"):
        load_examples(tmp_path / "array.json")
    (tmp_path / "header.csv").write_text("input,output\n")
    with pytest.raises(ValueError, match="header.csv has no rows after its CSV header"):
        load_examples(tmp_path / "header.csv")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": pa.array([], pa.string()), "output": pa.array([], pa.string())}),
                   tmp_path / "rowless.parquet")
    with pytest.raises(ValueError, match="rowless.parquet has no rows"):
        load_examples(tmp_path / "rowless.parquet")


def test_unreadable_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match=r"could not read .*junk.parquet as parquet"):
        load_examples(path)


def test_save_examples_errors(tmp_path):
    with pytest.raises(ValueError, match=r"example 0 .*reserved field\(s\) \['input'\]"):
        save_examples([Example("a", "b", extra={"input": "x"})], tmp_path / "x.jsonl")
    with pytest.raises(TypeError, match="item 0 is dict"):
        save_examples([{"prompt": "a"}], tmp_path / "x.jsonl")
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        save_examples([Example("a", "b", extra={"obj": object()})], tmp_path / "x.jsonl")
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left
