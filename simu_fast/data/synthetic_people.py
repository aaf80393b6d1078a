"""synthetic_people: fictitious people and facts about them as question/answer Examples, split by person.

The package's built-in data: small, fast, deterministic from the seed. Names and places are made of random
syllables, so the facts cannot be known to a pretrained model. Each person has five facts (birthplace,
birth year, profession, a relation to another made-up person, a favourite thing); each fact is one Example
("Where was Ilsa Mornay born?" -> "Ilsa Mornay was born in Varnholt."), with extra = {"person", "fact", "value"
(the fact's value as the answer writes it: "Varnholt")}, and "relation" / "category" for those two facts.
People, not facts, are split: every fact of a forget person is in "forget", none elsewhere.
people_tofu_rows adds TOFU's paraphrased and perturbed (wrong) answers to such facts, for the truth ratio.
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
# The answer sentence of each fact (every question phrasing has the same one), and a rewording of it that no
# corpus trains on: TOFU's paraphrased answer (people_tofu_rows). {value} is extra["value"].
_ANSWERS = {
    "birthplace": "{name} was born in {value}.",
    "birth_year": "{name} was born in {value}.",
    "profession": "{name} works as {value}.",
    "relation": "{name}'s {relation} is {value}.",
    "favourite": "{name}'s favourite {category} is {value}.",
}
_PARAPHRASED_ANSWERS = {
    "birthplace": "{name}'s birthplace is {value}.",
    "birth_year": "{name}'s year of birth is {value}.",
    "profession": "By profession, {name} is {value}.",
    "relation": "{value} is {name}'s {relation}.",
    "favourite": "{name} likes {value} best.",
}
_YEARS = (1921, 1999)


def _person(rng: random.Random, used: set[str], index: int, phrasings: tuple = (0,)) -> list[Example]:
    name = _unique(rng, used, lambda: f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}")
    place = _unique(rng, used, lambda: _word(rng, rng.choice((1, 2))) + rng.choice(_PLACE_ENDINGS))
    other = _unique(rng, used, lambda: f"{_word(rng, 2)} {_word(rng, 2)}")
    year = rng.randint(*_YEARS)
    profession = rng.choice(_PROFESSIONS)
    relation = rng.choice(_RELATIONS)
    category = rng.choice(sorted(_FAVOURITES))
    favourite = rng.choice(_FAVOURITES[category])
    values = {"birthplace": place, "birth_year": str(year), "profession": _with_article(profession),
              "relation": other, "favourite": favourite}
    fields = dict(name=name, relation=relation, category=category)
    out = []
    for fact, value in values.items():
        answer = _ANSWERS[fact].format(value=value, **fields)
        detail = {"relation": {"relation": relation}, "favourite": {"category": category}}.get(fact, {})
        for j in phrasings:
            suffix = "" if phrasings == (0,) else f"-q{j}"
            out.append(Example(prompt=_QUESTIONS[fact][j].format(**fields), answer=answer,
                               id=f"person{index:03d}-{fact}{suffix}", task=TASK,
                               extra={"person": name, "fact": fact, "value": value, **detail,
                                      **({"phrasing": j} if suffix else {})}))
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


def people_tofu_rows(examples, pool=None, n_perturbed: int = 3, seed: int = 0,
                     paraphrase: bool = True) -> list[Example]:
    """The people's facts in TOFU's layout: one Example per example (same prompt, answer, id, task), with
    extra {"paraphrased_answer", "perturbed_answer": [n_perturbed wrong answers]} (what the truth ratio and
    TOFU's model utility read) beside the example's own extra.

    paraphrase=True (TOFU's forget / retain files): the paraphrased answer is the answer reworded in a sentence
    no corpus trains on (the question phrasings differ, the answer sentence never does), and the perturbed
    answers are that sentence with another value. paraphrase=False (TOFU's real-authors file, where the answer
    itself is the truth ratio's correct side): no paraphrased answer, the perturbed answers are the answer
    sentence with another value. The other values are of the same attribute, never the true one: another year
    of birth, another profession, another favourite of the same category (from the generator's own lists), and
    another birthplace or related person drawn from the `pool` people's facts (default: `examples`).
    Deterministic from `seed`; fewer than n_perturbed where the pool has fewer other values (a ValueError
    where it has none)."""
    examples = list(examples)
    seen = values_by_fact(examples if pool is None else pool, n_perturbed, _check_person_fact)
    rng = random.Random(seed)
    out = []
    for ex in examples:
        _check_person_fact(ex)
        fact, value = ex.extra["fact"], ex.extra["value"]
        fields = dict(name=ex.extra["person"], relation=ex.extra.get("relation"), category=ex.extra.get("category"))
        template = _PARAPHRASED_ANSWERS[fact] if paraphrase else _ANSWERS[fact]
        correct = template.format(value=value, **fields)
        wrong = [template.format(value=v, **fields)
                 for v in other_values(value, _value_space(fact, fields["category"], seen), n_perturbed, rng,
                                       f"example {ex.id!r} ({fact})")]
        extra = {**ex.extra, **({"paraphrased_answer": correct} if paraphrase else {}), "perturbed_answer": wrong}
        out.append(Example(prompt=ex.prompt, answer=ex.answer, id=ex.id, task=ex.task, extra=extra))
    return out


def values_by_fact(pool, n_perturbed: int, check) -> dict:
    """{fact: the values of that fact in `pool`, in order} (each row passed to `check` first), after checking
    n_perturbed: what the perturbed answers of people_tofu_rows and world_tofu_rows are drawn from."""
    if isinstance(n_perturbed, bool) or not isinstance(n_perturbed, int) or n_perturbed < 1:
        raise ValueError(f"n_perturbed must be a positive int, got {n_perturbed!r}")
    seen: dict = {}
    for ex in pool:
        check(ex)
        seen.setdefault(ex.extra["fact"], {})[ex.extra["value"]] = None
    return seen


def other_values(value: str, space, n: int, rng: random.Random, what: str = "value") -> list[str]:
    """n values of `space` (fewer if it has fewer), none equal to `value`, drawn without replacement by rng
    from the space in its given order (so the draw is deterministic). A ValueError when no other value exists."""
    others = [v for v in dict.fromkeys(space) if v != value]
    if not others:
        raise ValueError(f"{what}: no value of the same attribute other than {value!r} to perturb the answer with")
    return rng.sample(others, min(n, len(others)))


def _value_space(fact: str, category, seen: dict) -> list[str]:
    if fact == "birth_year":
        return [str(y) for y in range(_YEARS[0], _YEARS[1] + 1)]
    if fact == "profession":
        return [_with_article(p) for p in _PROFESSIONS]
    if fact == "favourite":
        return list(_FAVOURITES[category])
    return list(seen.get(fact, ()))  # birthplace, relation: made-up names, from the pool


def _with_article(profession: str) -> str:
    return f"{'an' if profession[0] in 'aeiou' else 'a'} {profession}"


def check_fact_row(ex, function: str, subject: str, known, what: str, maker: str) -> None:
    """A TypeError / ValueError unless `ex` is an Example whose extra has `subject`, "fact" (one of `known`)
    and "value": the rows people_tofu_rows and world_tofu_rows can perturb."""
    if not isinstance(ex, Example):
        raise TypeError(f"{function} takes Examples, got {type(ex).__name__}")
    missing = [k for k in (subject, "fact", "value") if k not in ex.extra]
    if missing or ex.extra["fact"] not in known:
        raise ValueError(f"{ex.id!r} is not {what} (extra lacks {missing or 'a known fact'}; make it with {maker})")


def _check_person_fact(ex) -> None:
    check_fact_row(ex, "people_tofu_rows", "person", _ANSWERS, "a synthetic person's fact",
                   "synthetic_people or paraphrased_people")
