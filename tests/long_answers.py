"""A tiny model that memorized long answers (40+ tokens, TOFU's length), for the tests and
bench/ssiuu_long_answers.py: each synthetic person's five facts joined into one biography answer."""
import torch

from tiny_models import tiny_llama


def biographies(data: dict, facts: int = 3) -> dict:
    """{split: [Example]}: one example per person of synthetic_people's splits, "Tell me about NAME." -> the
    person's first `facts` fact answers (birthplace, birth year, profession, ...) joined by spaces."""
    from simu_fast.data import Example

    out = {}
    for split, rows in data.items():
        people: dict = {}
        for ex in rows:
            people.setdefault(ex.extra["person"], []).append(ex)
        out[split] = [Example(prompt=f"Tell me about {name}.", answer=" ".join(ex.answer for ex in own[:facts]),
                              id=own[0].id.split("-")[0] + "-bio", task="synthetic_biographies",
                              extra={"person": name})
                      for name, own in people.items()]
    return out


def memorized_biographies(n_people: int = 30, seed: int = 0, facts: int = 4, target_prob: float = 0.8,
                          max_steps: int = 600, max_length: int = 128, **config_overrides):
    """(model, tokenizer, data) as tiny_models.memorized_people, with one biography per person (`facts` facts:
    at 4, 71-94 answer tokens with this tokenizer): 20% of the people to forget, 10% never seen, a 2-layer Llama
    (hidden 64, MLP 128, tied embeddings) trained on forget + retain until their mean length-normalized answer
    probability P ** (1 / T) reaches `target_prob` (checked every 5 steps) or `max_steps` pass. At the defaults
    the forget answers' P ** (1 / T) is 0.82 and P(y|x) 5e-8 (median; smallest 6e-10): the regime of a model
    fine-tuned on TOFU, each token well known and the whole answer's probability vanishing. Seeded: the same
    model every call on one machine."""
    from simu_fast.data import make_loader, synthetic_people, tokenize_examples
    from simu_fast.data.corpus_tokenizer import train_tokenizer
    from simu_fast.eval import answer_metrics
    from simu_fast.training.finetune import finetune

    data = biographies(synthetic_people(n_people, seed=seed, forget_fraction=0.2, holdout_fraction=0.1), facts)
    tok = train_tokenizer([t for split in data.values() for ex in split for t in (ex.prompt, " " + ex.answer)],
                          vocab_size=400)
    train = data["forget"] + data["retain"]
    config = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                  tie_word_embeddings=True, max_position_embeddings=max_length, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.update(config_overrides)
    model = tiny_llama(vocab_size=len(tok), seed=seed, **config)
    loader = make_loader(tokenize_examples(train, tok, max_length), 16, shuffle=True, seed=seed,
                         pad_token_id=tok.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=max_steps, warmup_steps=10, schedule="cosine",
             eval_fn=lambda m: {"p": answer_metrics(m, tok, train, batch_size=64, max_length=max_length,
                                                    generate=False)["answer_prob"]},
             eval_every=5, until=lambda m: m["p"] >= target_prob)
    return model.eval(), tok, data


def answer_stats(model, tok, examples, max_length: int = 128) -> dict:
    """Answer length T (tokens), per-token probability (arithmetic mean), P ** (1 / T) and P(y|x) of the examples:
    medians over the examples, the shortest and longest T and the smallest P."""
    from simu_fast.eval import answer_token_logprobs

    rows = answer_token_logprobs(model, tok, examples, max_length=max_length)
    lengths = torch.tensor([float(len(r)) for r in rows])
    logp = torch.tensor([float(torch.as_tensor(r).double().sum()) for r in rows], dtype=torch.float64)
    token = torch.tensor([float(torch.as_tensor(r).double().exp().mean()) for r in rows])
    return {"answer_tokens": float(lengths.median()), "min_answer_tokens": float(lengths.min()),
            "max_answer_tokens": float(lengths.max()),
            "token_prob": float(token.median()), "normalized_prob": float((logp / lengths.double()).exp().median()),
            "prob": float(logp.exp().median()), "min_prob": float(logp.exp().min())}
