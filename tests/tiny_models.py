"""Tiny random causal LMs built from configs (no downloads), shared by the tests."""
import torch


def tiny_llama(vocab_size: int = 61, seed: int = 0, **config_overrides):
    """A 2-layer LlamaForCausalLM (hidden 32, MLP width 48) with random weights, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.update(config_overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config))
