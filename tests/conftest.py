"""Test setup shared by every test.

- Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
  before triton is first imported (and before any @triton.jit decorator runs), hence here.
- Tests marked `gpu` skip when torch.cuda.is_available() is False; tests marked `slow` (stress loops) run
  only when selected with `-m slow`.
"""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if "slow" not in (config.getoption("-m") or ""):  # long stress runs only when asked for: pytest -m slow
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def memorized():
    """(model, tokenizer, data) of tiny_models.memorized_people(10, seed=0): a 2-layer Llama that memorized 10
    synthetic people (2 to forget, 1 never seen). Shared: tests that change the model work on a deepcopy."""
    pytest.importorskip("transformers")
    from tiny_models import memorized_people
    return memorized_people(10, seed=0)


# ---- a tiny local model directory and data files for the command line (tests/test_cli.py, test_bad_inputs.py)
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny_models import CLI_SPECIALS, CLI_WORDS, word_level_tokenizer

    path = tmp_path_factory.mktemp("cli") / "model"
    vocab = {w: i for i, w in enumerate(CLI_SPECIALS + CLI_WORDS)}
    tok = word_level_tokenizer(vocab)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data(model_dir):
    root = model_dir.parent
    forget = [("where does alice live ?", "alice lives in paris"), ("who is alice ?", "alice works as a baker"),
              ("where does alice work ?", "in paris")]
    retain = [("where does bob live ?", "bob lives in rome"), ("who is bob ?", "bob works as a pilot"),
              ("where does bob work ?", "in rome")]
    files = {}
    for name, rows in (("forget", forget), ("retain", retain)):
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"id": f"{name}{i}", "input": q, "output": a, "task": "t"}) + "\n"
                             for i, (q, a) in enumerate(rows)))
        files[name] = str(p)
    return files
