"""report / format_markdown: the files written, their content, and atomic writes (no model needed)."""
import importlib
import json
import math
import os

import numpy as np
import pytest

from simu_fast.eval.report import format_markdown, report, to_jsonable
from simu_fast.io import write_atomic

# simu_fast.eval re-exports the function report(), which shadows the module's attribute name there
report_module = importlib.import_module("simu_fast.eval.report")

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def attack(kind, initial, peak, lr=1e-3, metric="answer_prob"):
    curve = [{"step": 0, metric: initial}, {"step": 5, metric: peak}, {"step": 10, metric: (initial + peak) / 2}]
    return {"kind": kind, "fraction": 0.1 if kind == "harmful" else None, "lr": lr, "steps": 10, "metric": metric,
            "n_train": 3 if kind == "harmful" else 5, "n_eval": 7 if kind == "harmful" else 10, "curve": curve,
            "initial": initial, "max": peak, "final": (initial + peak) / 2}


def make_results():
    return {
        "ga": {"forget": {"rougeL_recall": 0.125, "answer_prob": 0.0625, "exact_match": 0.0},
               "retain": {"rougeL_recall": 0.4375, "answer_prob": math.nan, "exact_match": 0.25},
               "relearning": [attack("harmful", 0.0625, 0.75), attack("harmful", 0.0625, 0.8125, lr=1e-4),
                              attack("benign", 0.0625, 0.1875)],
               "mia": {"loss": {"auc": 0.6875, "privacy": 0.25}}, "wall_seconds": 12.34},
        "memorized": {"forget": {"rougeL_recall": 1.0, "answer_prob": 0.96875},
                      "retain": {"rougeL_recall": 0.984375, "answer_prob": 0.9375},
                      "holdout": {"rougeL_recall": 0.5}},
        "simu": {"forget": {"rougeL_recall": 0.25, "answer_prob": 0.125},
                 "retain": {"rougeL_recall": 0.90625, "answer_prob": 0.875},
                 "relearning": [attack("harmful", 0.125, 0.3125)], "wall_seconds": 3.0},
    }


