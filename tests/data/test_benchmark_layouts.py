"""MUSE and WMDP files in their published layouts, written here (nothing is downloaded) and read back: the hub's
Parquet files, muse_bench's JSON / .txt files, WMDP's Parquet rows; every error names the file and the row."""
import json

import pytest

from simu_fast.data import Example
from simu_fast.data.benchmarks import (MUSE_PARTS, load_muse, load_muse_knowmem, load_muse_texts,
                                       load_muse_verbmem, load_wmdp, muse_files)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = ["First article.\n\nIts second paragraph, ünïcode.", "Second article: \"quoted\"."]
QA = [{"question": "Who won the cup?", "answer": "The Lions"}, {"question": "When?", "answer": "In 2023"}]
ICL = [{"question": "Where was it held?", "answer": "Cardiff"}]
VERBMEM = [{"prompt": "The minister said that", "gt": " the budget would rise."},
           {"prompt": "On Tuesday", "gt": " the storm reached the coast."}]
WMDP = [{"question": "Which is a gas?", "choices": ["iron", "neon", "salt", "wood"], "answer": 1},
        {"question": "2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
        {"question": "Last one", "choices": ["a", "b", "c", "d"], "answer": 3}]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_json(path, obj, indent=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


def hub_layout(root):
    """muse-bench/MUSE-News on the hub: <subset>/<split>-00000-of-00001.parquet."""
    shard = "-00000-of-00001.parquet"
    write_parquet(root / "verbmem" / f"forget{shard}", VERBMEM)
    for split, rows in (("forget_qa", QA), ("forget_qa_icl", ICL), ("retain_qa", QA[::-1]), ("retain_qa_icl", ICL)):
        write_parquet(root / "knowmem" / f"{split}{shard}", rows)
    for split in ("forget", "retain", "holdout"):
        write_parquet(root / "privleak" / f"{split}{shard}", [{"text": f"{split} {t}"} for t in TEXTS])
    for split in ("forget", "holdout", "retain1", "retain2"):
        write_parquet(root / "raw" / f"{split}{shard}", [{"text": f"{split} {t}"} for t in TEXTS])
    return root


def muse_bench_layout(root):
    """What muse_bench's load_data.py writes: data/news/<subset>/<split>.json (one line each) and raw/*.txt."""
    write_json(root / "verbmem" / "forget.json", VERBMEM)
    for split, rows in (("forget_qa", QA), ("forget_qa_icl", ICL), ("retain_qa", QA[::-1]), ("retain_qa_icl", ICL)):
        write_json(root / "knowmem" / f"{split}.json", rows)
    for split in ("forget", "retain", "holdout"):
        write_json(root / "privleak" / f"{split}.json", [f"{split} {t}" for t in TEXTS])
    for split in ("forget", "holdout", "retain1", "retain2"):
        texts = [f"{split} {t}" for t in TEXTS]
        write_json(root / "raw" / f"{split}.json", texts)
        (root / "raw" / f"{split}.txt").write_text("\n\n".join(texts), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------------ MUSE
@pytest.mark.parametrize("layout", [hub_layout, muse_bench_layout])
def test_both_muse_layouts_read_back(tmp_path, layout):
    root = layout(tmp_path / "news")
    data = load_muse(root)
    assert set(data) == set(MUSE_PARTS)
    assert data["verbmem_forget"] == [Example(r["prompt"], r["gt"], task="muse_verbmem") for r in VERBMEM]
    assert data["knowmem_forget_qa"] == [Example(r["question"], r["answer"], task="muse_knowmem") for r in QA]
    assert [e.prompt for e in data["knowmem_retain_qa"]] == [r["question"] for r in QA[::-1]]
    assert [e.answer for e in data["knowmem_forget_qa_icl"]] == ["Cardiff"]
    assert data["privleak_holdout"] == [f"holdout {t}" for t in TEXTS]
    assert data["raw_retain2"] == [f"retain2 {t}" for t in TEXTS]
    only = load_muse(root, parts=["privleak_forget"])
    assert only == {"privleak_forget": [f"forget {t}" for t in TEXTS]}


def test_hub_parquet_preferred_over_legacy_json_and_old_split_names(tmp_path):
    root = tmp_path / "books"
    write_parquet(root / "privleak" / "forget-00000-of-00001.parquet", [{"text": "from parquet"}])
    write_json(root / "privleak" / "forget.json", ["from an older json upload"])
    write_parquet(root / "knowmem" / "retain2_qa-00000-of-00001.parquet", QA)  # older Books revisions
    write_parquet(root / "raw" / "forget-00000-of-00002.parquet", [{"text": "shard 1"}])
    write_parquet(root / "raw" / "forget-00001-of-00002.parquet", [{"text": "shard 2"}])
    found = muse_files(root)
    assert set(found) == {"privleak_forget", "knowmem_retain_qa", "raw_forget"}
    data = load_muse(root)
    assert data["privleak_forget"] == ["from parquet"]
    assert [e.answer for e in data["knowmem_retain_qa"]] == ["The Lions", "In 2023"]
    assert data["raw_forget"] == ["shard 1", "shard 2"]
    with pytest.raises(FileNotFoundError, match=r"lacks the MUSE part\(s\) \['verbmem_forget'\]"):
        load_muse(root, parts=["verbmem_forget"])
    with pytest.raises(ValueError, match="unknown MUSE part"):
        load_muse(root, parts="verbmem")
    with pytest.raises(FileNotFoundError, match="no MUSE files under"):
        muse_files(tmp_path / "books" / "raw")
    with pytest.raises(FileNotFoundError, match="no MUSE folder"):
        muse_files(tmp_path / "nowhere")


def test_raw_txt_whole_or_by_paragraph(tmp_path):
    path = tmp_path / "forget.txt"
    path.write_text("\n\n".join(TEXTS), encoding="utf-8")
    assert load_muse_texts(path) == ["\n\n".join(TEXTS)]  # muse_bench trains on the whole stream
    assert load_muse_texts(path, paragraphs=True) == ["First article.", "Its second paragraph, ünïcode.",
                                                       "Second article: \"quoted\"."]


def test_texts_from_objects_and_json_lines(tmp_path):
    objects = write_json(tmp_path / "t.json", [{"text": t, "id": i} for i, t in enumerate(TEXTS)], indent=1)
    assert load_muse_texts(objects) == TEXTS
    lines = tmp_path / "t.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n\n", encoding="utf-8")
    assert load_muse_texts(lines) == TEXTS


def test_knowmem_keeps_other_fields_in_extra(tmp_path):
    path = write_json(tmp_path / "qa.json", [{"question": "q", "answer": "a", "source": "bbc", "note": None}])
    assert load_muse_knowmem(path) == [Example("q", "a", task="muse_knowmem", extra={"source": "bbc"})]


def test_malformed_rows_give_their_line(tmp_path):
    lines = tmp_path / "qa.jsonl"
    lines.write_text(json.dumps(QA[0]) + "\n\n" + '{"question": "broken", "answer": }\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"qa\.jsonl: line 3 is not valid JSON"):
        load_muse_knowmem(lines)
    array = tmp_path / "qa.json"
    array.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": "q2", "answer": "a2",}\n]',
                     encoding="utf-8")
    with pytest.raises(ValueError, match=r"qa\.json: row 2 \(line 3\) is not valid JSON"):
        load_muse_knowmem(array)
    missing = write_json(tmp_path / "v.json", [VERBMEM[0], {"prompt": "p"}], indent=2)
    with pytest.raises(ValueError, match=r"v\.json: row 2 \(line 6\) has no 'gt' field"):
        load_muse_verbmem(missing)
    one_line = write_json(tmp_path / "v1.json", [VERBMEM[0], {"prompt": "p", "gt": 7}])  # as muse_bench writes
    with pytest.raises(ValueError, match=r"row 2 \(line 1\): field 'gt' must be text, got a int"):
        load_muse_verbmem(one_line)
    texts = write_json(tmp_path / "p.json", ["fine", 3])
    with pytest.raises(ValueError, match=r"p\.json: row 2 \(line 1\) is a JSON int, not a text"):
        load_muse_texts(texts)
    parquet = write_parquet(tmp_path / "forget-00000-of-00001.parquet", [{"question": "q", "answer": "a"},
                                                                         {"question": None, "answer": "b"}])
    with pytest.raises(ValueError, match=r"row 2 has no 'question' field"):
        load_muse_knowmem(parquet)
    with pytest.raises(ValueError, match=r"row 1 has no 'text' field"):
        load_muse_texts(parquet)


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file at"):
        load_muse_texts(tmp_path / "absent.json")
    with pytest.raises(IsADirectoryError):
        load_muse_knowmem(tmp_path)
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_muse_verbmem(tmp_path / "empty.json")
    (tmp_path / "none.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="has no rows"):
        load_muse_texts(tmp_path / "none.json")
    (tmp_path / "data.csv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot tell the file type"):
        load_muse_texts(tmp_path / "data.csv")
    blank = write_json(tmp_path / "blank.json", ["ok", "  "])
    with pytest.raises(ValueError, match="row 2 .* is an empty text"):
        load_muse_texts(blank)


# ------------------------------------------------------------------------------------------------ WMDP
def test_wmdp_parquet_and_json_read_back_as_multiple_choice_items(tmp_path):
    from simu_fast.eval.utility import load_multiple_choice

    parquet = write_parquet(tmp_path / "wmdp-bio" / "test-00000-of-00001.parquet", WMDP)
    items = load_wmdp(parquet)
    assert items == WMDP
    assert all(type(item["answer"]) is int for item in items)
    assert [item for _, item in load_multiple_choice(items)] == WMDP  # the row format multiple_choice_accuracy takes
    lines = tmp_path / "wmdp.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in WMDP), encoding="utf-8")
    assert load_wmdp(lines) == WMDP


@pytest.mark.parametrize("bad, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2},
     r"line 2: field 'answer' must be the index .* \(0 to 1\), got 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, r"line 2: field 'answer' must be the index"),
    ({"question": "q", "choices": ["a", "b"]}, r"line 2 has no 'answer' field"),
    ({"question": "q", "answer": 0}, r"line 2 has no 'choices' field"),
    ({"choices": ["a", "b"], "answer": 0}, r"line 2 has no 'question' field"),
    ({"question": "q", "choices": ["only"], "answer": 0}, r"line 2: field 'choices' must be a list of two or more"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, r"line 2: field 'choices' must be a list of two or more"),
    (["q", ["a", "b"], 0], r"line 2 is a JSON array, not an object"),
])
def test_wmdp_bad_rows_name_line_and_field(tmp_path, bad, message):
    path = tmp_path / "wmdp.jsonl"
    path.write_text(json.dumps(WMDP[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_wmdp(path)


def test_wmdp_parquet_bad_row_named(tmp_path):
    path = write_parquet(tmp_path / "test-00000-of-00001.parquet",
                         [WMDP[0], {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 7}])
    with pytest.raises(ValueError, match=r"row 2: field 'answer' must be the index .* got 7"):
        load_wmdp(path)
