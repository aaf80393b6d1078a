"""Every bad input a user can give `simu-fast unlearn` (and the API behind it) is named: exit code 2 and one
line on stderr (CLI), or a typed exception saying what is wrong (API), and no half-written output."""
import json
import os

import pytest
import torch

from simu_fast.cli import main


def _unlearn(model_dir, data, out, *extra, method="graddiff"):
    return ["unlearn", "--model", str(model_dir), "--forget", data["forget"], "--retain", data["retain"],
            "--method", method, "--out", str(out), "--batch-size", "2", "--max-length", "32", "--format", "lume",
            "--steps", "1", *extra]


def _copy_model(model_dir, path, change=None):
    """A copy of the tiny model directory, its weights changed by change(model) first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if change is not None:
        change(model)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(path)
    return path


def _nan_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))


def _no_pad_no_eos(path):
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        cfg.pop(key, None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    special = path / "special_tokens_map.json"
    if special.exists():
        special.write_text(json.dumps({k: v for k, v in json.loads(special.read_text()).items()
                                       if k not in ("pad_token", "eos_token")}))
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["content"] not in ("<pad>", "</s>")]
    (path / "tokenizer.json").write_text(json.dumps(tok))


def _other_model_mask(model_dir, path):
    """A mask saved for a model with another MLP width."""
    from simu_fast.select.neuron_mask import NeuronMask
    mask = NeuronMask(torch.zeros(2, 7, dtype=torch.bool).index_fill_(1, torch.tensor([1]), True),
                      torch.zeros(2, 7, dtype=torch.bool), [0, 1])
    mask.save(str(path))
    return str(path)


def _write(path, text):
    path.write_text(text)
    return str(path)


# (name, how to make the bad input from (model_dir, data, tmp_path) -> argv, what the one line must say)
CASES = [
    ("missing model dir", lambda m, d, t: _unlearn(t / "nope", d, t / "o"), "model directory not found"),
    ("no config.json", lambda m, d, t: _unlearn((t / "empty").mkdir() or t / "empty", d, t / "o"),
     "not a transformers model directory"),
    ("not a causal LM", lambda m, d, t: _unlearn(_vit_dir(m, t / "vit"), d, t / "o"), "cannot load a causal LM"),
    ("tokenizer with no pad or eos", lambda m, d, t: _unlearn(_no_pad_dir(m, t / "nopad"), d, t / "o"),
     "neither a pad token nor an EOS token"),
    ("missing forget file", lambda m, d, t: _unlearn(m, dict(d, forget=str(t / "x.jsonl")), t / "o"),
     "forget file not found"),
    ("empty forget file", lambda m, d, t: _unlearn(m, dict(d, forget=_write(t / "e.jsonl", "")), t / "o"), "is empty"),
    ("malformed row", lambda m, d, t: _unlearn(m, dict(d, forget=_write(
        t / "bad.jsonl", json.dumps({"input": "a", "output": "b", "task": "t", "id": "1"}) + "\n{oops\n")), t / "o"),
     "bad.jsonl: line 2 is not valid JSON"),
    ("unknown method", lambda m, d, t: _unlearn(m, d, t / "o", method="bogus"), "unknown method 'bogus'"),
    ("unknown method argument", lambda m, d, t: _unlearn(m, d, t / "o", "--set", "nonsense=1"),
     "method 'graddiff' has no option 'nonsense'; its options: gamma, lr"),
    ("lr 0", lambda m, d, t: _unlearn(m, d, t / "o", "--lr", "0"), "lr must be a positive finite number"),
    ("lr -1", lambda m, d, t: _unlearn(m, d, t / "o", "--lr", "-1"), "lr must be a positive finite number"),
    ("lr nan", lambda m, d, t: _unlearn(m, d, t / "o", "--lr", "nan"), "lr must be a positive finite number"),
    ("steps 0", lambda m, d, t: _unlearn(m, d, t / "o", "--steps", "0"), "steps must be at least 1"),
    ("batch size 0", lambda m, d, t: _unlearn(m, d, t / "o", "--batch-size", "0"), "batch-size must be at least 1"),
    ("--out is a file", lambda m, d, t: _unlearn(m, d, _write(t / "afile", "x")), "is a file, not a directory"),
    ("--out cannot be made", lambda m, d, t: _unlearn(m, d, t / _write(t / "f", "x") / "sub"),
     "is a file, so the directory cannot be made"),
    ("--resume without a checkpoint", lambda m, d, t: _unlearn(m, d, t / "o", "--resume"), "--resume: no checkpoint"),
    ("retain file needed", lambda m, d, t: [a for a in _unlearn(m, d, t / "o") if a not in ("--retain", d["retain"])],
     "uses a retain set: give --retain"),
    ("unknown --config key", lambda m, d, t: ["unlearn", "--config", _write(t / "c.yaml", "methd: ga\n")],
     "unknown key 'methd'"),
    ("a mask saved for another model", lambda m, d, t: _unlearn(
        m, d, t / "o", "--set", f"mask={_other_model_mask(m, t / 'mask.safetensors')}", method="simu"),
     "the neuron mask has 7 neurons per layer, but layer 0 of the model has 48"),
    ("a mask file that is missing", lambda m, d, t: _unlearn(m, d, t / "o", "--set", f"mask={t / 'none'}",
                                                              method="simu"), "no neuron mask file at"),
    ("a NaN loss", lambda m, d, t: _unlearn(_copy_model(m, t / "nan", _nan_weights), d, t / "o"),
     "the loss or its gradient became NaN/inf"),
    ("--resume from a tampered checkpoint", lambda m, d, t: _unlearn(m, d, _tampered_checkpoint(m, d, t), "--resume"),
     "cannot load the checkpoint file"),
    ("unknown --keep-best metric", lambda m, d, t: _unlearn(m, d, t / "o", "--keep-best", "max:accuracy"),
     "--keep-best: unknown metric 'accuracy'; choose one of forget_rougeL"),
    ("ssiuu under fsdp2", lambda m, d, t: _unlearn(m, d, t / "o", "--parallel", "fsdp2", method="ssiuu"),
     "does not support --parallel fsdp2"),
]


class _Planted:
    """Unpickling this runs code (touches a file): what a safe loader must refuse."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _tampered_checkpoint(model_dir, data, tmp_path):
    """An --out with a real checkpoint whose trainer_state.pt was replaced by a pickle that runs code."""
    out = tmp_path / "run"
    assert main(_unlearn(model_dir, data, out, "--save-every", "1")) == 0
    torch.save({"step": 1, "x": _Planted(tmp_path / "code-ran")}, out / "checkpoint" / "trainer_state.pt")
    return out