def table_rows(markdown, first_header="| method |"):
    """{method: {header: cell}} of the first table whose header row starts with first_header."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(headers), line
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


def section_rows(markdown, heading):
    tail = markdown.split(heading, 1)[1]
    lines = tail.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, [c.strip() for c in line.strip("|").split("|")])))
    return rows


def test_report_writes_every_file(tmp_path):
    paths = report(make_results(), str(tmp_path / "out"), title="My report")
    assert set(paths) == {"metrics", "markdown", "tradeoff", "relearning"}
    names = {"metrics": "metrics.json", "markdown": "report.md", "tradeoff": "tradeoff.png",
             "relearning": "relearning.png"}
    for key, path in paths.items():
        assert path == str(tmp_path / "out" / names[key])
        assert os.path.getsize(path) > 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names.values())  # no temporary file left behind
    for key in ("tradeoff", "relearning"):
        with open(paths[key], "rb") as f:
            data = f.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    markdown = open(paths["markdown"], encoding="utf-8").read()
    assert markdown.startswith("# My report\n")
    assert "![tradeoff](tradeoff.png)" in markdown and "![relearning](relearning.png)" in markdown


def test_metrics_json_round_trips_with_nan_as_null(tmp_path):
    results = make_results()
    results["ga"]["forget"]["nll"] = math.inf
    results["ga"]["extra"] = {"steps": np.int64(7), "tau": np.float32(0.5), "curve": np.array([0.25, 0.5]),
                              "pair": (1, 2)}
    paths = report(results, str(tmp_path))
    text = open(paths["metrics"], encoding="utf-8").read()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["ga"]["retain"]["answer_prob"] is None and loaded["ga"]["forget"]["nll"] is None
    assert loaded["ga"]["extra"] == {"steps": 7, "tau": 0.5, "curve": [0.25, 0.5], "pair": [1, 2]}
    expected = make_results()
    expected["ga"]["retain"]["answer_prob"] = None
    expected["ga"]["forget"]["nll"] = None
    expected["ga"]["extra"] = loaded["ga"]["extra"]
    for name in expected:
        for key in expected[name]:
            assert loaded[name][key] == expected[name][key], (name, key)
    assert list(loaded) == list(expected)  # the order of the methods is kept


def test_to_jsonable_rejects_objects_it_cannot_write():
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"a": object()})
    assert to_jsonable({1: [math.nan, -math.inf, True, None]}) == {"1": [None, None, True, None]}


def test_markdown_table_has_one_row_per_method_with_the_right_numbers():
    markdown = format_markdown(make_results())
    rows = table_rows(markdown)
    assert list(rows) == ["memorized", "ga", "simu"]  # the reference model first, then the order given
    ga, memorized, simu = rows["ga"], rows["memorized"], rows["simu"]
    assert ga["forget ROUGE-L"] == "0.125" and ga["retain ROUGE-L"] == "0.438"  # 0.4375 to 3 decimals
    assert ga["forget prob"] == "0.062"
    assert ga["retain prob"] == "nan"
    assert ga["forget EM"] == "0.000" and ga["retain EM"] == "0.250"
    assert ga["MIA AUC (loss)"] == "0.688"
    assert ga["relearned max (harmful, answer_prob)"] == "0.812"  # the worst of its two harmful attacks
    assert ga["relearned max (benign, answer_prob)"] == "0.188"
    assert ga["time (s)"] == "12.3"
    assert memorized["forget ROUGE-L"] == "1.000" and memorized["holdout ROUGE-L"] == "0.500"
    assert memorized["MIA AUC (loss)"] == "-" and memorized["time (s)"] == "-"
    assert simu["retain ROUGE-L"] == "0.906" and simu["relearned max (harmful, answer_prob)"] == "0.312"
    assert simu["relearned max (benign, answer_prob)"] == "-" and simu["time (s)"] == "3.0"
    assert simu["holdout ROUGE-L"] == "-" and simu["forget EM"] == "-"


def test_evaluate_model_extras_get_columns():
    results = make_results()
    results["simu"]["forget"]["truth_ratio"] = 0.625
    results["simu"]["forget_quality"] = 0.015625
    results["simu"]["utility"] = {"perplexity": 12.5, "mc_accuracy": 0.75, "mc_n": 4}
    rows = table_rows(format_markdown(results))
    assert rows["simu"]["forget truth ratio"] == "0.625" and rows["ga"]["forget truth ratio"] == "-"
    assert rows["simu"]["forget quality"] == "0.016"
    assert rows["simu"]["perplexity"] == "12.500" and rows["simu"]["MC accuracy"] == "0.750"
    assert "retain truth ratio" not in rows["simu"]


def test_markdown_has_one_relearning_table_per_kind():
    markdown = format_markdown(make_results())
    harmful = section_rows(markdown, "## harmful relearning")
    benign = section_rows(markdown, "## benign relearning")
    assert [r["method"] for r in harmful] == ["ga", "ga", "simu"]
    assert [r["lr"] for r in harmful] == ["0.001", "1.00e-04", "0.001"]
    assert [r["max"] for r in harmful] == ["0.750", "0.812", "0.312"]
    assert harmful[0]["n_train"] == "3" and harmful[0]["n_eval"] == "7" and harmful[0]["fraction"] == "0.100"
    assert [r["method"] for r in benign] == ["ga"]
    assert benign[0]["fraction"] == "-" and benign[0]["n_eval"] == "10" and benign[0]["initial"] == "0.062"


def test_columns_appear_only_where_some_method_has_a_value(tmp_path):
    results = {"a": {"forget": {"rougeL_recall": 0.5}, "retain": {"rougeL_recall": 0.75}},
               "b|c": {"forget": {"rougeL_recall": 0.25}, "retain": {"rougeL_recall": 0.5}}}
    markdown = format_markdown(results)
    header = markdown.splitlines()[0]
    assert header == "| method | forget ROUGE-L | retain ROUGE-L |"
    assert "relearning" not in markdown and "MIA" not in markdown and "time" not in markdown
    assert "| b\\|c | 0.250 | 0.500 |" in markdown  # a | in a name does not break the table
    paths = report(results, str(tmp_path))
    assert set(paths) == {"metrics", "markdown", "tradeoff"}  # no relearning data: no relearning plot
    assert not (tmp_path / "relearning.png").exists()


def test_tradeoff_falls_back_to_answer_probability_and_is_skipped_without_scores(tmp_path):
    probs = {"a": {"forget": {"answer_prob": 0.5}, "retain": {"answer_prob": 0.75}}}
    assert report(probs, str(tmp_path / "p"))["tradeoff"].endswith("tradeoff.png")
    only_forget = {"a": {"forget": {"rougeL_recall": 0.5}, "retain": {}}}
    assert "tradeoff" not in report(only_forget, str(tmp_path / "f"))


def test_empty_or_malformed_results_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="results is empty"):
        report({}, str(tmp_path))
    with pytest.raises(ValueError, match="results is empty"):
        format_markdown({})
    with pytest.raises(TypeError, match="results must be a dict"):
        report([("ga", {})], str(tmp_path))
    with pytest.raises(TypeError, match=r"results\['ga'\] must be a dict"):
        report({"ga": 0.5}, str(tmp_path))
    with pytest.raises(TypeError, match=r"results\['ga'\]\['forget'\] must be a dict"):
        report({"ga": {"forget": 0.5}}, str(tmp_path))
    with pytest.raises(TypeError, match="relearning"):
        report({"ga": {"forget": {}, "relearning": [1, 2]}}, str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_failing_plot_leaves_the_previous_report_unchanged(tmp_path, monkeypatch):
    out = str(tmp_path)
    first = make_results()
    paths = report(first, out)
    before = {p: open(p, "rb").read() for p in paths.values()}

    def broken(results):
        raise RuntimeError("plot failed")

    changed = make_results()
    changed["ga"]["forget"]["rougeL_recall"] = 0.875
    monkeypatch.setattr(report_module, "plot_relearning", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        report(changed, out)
    assert {p: open(p, "rb").read() for p in paths.values()} == before
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths.values())


def test_a_failing_json_encoder_writes_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module.json, "dumps", broken)
    with pytest.raises(OSError, match="disk full"):
        report(make_results(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_failure_during_the_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_bytes(b"old content")

    def broken_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(report_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        write_atomic(str(target), b"new content that must not appear")
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["report.md"]  # the temporary file was removed
    with pytest.raises(OSError, match="fsync failed"):
        report(make_results(), str(tmp_path))  # fails on its first file, metrics.json
    assert sorted(os.listdir(tmp_path)) == ["report.md"] and target.read_bytes() == b"old content"


def test_rewriting_replaces_the_files(tmp_path):
    report(make_results(), str(tmp_path))
    changed = make_results()
    changed["simu"]["forget"]["rougeL_recall"] = 0.0625
    paths = report(changed, str(tmp_path))
    assert json.load(open(paths["metrics"]))["simu"]["forget"]["rougeL_recall"] == 0.0625
    assert table_rows(open(paths["markdown"]).read())["simu"]["forget ROUGE-L"] == "0.062"
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "relearning.png", "report.md", "tradeoff.png"]


def with_original():
    """Two methods evaluated against one original model (evaluate_model's "original"), one against another."""
    original = {"forget": {"rougeL_recall": 0.875, "answer_prob": 0.75},
                "retain": {"rougeL_recall": 0.8125, "answer_prob": 0.6875}}
    return {
        "ga": {"forget": {"rougeL_recall": 0.125, "answer_prob": 0.0625},
               "retain": {"rougeL_recall": 0.4375, "answer_prob": 0.375}, "original": original},
        "noop": {"forget": dict(original["forget"]), "retain": dict(original["retain"]), "original": original},
    }


def test_the_tradeoff_plot_draws_the_original_as_a_star_with_arrows_to_the_methods():
    points = report_module.tradeoff_points(with_original())[1]
    assert [(p["name"], p["kind"]) for p in points] == [("original", "original"), ("ga", "method"),
                                                        ("noop", "method")]  # one star for the shared original
    assert (points[0]["x"], points[0]["y"]) == (0.875, 0.8125)
    assert points[1]["from"] == points[2]["from"] == (0.875, 0.8125)
    fig, _ = report_module.tradeoff_figure(with_original())
    ax = fig.axes[0]
    labels = {c.get_label(): c for c in ax.collections}
    assert set(labels) == {"original", "ga", "noop"}
    assert list(labels["original"].get_offsets()[0]) == [0.875, 0.8125]
    assert labels["original"].get_sizes()[0] > labels["ga"].get_sizes()[0]  # the star is the large marker
    assert "original" in [t.get_text() for t in ax.texts]
    # the original alone, no entry named like a reference model: still drawn, the PNG too
    assert report_module.plot_tradeoff(with_original())[:8] == PNG_MAGIC
    # different originals: one star each, named after the first method that has it
    results = with_original()
    results["ga"]["original"] = {"forget": {"rougeL_recall": 1.0}, "retain": {"rougeL_recall": 0.9375}}
    names = [p["name"] for p in report_module.tradeoff_points(results)[1] if p["kind"] == "original"]
    assert names == ["original of ga", "original of noop"]


def test_markdown_shows_the_original_before_the_methods_after():
    rows = table_rows(format_markdown(with_original()))
    assert list(rows) == ["original (before)", "ga (after)", "noop (after)"]
    before = rows["original (before)"]
    assert before["forget ROUGE-L"] == "0.875" and before["retain ROUGE-L"] == "0.812"
    assert before["forget prob"] == "0.750" and before["retain prob"] == "0.688"
    assert rows["ga (after)"]["forget ROUGE-L"] == "0.125"
    # a run that changed nothing reads the same before and after
    assert {k: v for k, v in rows["noop (after)"].items() if k != "method"} == \
        {k: v for k, v in before.items() if k != "method"}
    # entries without an original are as before
    assert list(table_rows(format_markdown(make_results()))) == ["memorized", "ga", "simu"]
    with pytest.raises(TypeError, match="original"):
        format_markdown({"ga": {"forget": {}, "retain": {}, "original": {"forget": 0.5}}})
