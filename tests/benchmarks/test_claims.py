"""bench/claims.py: the claims table is the runs' own verdicts, side by side, and a missing run is an error."""
import json

from bench import claims


def run_dir(tmp_path, name, workload, layers, claims_list):
    folder = tmp_path / name
    folder.mkdir()
    metrics = {"settings": {"seeds": [0, 1, 2, 3, 4]},
               "protocol_settings": {"workload": workload, "num_layers": layers, "hidden_size": 64},
               "claims": claims_list}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def claim(text, mean, low, high, verdict):
    return {"claim": text, "verdict": verdict, "n": 5, "mean": mean, "std": 0.1, "low": low, "high": high}


def test_table_has_each_runs_verdict_and_a_dash_where_a_run_lacks_the_claim(tmp_path):
    a = run_dir(tmp_path, "small", "synthetic", 4, [claim("X beats Y", -0.105, -0.186, -0.024, "reversed"),
                                                     claim("Z beats W", 0.2, 0.1, 0.3, "holds")])
    b = run_dir(tmp_path, "lume", "lume", 8, [claim("X beats Y", 0.01, -0.02, 0.04, "not shown"),
                                             {**claim("P beats Q", None, None, None, "n/a"), "n": 0}])
    out = tmp_path / "claims.md"
    assert claims.main([a, b, "--out", str(out)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "small (synthetic, 4 layers, hidden 64)" in rows["claim"]
    assert "lume (LUME, 8 layers, hidden 64)" in rows["claim"]
    assert rows["X beats Y"] == ("| X beats Y | -0.105 [-0.186, -0.024] reversed | "
                                 "+0.010 [-0.020, +0.040] not shown |")
    assert rows["Z beats W"] == "| Z beats W | +0.200 [+0.100, +0.300] holds | - |"
    assert rows["P beats Q"] == "| P beats Q | - | n/a |"


def test_a_folder_without_metrics_is_an_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "claims.md"
    assert claims.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err
    assert not out.exists()
