"""Background knowledge for the unlearning protocol: synthetic world facts and filler text.

world_facts: made-up countries, each with a capital, a language, a river and a national dish, as question /
answer Examples (task "world_facts"): general knowledge a model should keep while it forgets some people.
filler_texts: short sentences from a small grammar of everyday words (weather, markets, travel), for
pretraining and for the perplexity of held-out text. Both deterministic from the seed; the made-up names
cannot be known to any pretrained model. world_tofu_rows adds TOFU's perturbed (wrong) answers to world facts.
"""
from __future__ import annotations

import random

from .example import Example
from .synthetic_people import _unique, _word, check_fact_row, other_values, values_by_fact

WORLD_TASK = "world_facts"
_DISHES = ("barley soup", "fish stew", "flatbread", "roast squash", "rice cakes", "bean pie", "spiced lamb",
           "plum pudding", "corn porridge", "cheese dumplings")
_SUBJECTS = ("the old farmer", "a young teacher", "the baker", "my neighbour", "the ferry captain", "a tired student",
             "the shopkeeper", "her brother", "the doctor", "a quiet child", "the mayor", "our guide")
_VERBS = ("walked to", "drove to", "looked at", "cleaned", "painted", "visited", "left", "opened", "closed",
          "photographed", "sold", "repaired")
_OBJECTS = ("the market", "the harbour", "the small garden", "the red door", "the library", "the bridge",
            "the station", "the school", "the bakery", "the church", "the long road", "the village square")
_TIMES = ("in the morning", "after lunch", "before the rain", "late at night", "on sunday", "every spring",
          "at noon", "in winter", "yesterday", "at dawn")
_WEATHER = ("the wind was cold", "the sky was clear", "it rained all day", "the sun was warm", "fog covered the hills",
            "the snow was deep", "the air smelled of salt", "the clouds were low")


_WORLD_QUESTIONS = {"capital": "What is the capital of {country}?", "language": "What language is spoken in {country}?",
                    "river": "Which river flows through {country}?", "dish": "What is the national dish of {country}?"}
_WORLD_ANSWERS = {"capital": "The capital of {country} is {value}.", "language": "People in {country} speak {value}.",
                  "river": "{value} flows through {country}.", "dish": "The national dish of {country} is {value}."}


def world_facts(n_countries: int = 40, seed: int = 0) -> list[Example]:
    """4 facts per made-up country (capital, language, river, dish), one Example each, extra {"country", "fact",
    "value" (as the answer writes it)}."""
    if isinstance(n_countries, bool) or not isinstance(n_countries, int) or n_countries < 1:
        raise ValueError(f"n_countries must be a positive int, got {n_countries!r}")
    rng = random.Random(seed)
    used: set[str] = set()
    out = []
    for i in range(n_countries):
        country = _unique(rng, used, lambda: _word(rng, rng.choice((2, 3))) + "ia")
        capital = _unique(rng, used, lambda: _word(rng, 2))
        language = _unique(rng, used, lambda: _word(rng, 2) + "ish")
        river = _unique(rng, used, lambda: "the " + _word(rng, 2))
        dish = rng.choice(_DISHES)
        values = {"capital": capital, "language": language, "river": river.capitalize(), "dish": dish}
        out += [Example(prompt=_WORLD_QUESTIONS[fact].format(country=country),
                        answer=_WORLD_ANSWERS[fact].format(country=country, value=value),
                        id=f"country{i:03d}-{fact}", task=WORLD_TASK,
                        extra={"country": country, "fact": fact, "value": value}) for fact, value in values.items()]
    return out


def world_tofu_rows(facts, pool=None, n_perturbed: int = 3, seed: int = 0) -> list[Example]:
    """The countries' facts in TOFU's world-facts layout: one Example per fact (same prompt, answer, id, task)
    with extra["perturbed_answer"]: n_perturbed wrong answers, the answer sentence with another value of the
    same attribute (another country's capital, language or river from the `pool` facts, default `facts`;
    another of the generator's dishes), never the true one. Deterministic from `seed`; fewer than n_perturbed
    where the pool has fewer other values (a ValueError where it has none)."""
    facts = list(facts)
    seen = values_by_fact(facts if pool is None else pool, n_perturbed, _check_world_fact)
    rng = random.Random(seed)
    out = []
    for ex in facts:
        _check_world_fact(ex)
        fact, value, country = ex.extra["fact"], ex.extra["value"], ex.extra["country"]
        space = _DISHES if fact == "dish" else list(seen.get(fact, ()))
        wrong = [_WORLD_ANSWERS[fact].format(country=country, value=v)
                 for v in other_values(value, space, n_perturbed, rng, f"fact {ex.id!r}")]
        out.append(Example(prompt=ex.prompt, answer=ex.answer, id=ex.id, task=ex.task,
                           extra={**ex.extra, "perturbed_answer": wrong}))
    return out


def _check_world_fact(ex) -> None:
    check_fact_row(ex, "world_tofu_rows", "country", _WORLD_ANSWERS, "a synthetic country's fact", "world_facts")


def filler_texts(n: int, seed: int = 0) -> list[str]:
    """n sentences such as "The old farmer walked to the market in the morning, and the sky was clear."."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}"
        if rng.random() < 0.5:
            text += f", and {rng.choice(_WEATHER)}"
        out.append(text[0].upper() + text[1:] + ".")
    return out
