"""synthetic_people: deterministic from the seed, split by person, sizes from the fractions."""
import re

import pytest

from simu_fast.data import Example, synthetic_people
from simu_fast.data.synthetic_people import FACTS

SPLITS = ("forget", "retain", "holdout")


def people(examples):
    return {ex.extra["person"] for ex in examples}


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = synthetic_people(seed=0), synthetic_people(seed=0), synthetic_people(seed=1)
    assert a == b
    assert a["retain"] != c["retain"]
    assert people(a["retain"] + a["forget"] + a["holdout"]) != people(c["retain"] + c["forget"] + c["holdout"])


def test_default_split_sizes():
    data = synthetic_people()
    assert set(data) == set(SPLITS)
    assert {s: len(people(data[s])) for s in SPLITS} == {"forget": 6, "retain": 48, "holdout": 6}
    assert {s: len(data[s]) for s in SPLITS} == {"forget": 30, "retain": 240, "holdout": 30}


@pytest.mark.parametrize("n, forget, holdout, expected", [
    (20, 0.25, 0.1, (5, 13, 2)),
    (10, 0.0, 0.2, (0, 8, 2)),
    (7, 0.01, 0.01, (1, 5, 1)),  # a positive fraction gives at least one person
    (3, 0.1, 0.1, (1, 1, 1)),
])
def test_fractions(n, forget, holdout, expected):
    data = synthetic_people(n_people=n, seed=5, forget_fraction=forget, holdout_fraction=holdout)
    assert tuple(len(people(data[s])) for s in SPLITS) == expected


def test_people_do_not_overlap_across_splits():
    data = synthetic_people(n_people=40, seed=2)
    sets = [people(data[s]) for s in SPLITS]
    assert sum(len(s) for s in sets) == len(set.union(*sets)) == 40
    everyone = set.union(*sets)
    for split in SPLITS:
        for ex in data[split]:
            others = everyone - people([ex])
            assert not any(name in ex.prompt or name in ex.answer for name in others), ex  # no other person named


def test_examples_are_well_formed():
    data = synthetic_people(n_people=30, seed=7)
    examples = [ex for s in SPLITS for ex in data[s]]
    assert len({ex.id for ex in examples}) == len(examples)
    assert len({ex.prompt for ex in examples}) == len(examples)
    by_person = {}
    for ex in examples:
        assert isinstance(ex, Example) and ex.task == "synthetic_people"
        name = ex.extra["person"]
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
        assert ex.prompt.endswith("?") and name in ex.prompt
        assert ex.answer.startswith(name) and ex.answer.endswith(".")
        by_person.setdefault(name, []).append(ex.extra["fact"])
    assert all(facts == list(FACTS) for facts in by_person.values())
    birthplace = next(ex for ex in examples if ex.extra["fact"] == "birthplace")
    assert re.fullmatch(r"Where was (.+) born\?", birthplace.prompt)
    assert re.fullmatch(rf"{birthplace.extra['person']} was born in [A-Z][a-z]+\.", birthplace.answer)


def test_bad_parameters():
    with pytest.raises(ValueError, match="n_people must be a positive int"):
        synthetic_people(n_people=0)
    with pytest.raises(ValueError, match=r"forget_fraction must be in \[0, 1\)"):
        synthetic_people(forget_fraction=1.0)
    with pytest.raises(ValueError, match="leave none for retain"):
        synthetic_people(n_people=2)
    with pytest.raises(ValueError, match="leave none for retain"):
        synthetic_people(n_people=10, forget_fraction=0.5, holdout_fraction=0.5)


def test_paraphrased_people_three_phrasings_one_answer():
    from simu_fast.data.synthetic_people import PHRASINGS, paraphrased_people
    people = paraphrased_people(4, seed=2, first_index=100)
    assert len(people) == 4 and all(len(p) == 5 * PHRASINGS for p in people)
    for person in people:
        for fact in {ex.extra["fact"] for ex in person}:
            rows = [ex for ex in person if ex.extra["fact"] == fact]
            assert [ex.extra["phrasing"] for ex in rows] == [0, 1, 2]
            assert len({ex.answer for ex in rows}) == 1 and len({ex.prompt for ex in rows}) == 3
            assert all(ex.extra["person"] in ex.prompt for ex in rows)
    assert people[0][0].id == "person100-birthplace-q0"
    # phrasing 0 is synthetic_people's question; the same seed gives the same people
    assert paraphrased_people(4, seed=2, first_index=100) == people


def test_world_facts_and_filler():
    from simu_fast.data.synthetic_world import filler_texts, world_facts
    facts = world_facts(5, seed=1)
    assert len(facts) == 20 and len({ex.extra["country"] for ex in facts}) == 5
    assert all(ex.extra["country"] in ex.prompt and ex.extra["country"] in ex.answer for ex in facts)
    assert facts == world_facts(5, seed=1) and facts != world_facts(5, seed=2)
    texts = filler_texts(50, seed=0)
    assert len(texts) == 50 and all(t[0].isupper() and t.endswith(".") for t in texts)
    assert len(set(texts)) > 40
    with pytest.raises(ValueError):
        world_facts(0)
