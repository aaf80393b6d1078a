"""Background knowledge for the unlearning protocol: synthetic world facts and filler text.

world_facts: made-up countries, each with a capital, a language, a river and a national dish, as question /
answer Examples (task "world_facts"): general knowledge a model should keep while it forgets some people.
filler_texts: short sentences from a small grammar of everyday words (weather, markets, travel), for
pretraining and for the perplexity of held-out text. Both deterministic from the seed; the made-up names
cannot be known to any pretrained model.
"""
from __future__ import annotations

import random

from .example import Example
from .synthetic_people import _unique, _word

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


def world_facts(n_countries: int = 40, seed: int = 0) -> list[Example]:
    """4 facts per made-up country (capital, language, river, dish), one Example each, extra {"country", "fact"}."""
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
        facts = {"capital": (f"What is the capital of {country}?", f"The capital of {country} is {capital}."),
                 "language": (f"What language is spoken in {country}?", f"People in {country} speak {language}."),
                 "river": (f"Which river flows through {country}?", f"{river.capitalize()} flows through {country}."),
                 "dish": (f"What is the national dish of {country}?", f"The national dish of {country} is {dish}.")}
        out += [Example(prompt=q, answer=a, id=f"country{i:03d}-{fact}", task=WORLD_TASK,
                        extra={"country": country, "fact": fact}) for fact, (q, a) in facts.items()]
    return out


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
