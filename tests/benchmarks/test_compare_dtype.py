"""bench/compare_dtype.py: the side-by-side report puts each dtype's own numbers in its own column."""
from bench.compare_dtype import side_by_side


def metrics(lr, retain, pair):
    stats = {"mean": retain, "std": 0.01, "n": 5, "values": [retain] * 5}
    return {"run_seconds": 300.0 if lr < 2e-4 else 500.0, "settings": {"seeds": [0, 1, 2, 3, 4]},
            "chosen_lr": {"simu": {"lr": lr, "reason": "highest mean retain at target", "at_edge": False}},
            "summary": {"matched": {"simu": {"reached": 4, "retain@target": stats, "steps": stats}},
                        "pairs": [{"a": "simu", "b": "so-graddiff", "metric": "retain@target", "n": 5,
                                   "mean": pair, "low": pair - 0.02, "high": pair + 0.02},
                                  {"a": "simu", "b": "so-graddiff", "metric": "relearn_harmful_0.1", "n": 5,
                                   "mean": 0.5, "low": 0.4, "high": 0.6}]}}


def test_each_dtype_in_its_own_column():
    text = side_by_side({"float32": metrics(1e-4, 0.849, -0.034), "bfloat16": metrics(3e-4, 0.848, -0.033)},
                        {"float32": 212.0, "bfloat16": 350.0})
    assert "300 s / 500 s; this call's wall time 212 s / 350 s (0 / 0 runs read from the run cache)" in text
    row = next(line for line in text.splitlines() if line.startswith("| simu | 1e-04"))
    assert row.startswith("| simu | 1e-04 | 3e-04 | 4/5 | 4/5 | 0.849 ± 0.010 | 0.848 ± 0.010 | - | - | "
                          "1 ± 0 | 1 ± 0 |")
    assert "| simu | so-graddiff | retain@target | -0.034 [-0.054, -0.014] | -0.033 [-0.053, -0.013] |" in text
    assert "relearn_harmful" not in text  # only the retain-side pairs
