"""synthetic_people: fictitious people and facts about them as question/answer Examples, split by person.

The package's built-in data: small, fast, deterministic from the seed. Names and places are made of random
syllables, so the facts cannot be known to a pretrained model. Each person has five facts (birthplace,
birth year, profession, a relation to another made-up person, a favourite thing); each fact is one Example
("Where was Ilsa Mornay born?" -> "Ilsa Mornay was born in Varnholt."), with extra = {"person", "fact"}.
People, not facts, are split: every fact of a forget person is in "forget", none elsewhere.
"""
from __future__ import annotations

import random

from .example import Example

TASK = "synthetic_people"
FACTS = ("birthplace", "birth_year", "profession", "relation", "favourite")

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th",
           "v", "w", "z", "")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "x")
_PLACE_ENDINGS = ("holt", "mere", "wick", "dal", "ford", "stead", "by", "vik", "ston", "gard", "moor", "haven")
_PROFESSIONS = ("cartographer", "glassblower", "beekeeper", "lighthouse keeper", "archivist", "clockmaker",
                "marine biologist", "violin maker", "tax inspector", "astronomer", "ferry captain", "baker",
                "orchard farmer", "translator", "stonemason", "engineer", "puppeteer", "veterinarian")
_RELATIONS = ("mentor", "sibling", "closest friend", "business partner", "neighbour", "rival")
_FAVOURITES = {
    "colour": ("teal", "ochre", "crimson", "lavender", "slate grey", "amber", "olive green"),
    "instrument": ("the oboe", "the cello", "the harp", "the accordion", "the bassoon", "the zither"),
    "food": ("plum dumplings", "smoked trout", "barley soup", "fig bread", "lentil stew", "honey cake"),
    "season": ("early spring", "late autumn", "midwinter", "high summer"),
}


def synthetic_people(n_people: int = 60, seed: int = 0, forget_fraction: float = 0.1,
                     holdout_fraction: float = 0.1) -> dict[str, list[Example]]:
    """{"forget", "retain", "holdout"}: lists of Examples, five per person; the people are split
    round(n_people * fraction) to forget and to holdout (at least one each when the fraction is above 0), the
    rest to retain."""
    if isinstance(n_people, bool) or not isinstance(n_people, int) or n_people < 1:
        raise ValueError(f"n_people must be a positive int, got {n_people!r}")
    for name, value in (("forget_fraction", forget_fraction), ("holdout_fraction", holdout_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    n_forget, n_holdout = _count(n_people, forget_fraction), _count(n_people, holdout_fraction)
    if n_forget + n_holdout >= n_people:
        raise ValueError(f"{n_people} people leave none for retain with {n_forget} forget and {n_holdout} holdout; "
                         "use more people or smaller fractions")

    rng = random.Random(seed)
    used: set[str] = set()
    people = [_person(rng, used, i) for i in range(n_people)]
    order = list(range(n_people))
    rng.shuffle(order)
    groups = {"forget": sorted(order[:n_forget]), "holdout": sorted(order[n_forget:n_forget + n_holdout]),
              "retain": sorted(order[n_forget + n_holdout:])}
    return {split: [ex for i in groups[split] for ex in people[i]] for split in ("forget", "retain", "holdout")}


def _count(n: int, fraction: float) -> int:
    return 0 if fraction == 0 else max(1, int(n * fraction + 0.5))


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def _unique(rng: random.Random, used: set[str], make) -> str:
    while True:
        value = make()
        if value not in used and len(value) > 3:
            used.add(value)
            return value


# Three phrasings of each question; the first is the one synthetic_people uses.
_QUESTIONS = {
    "birthplace": ("Where was {name} born?", "What is the birthplace of {name}?", "In which town was {name} born?"),
    "birth_year": ("In which year was {name} born?", "When was {name} born?", "What year was {name} born in?"),
    "profession": ("What does {name} do for a living?", "What is {name}'s job?", "How does {name} earn a living?"),
    "relation": ("Who is {name}'s {relation}?", "Name {name}'s {relation}.", "Who is the {relation} of {name}?"),
    "favourite": ("What is {name}'s favourite {category}?", "Which {category} does {name} like best?",
                  "Name {name}'s favourite {category}."),
}
PHRASINGS = 3


def _person(rng: random.Random, used: set[str], index: int, phrasings: tuple = (0,)) -> list[Example]:
    name = _unique(rng, used, lambda: f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}")
    place = _unique(rng, used, lambda: _word(rng, rng.choice((1, 2))) + rng.choice(_PLACE_ENDINGS))
    other = _unique(rng, used, lambda: f"{_word(rng, 2)} {_word(rng, 2)}")
    year = rng.randint(1921, 1999)
    profession = rng.choice(_PROFESSIONS)
    article = "an" if profession[0] in "aeiou" else "a"
    relation = rng.choice(_RELATIONS)
    category = rng.choice(sorted(_FAVOURITES))
    favourite = rng.choice(_FAVOURITES[category])
    answers = {
        "birthplace": f"{name} was born in {place}.",
        "birth_year": f"{name} was born in {year}.",
        "profession": f"{name} works as {article} {profession}.",
        "relation": f"{name}'s {relation} is {other}.",
        "favourite": f"{name}'s favourite {category} is {favourite}.",
    }
    fields = dict(name=name, relation=relation, category=category)
    out = []
    for fact, answer in answers.items():
        for j in phrasings:
            suffix = "" if phrasings == (0,) else f"-q{j}"
            out.append(Example(prompt=_QUESTIONS[fact][j].format(**fields), answer=answer,
                               id=f"person{index:03d}-{fact}{suffix}", task=TASK,
                               extra={"person": name, "fact": fact, **({"phrasing": j} if suffix else {})}))
    return out


def paraphrased_people(n_people: int, seed: int = 0, first_index: int = 0) -> list[list[Example]]:
    """One list per person of 5 facts x PHRASINGS question phrasings (extra["phrasing"] = 0, 1, 2; phrasing 0
    is synthetic_people's question), the same answer sentence for every phrasing of a fact. Names are drawn
    from `seed`; first_index numbers the ids (so two calls with different seeds can be told apart)."""
    if isinstance(n_people, bool) or not isinstance(n_people, int) or n_people < 1:
        raise ValueError(f"n_people must be a positive int, got {n_people!r}")
    rng = random.Random(seed)
    used: set[str] = set()
    return [_person(rng, used, first_index + i, tuple(range(PHRASINGS))) for i in range(n_people)]
