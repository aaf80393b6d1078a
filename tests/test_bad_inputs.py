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
    # --out: never an input, never another run's files without --overwrite, one run at a time
    ("--out is the model directory", lambda m, d, t: _unlearn(_copy_model(m, t / "mc"), d, t / "mc"),
     "is the model directory"),
    ("--out inside the model directory", lambda m, d, t: _unlearn(_copy_model(m, t / "mc"), d, t / "mc" / "out"),
     "is inside the model directory"),
    ("--out holds an input file", lambda m, d, t: _unlearn(m, dict(d, forget=_copy_file(d["forget"], t / "o")), t / "o"),
     "holds the forget file"),
    ("--out holds an earlier run", lambda m, d, t: _unlearn(m, d, _earlier_run(m, d, t)),
     "holds the outputs of an earlier run"),
    ("--out holds foreign files", lambda m, d, t: _unlearn(m, d, _foreign_dir(t / "o")),
     "holds files no simu-fast run wrote (notes.txt)"),
    ("--out in use by another run", lambda m, d, t: _unlearn(m, d, _held(t / "o")), "is in use by another simu-fast run"),
    ("--resume and --overwrite", lambda m, d, t: _unlearn(m, d, t / "o", "--resume", "--overwrite"),
     "give one of them"),
    ("--resume --steps before the checkpoint", lambda m, d, t: _unlearn(m, d, _earlier_run(m, d, t, "--steps", "2",
                                                                                           "--save-every", "1"),
                                                                        "--resume"),
     "is at step 2, past --steps 1: a resumed run cannot go back"),
    ("eval --out holds an unlearn run", lambda m, d, t: _eval(m, d, _earlier_run(m, d, t)),
     "holds the outputs of an earlier run"),
    ("eval --out is the model directory", lambda m, d, t: _eval(_copy_model(m, t / "mc"), d, t / "mc"),
     "is the model directory"),
    # the model directory
    ("config.json that does not fit the weights", lambda m, d, t: _unlearn(_edited_config(m, t / "mc"), d, t / "o"),
     "do not fit its config.json"),
    ("vocabulary smaller than the tokenizer", lambda m, d, t: _unlearn(_small_vocab(m, t / "mc"), d, t / "o"),
     "is past the model's vocabulary"),
    ("--max-length past the position limit", lambda m, d, t: _unlearn(m, d, t / "o", "--max-length", "100"),
     "--max-length 100 is longer than the model's position limit 64"),
    ("no tokenizer files", lambda m, d, t: _unlearn(_no_tokenizer(m, t / "mc"), d, t / "o"), "has no tokenizer files"),
    # the data and the options
    ("forget path is a directory", lambda m, d, t: _unlearn(m, dict(d, forget=str(t)), t / "o"),
     f"is a directory; give the path of one data file"),
    ("--set value of the wrong type", lambda m, d, t: _unlearn(m, d, t / "o", "--set", "ratio=abc", method="simu"),
     "--set ratio='abc'"),
    ("an lr that diverges", lambda m, d, t: _unlearn(m, d, t / "o", "--lr", "1e10", "--steps", "4"),
     "is 1000000000000000x the method's default 1e-05: the likely cause"),
    ("CSV with other column names", lambda m, d, t: _unlearn(m, dict(d, forget=_write(t / "f.csv", "q,a\nx,y\n")),
                                                             t / "o", "--format", "csv"),
     "--prompt-field NAME"),
    ("every answer empty", lambda m, d, t: _unlearn(m, dict(d, forget=_write(t / "e.jsonl", _rows(("who", " "),
                                                                                                   ("what", "")))),
                                                    t / "o"),
     "every answer is empty or whitespace"),
    ("forget file is the retain file", lambda m, d, t: _unlearn(m, dict(d, retain=d["forget"]), t / "o"),
     "--forget and --retain are the same file"),
    ("every forget row in retain", lambda m, d, t: _unlearn(m, dict(d, retain=_copy_file(d["forget"], t / "r")), t / "o"),
     "is also in the retain file"),
]

_HELD = []  # OutputDirs kept open (their lock held) while a case runs


def _eval(model_dir, data, out):
    return ["eval", "--model", str(model_dir), "--forget", data["forget"], "--out", str(out), "--format", "lume",
            "--max-length", "32"]


def _copy_file(path, folder):
    import shutil
    folder.mkdir(exist_ok=True)
    return str(shutil.copy(path, folder / os.path.basename(path)))


def _rows(*pairs):
    return "".join(json.dumps({"id": str(i), "input": q, "output": a, "task": "t"}) + "\n"
                   for i, (q, a) in enumerate(pairs))


def _earlier_run(model_dir, data, tmp_path, *extra):
    out = tmp_path / "run"
    assert main(_unlearn(model_dir, data, out, *extra)) == 0
    return out


def _foreign_dir(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def _held(path):
    from simu_fast.cli.output_dir import OutputDir
    _HELD.append(OutputDir(str(path)).open())
    return path


def _edited_config(model_dir, path):
    _copy_model(model_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _small_vocab(model_dir, path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    cfg.vocab_size = 8
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(path)
    return path


def _no_tokenizer(model_dir, path):
    from simu_fast.cli.inputs import TOKENIZER_FILES
    _copy_model(model_dir, path)
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        if (path / name).exists():
            (path / name).unlink()
    return path


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
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line  # not transformers' bars
             and not line.startswith("unlearning: step")]  # nor the progress lines of the steps before
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("simu-fast: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) - before == made  # no output (an --out directory) was left behind
    assert not (tmp_path / "code-ran").exists()  # nothing the input carried was executed
    while _HELD:
        _HELD.pop().close()


def test_the_table_counts():
    assert len(CASES) == 46


def test_api_bad_inputs_raise_typed_errors(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from simu_fast.methods import make_method
    from simu_fast.select.neuron_mask import NeuronMask
    with pytest.raises(ValueError, match="unknown unlearning method 'bogus'"):
        make_method("bogus")
    with pytest.raises(TypeError, match="method 'simu' has no option 'ratoi'; its options: ig_steps, ratio"):
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
    """Ctrl-C in the middle of writing the model: exit 130, no model file and no staging directory left."""
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
    with pytest.raises(SystemExit) as e:
        main(_unlearn(model_dir, data, out))
    assert e.value.code == 130
    assert not out.exists()  # no half-written file, no staging directory: nothing was produced, so no --out