def _vit_dir(model_dir, path):
    from transformers import AutoTokenizer, ViTConfig
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(path)
    return path


def _no_pad_dir(model_dir, path):
    _copy_model(model_dir, path)
    _no_pad_no_eos(path)
    return path


@pytest.mark.parametrize("name, make, message", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input_is_one_line_and_exit_2(name, make, message, model_dir, data, tmp_path, capsys):
    before = set(os.listdir(tmp_path))
    argv = make(model_dir, data, tmp_path)
    made = set(os.listdir(tmp_path)) - before  # the bad input's own files
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # not transformers' bars
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("simu-fast: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) - before == made  # no output (an --out directory) was left behind
    assert not (tmp_path / "code-ran").exists()  # nothing the input carried was executed


def test_the_table_counts():
    assert len(CASES) == 25


def test_api_bad_inputs_raise_typed_errors(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from simu_fast.methods import make_method
    from simu_fast.select.neuron_mask import NeuronMask
    with pytest.raises(ValueError, match="unknown unlearning method 'bogus'"):
        make_method("bogus")
    with pytest.raises(TypeError, match="method 'simu' has no option 'ratoi'; its options: steps, ratio"):
        make_method("simu", ratoi=0.2)
    with pytest.raises(FileNotFoundError, match="no neuron mask file"):
        make_method("simu", mask=str(tmp_path / "none"))
    with pytest.raises(TypeError, match="mask must be a NeuronMask or the path"):
        make_method("simu", mask=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    mask = NeuronMask.load(_other_model_mask(model_dir, tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="a mask made for another model"):
        mask.check_fits(model)
    far = NeuronMask(torch.ones(1, 48, dtype=torch.bool), torch.zeros(1, 48, dtype=torch.bool), [5])
    with pytest.raises(ValueError, match=r"names layers \[5\], but the model has 2 decoder layers"):
        far.check_fits(model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the neuron mask"):
        NeuronMask.load(str(tmp_path / "junk.safetensors"))


def test_interrupted_save_leaves_no_half_written_file(model_dir, data, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing the model: --out holds no model file and no staging directory."""
    from transformers import PreTrainedModel
    real = PreTrainedModel.save_pretrained

    def interrupted(self, directory, **kwargs):
        real(self, directory, **kwargs)
        if not os.path.basename(directory).startswith(".saving-"):
            return  # not the final model save
        with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
            f.truncate(10)  # half written
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        main(_unlearn(model_dir, data, out))
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".saving-")]
