"""The protocol's two corpora (workloads/protocol.py): what the base model is pretrained on, and the new items
it is fine-tuned on and then asked to forget.

background_corpus(settings) -> {"facts": [Examples the base learns], "world": [Examples of that knowledge, to
measure it after unlearning], "filler": [texts], "filler_heldout": [texts, never trained]}
new_split(settings, seed) -> {"forget", "retain", "holdout"} (the trained phrasings; holdout is never trained)
and {"forget_paraphrase", "retain_paraphrase", "holdout_paraphrase"} (an unseen phrasing; empty for LUME).

- "synthetic": several hundred made-up people, each fact in 3 question phrasings, made-up countries' facts
  and filler sentences; the new people are fine-tuned in phrasings 0 and 1, phrasing 2 stays unseen.
- "lume": the LUME files (forget.jsonl, retain.jsonl in settings.data_dir). The base learns a fixed sample of
  retain.jsonl passages (held out from every split) plus the same filler; the new items are forget.jsonl
  items (forget, and never-trained holdout) and other retain.jsonl items (retain), balanced over LUME's
  (task, kind) groups. Passages are cut to the last `prompt_words` words of the input and the first
  `answer_words` of the output, so a small model learns them on a CPU. LUME has no paraphrases.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random

LUME_TASKS = ("Task1", "Task2", "Task3")
LUME_KINDS = ("sc", "qa")
_LUME_POOL_SEED = 12345  # the fixed draw of the base's LUME passages, apart from every split's seed


def background_corpus(settings) -> dict:
    if settings.workload == "lume":
        return _lume_background(settings)
    from ..data.synthetic_people import paraphrased_people
    from ..data.synthetic_world import world_facts
    facts = [ex for person in paraphrased_people(settings.background_people, seed=1) for ex in person]
    world = world_facts(settings.countries, seed=3)
    return {"facts": facts + world, "world": world, **_filler(settings)}


def new_split(settings, seed: int) -> dict:
    if settings.workload == "lume":
        return _lume_split(settings, seed)
    return _synthetic_split(settings, seed)


def tokenizer_texts(settings) -> list:
    """Every text the workload can show the model (the base's corpus and every item any seed can draw), so
    that one tokenizer serves all seeds. Only the vocabulary sees them; the base trains on its corpus only."""
    corpus = background_corpus(settings)
    if settings.workload == "lume":
        forget, retain, _ = _lume_candidates(settings)
        items = forget + retain
    else:
        items = [ex for rows in _synthetic_split(settings, 0).values() for ex in rows]
    pairs = lambda rows: [t for ex in rows for t in (ex.prompt, " " + ex.answer)]  # noqa: E731
    return pairs(corpus["facts"]) + corpus["filler"] + pairs(items)


def _filler(settings) -> dict:
    from ..data.synthetic_world import filler_texts
    filler = filler_texts(settings.filler + 100, seed=2)
    return {"filler": filler[:settings.filler], "filler_heldout": filler[settings.filler:]}


# ---- synthetic people -------------------------------------------------------------------------------------
def _synthetic_split(settings, seed: int) -> dict:
    from ..data.synthetic_people import paraphrased_people
    people = paraphrased_people(settings.new_people, seed=7, first_index=10_000)
    order = list(range(len(people)))
    random.Random(seed).shuffle(order)
    n_f, n_h = settings.forget_people, settings.holdout_people
    if n_f + n_h >= len(people):
        raise ValueError(f"{len(people)} new people leave none to retain with {n_f} forget and {n_h} holdout")
    groups = {"forget": order[:n_f], "holdout": order[n_f:n_f + n_h], "retain": order[n_f + n_h:]}
    out = {}
    for name, idx in groups.items():
        rows = [ex for i in sorted(idx) for ex in people[i]]
        out[name] = [ex for ex in rows if ex.extra["phrasing"] < 2]
        out[f"{name}_paraphrase"] = [ex for ex in rows if ex.extra["phrasing"] == 2]
    return out


# ---- LUME -------------------------------------------------------------------------------------------------
def lume_item_kind(example) -> str:
    """'sc' or 'qa' from the LUME id's suffix (sc<N> / qa<N>)."""
    ident = (example.id or "").rstrip("0123456789")
    for kind in LUME_KINDS:
        if ident.endswith(kind):
            return kind
    raise ValueError(f"LUME item {example.id!r}: the id does not end in sc<N> or qa<N>")


def shorten(example, prompt_words: int, answer_words: int):
    """The example cut to the last prompt_words words of its prompt and the first answer_words of its answer."""
    prompt, answer = example.prompt.split(), example.answer.split()
    return dataclasses.replace(example, prompt=" ".join(prompt[-prompt_words:]), answer=" ".join(answer[:answer_words]))


def balanced_subsets(examples, sizes: dict, seed: int) -> dict:
    """{name: examples}: for each LUME (task, kind) group, disjoint seeded samples of sizes[name] items each."""
    rng = random.Random(seed)
    out = {name: [] for name in sizes}
    for task in LUME_TASKS:
        for kind in LUME_KINDS:
            group = [ex for ex in examples if ex.task == task and lume_item_kind(ex) == kind]
            need = sum(sizes.values())
            if len(group) < need:
                raise ValueError(f"LUME {task}/{kind}: {len(group)} items, {need} needed; ask for fewer per group")
            rng.shuffle(group)
            start = 0
            for name, n in sizes.items():
                out[name] += group[start:start + n]
                start += n
    return out


def _lume_candidates(settings) -> tuple:
    """(forget-file items, retain-file items not in the base's corpus, the base's passages), shortened: what
    every split draws from. The base's passages are a fixed draw from retain.jsonl, the same for every seed."""
    if not settings.data_dir:
        raise ValueError("the lume workload needs data_dir: the directory holding LUME's forget.jsonl and retain.jsonl")
    return _lume_pools(os.path.abspath(settings.data_dir), settings.prompt_words, settings.answer_words,
                       settings.lume_background_per_group)


@functools.lru_cache(maxsize=4)
def _lume_pools(data_dir: str, prompt_words: int, answer_words: int, background_per_group: int) -> tuple:
    from ..data import load_examples
    files = {}
    for name in ("forget", "retain"):
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LUME file not found: {path}")
        files[name] = [shorten(ex, prompt_words, answer_words) for ex in load_examples(path, format="lume")]
    base = balanced_subsets(files["retain"], {"base": background_per_group}, _LUME_POOL_SEED)["base"]
    taken = {ex.id for ex in base}
    return files["forget"], [ex for ex in files["retain"] if ex.id not in taken], base


def _lume_background(settings) -> dict:
    base = _lume_candidates(settings)[2]
    return {"facts": base, "world": base[:60], **_filler(settings)}


def _lume_split(settings, seed: int) -> dict:
    forget_pool, retain_pool, _ = _lume_candidates(settings)
    n = settings.lume_per_group
    f = balanced_subsets(forget_pool, {"forget": n, "holdout": n}, seed)
    r = balanced_subsets(retain_pool, {"retain": 2 * n}, seed + 1)
    out = {"forget": f["forget"], "holdout": f["holdout"], "retain": r["retain"]}
    return {**out, **{f"{name}_paraphrase": [] for name in out}}
