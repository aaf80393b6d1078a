"""Small models made locally (no checkpoint can be downloaded): a Llama-style model from random weights sized
to a tokenizer, and the atomic on-disk cache the protocol's base and fine-tuned models live in."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch


def small_llama(tokenizer, hidden_size: int = 128, intermediate_size: int = 512, num_layers: int = 4,
                num_heads: int = 4, max_positions: int = 512, seed: int = 0):
    """A LlamaForCausalLM with random weights (seeded), tied embeddings, sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def cache_dir(name: str) -> str:
    """Where a workload caches its models: $SIMU_FAST_CACHE/<name>, default ~/.cache/simu_fast/<name>."""
    root = os.environ.get("SIMU_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "simu_fast")
    return os.path.join(root, name)


def cached_model(path: str, build, log=print, info_name: str = "info.json", what: str = "the model"):
    """(model, tokenizer, info): loaded from the directory `path` when it holds `info_name`, else built by
    build() -> (model, tokenizer, info) and saved there atomically (a temporary directory beside it, renamed
    into place; a concurrent run that finished first keeps its copy). info gets "cached": True / False."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    info_file = os.path.join(path, info_name)
    if os.path.isfile(info_file):
        with open(info_file, encoding="utf-8") as f:
            info = json.load(f)
        log(f"loaded {what} from {path}")
        return (AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval(),
                AutoTokenizer.from_pretrained(path, local_files_only=True), {**info, "cached": True})
    model, tokenizer, info = build()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, info_name), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        if os.path.isdir(path):
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model.eval(), tokenizer, {**info, "cached": False}
