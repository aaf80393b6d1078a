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


def memorized_people(n_people: int = 10, seed: int = 0, target_prob: float = 0.95, max_steps: int = 300,
                     max_length: int = 64, **config_overrides):
    """(model, tokenizer, data): synthetic people (20% to forget, 10% never seen), a BPE tokenizer trained on
    them, and a 2-layer Llama (hidden 64, MLP 128, tied embeddings) trained on forget + retain until their mean
    answer probability reaches `target_prob` (checked every 20 steps) or `max_steps` pass. Seeded: the same
    model every call on one machine."""
    from simu_fast.data import make_loader, synthetic_people, tokenize_examples
    from simu_fast.data.corpus_tokenizer import train_tokenizer
    from simu_fast.eval import answer_metrics
    from simu_fast.training.finetune import finetune

    data = synthetic_people(n_people, seed=seed, forget_fraction=0.2, holdout_fraction=0.1)
    tok = train_tokenizer([t for split in data.values() for ex in split for t in (ex.prompt, " " + ex.answer)],
                          vocab_size=400)
    train = data["forget"] + data["retain"]
    config = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    config.update(config_overrides)
    model = tiny_llama(vocab_size=len(tok), seed=seed, **config)
    loader = make_loader(tokenize_examples(train, tok, max_length), 16, shuffle=True, seed=seed,
                         pad_token_id=tok.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=max_steps, warmup_steps=10, schedule="cosine",
             eval_fn=lambda m: {"p": answer_metrics(m, tok, train, batch_size=64, generate=False)["answer_prob"]},
             eval_every=20, until=lambda m: m["p"] >= target_prob)
    return model.eval(), tok, data


# The vocabulary of the command-line tests' tiny word-level tokenizer (conftest.py: model_dir)
CLI_SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]
CLI_WORDS = ["alice", "bob", "lives", "in", "paris", "rome", "works", "as", "a", "baker", "pilot", "who", "where",
             "does", "is", "?"]


def random_features(n: int, seed: int, length: int, prompt: int, vocab: int, low: int = 1) -> list:
    """n features of random token ids in [low, vocab): {input_ids, labels (-100 on the first `prompt`),
    attention_mask (all ones)}, seeded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(low, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def word_level_tokenizer(vocab: dict):
    """A transformers fast tokenizer over whitespace-split words with ids `vocab` (which holds [UNK], <s>, </s> and
    <pad>), a <s> before every text: token ids the tests can write by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
