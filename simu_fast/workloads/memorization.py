"""Models that know the data to be forgotten, made locally: a small Llama-style model from random weights,
trained until it has memorized a set of examples (the demo and the LUME benchmark start from this, since no
fine-tuned checkpoint can be downloaded)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

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


def memorize(model, tokenizer, examples, *, lr: float = 3e-3, batch_size: int = 16, max_epochs: int = 60,
             target_prob: float = 0.98, check_every_epochs: int = 5, max_length: int = 512, seed: int = 0,
             progress: bool = False, log=print) -> dict:
    """Train `model` in place on the answers of `examples` (warmup + cosine AdamW) until their mean
    length-normalized answer probability reaches target_prob (checked every check_every_epochs epochs) or
    max_epochs pass. Returns {"parameters", "steps", "train_seconds", "answer_prob", "reached"}."""
    from ..data import make_loader, tokenize_examples
    from ..eval import answer_metrics
    from ..training.finetune import finetune

    examples = list(examples)
    features = tokenize_examples(examples, tokenizer, max_length=max_length)
    loader = make_loader(features, batch_size, shuffle=True, seed=seed, pad_token_id=tokenizer.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training a {n_params / 1e6:.2f}M-parameter model to memorize {len(examples)} examples "
        f"(answer probability >= {target_prob})")

    def answer_prob(m):
        return {"answer_prob": answer_metrics(m, tokenizer, examples, batch_size=64, max_length=max_length,
                                              generate=False)["answer_prob"]}

    start = time.time()
    result = finetune(model, loader, lr=lr, max_epochs=max_epochs, warmup_steps=20, schedule="cosine",
                      eval_fn=answer_prob, eval_every=check_every_epochs * len(loader),
                      until=lambda m: m["answer_prob"] >= target_prob, progress=progress, desc="memorizing")
    seconds = time.time() - start
    reached = result["history"][-1]["answer_prob"]
    log(f"  {result['steps']} steps, {seconds:.0f} s, answer probability {reached:.3f}")
    if reached < target_prob:
        log(f"  warning: memorization stopped at answer probability {reached:.3f} < {target_prob} "
            f"after {max_epochs} epochs")
    model.eval()
    return {"parameters": n_params, "steps": result["steps"], "train_seconds": round(seconds, 1),
            "answer_prob": reached, "reached": reached >= target_prob}


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
