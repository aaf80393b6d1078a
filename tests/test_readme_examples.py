"""The README's "Using it in your own training loop" examples run as written.

Each example is a ```python block of README.md whose first line is `# example: NAME`. It runs in a fresh
folder holding forget.jsonl and retain.jsonl (conftest.py's `data`: LUME-style rows), with the model path
"path/to/local/model" pointed at conftest.py's `model_dir` (a tiny random Llama built from a small config and
a word-level tokenizer, saved locally: nothing is downloaded) and max_steps cut to 3.
"""
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_PATH = "path/to/local/model"
STEPS = 3


def readme_examples() -> dict:
    """{name: code} of README.md's ```python blocks that start with `# example: NAME`."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    out = {}
    for block in blocks:
        first = block.split("\n", 1)[0]
        match = re.fullmatch(r"# example: ([\w-]+)", first.strip())
        if match:
            assert match.group(1) not in out, f"two README examples named {match.group(1)!r}"
            out[match.group(1)] = block
    return out


def prepared(code: str, model_dir) -> str:
    assert code.count(MODEL_PATH) >= 1, f"the example no longer loads {MODEL_PATH!r}"
    code = code.replace(MODEL_PATH, str(model_dir))
    code, n = re.subn(r"\bmax_steps=\d+", f"max_steps={STEPS}", code)
    assert n == 1, f"expected one max_steps= in the example, found {n}"
    return code


def test_the_examples_are_there():
    assert {"trainer", "unlearner"} <= set(readme_examples())


@pytest.mark.parametrize("name", ["trainer", "unlearner"])
def test_readme_example_runs(name, model_dir, data, tmp_path, monkeypatch):
    if name == "trainer" and importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers.Trainer needs accelerate")
    code = prepared(readme_examples()[name], model_dir)
    for split in ("forget", "retain"):
        shutil.copy(data[split], tmp_path / f"{split}.jsonl")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_example_{name}"}
    exec(compile(code, f"README.md (example: {name})", "exec"), namespace)

    if name == "trainer":
        assert namespace["trainer"].state.global_step == STEPS
        assert (tmp_path / "runs" / "npo" / "config.json").is_file()
    else:
        result = namespace["result"]
        assert result["step"] == STEPS and len(result["train_loss"]) == STEPS
        assert (tmp_path / "runs" / "simu" / "config.json").is_file()
        assert namespace["method"].name == "simu"
