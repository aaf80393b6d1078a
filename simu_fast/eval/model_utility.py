"""TOFU's Model Utility (Maini et al. 2024, arXiv 2401.06121): the harmonic mean of nine scores, three on each of
the sets a model should keep: "retain" (TOFU's retain_perturbed: fictitious authors not forgotten),
"real_authors" (real_authors_perturbed) and "world_facts" (world_facts_perturbed).

Definitions, as in locuslab/tofu aggregate_eval_stat.py get_model_utility (with config/eval_everything.yaml) and
locuslab/open-unlearning configs/eval/tofu_metrics/model_utility.yaml (handler hm_aggregate = scipy hmean) and
src/evals/metrics (memorization.py probability / probability_w_options / truth_ratio / rouge). With
p(a) = P(a | question)^(1/|a|), the length-normalized answer probability (exp of minus the mean answer-token
NLL, answer_likelihood.answer_probability), and means over a split's examples:

- retain, "answer_prob": mean of p(answer) (open-unlearning retain_Q_A_Prob; TOFU "Prob. Retain").
- real_authors / world_facts, "answer_prob_normalized": mean of p(answer) / (p(answer) + sum over perturbed
  answers of p(perturbed)): the answer's share among the options (open-unlearning ra/wf_Q_A_Prob_normalised,
  probability_w_options, which adds 1e-10 to the denominator; TOFU "Prob. Real Authors / Real World").
- "rougeL_recall", every split: mean ROUGE-L recall of the greedy answer against the answer (Porter stemmer;
  retain/ra/wf_Q_A_ROUGE; TOFU "ROUGE ...").
- "truth_ratio", every split: mean of max(0, 1 - R) ("true_better" in open-unlearning; TOFU's
  max(0, 1 - 1/curr_stat_1)), R = exp(mean over perturbed of log p(pert) - mean over correct of log p(correct))
  (truth_ratio.truth_ratios, geometric). The correct answer is the paraphrased answer for retain
  (retain_Q_A_PARA_Prob; TOFU base_answer_key paraphrased_answer) but the answer itself for real_authors and
  world_facts (ra/wf_Q_A_Prob; base_answer_key answer): those files' paraphrases are not used. (min(R, 1/R) is the
  forget set's statistic, not part of Model Utility.)

Model Utility = 9 / sum(1 / score): 0 when any score is 0. Generation here stops at EOS or after max_new_tokens
(None: the longest reference answer of the batch plus 8 tokens, as answer_metrics does); TOFU and
open-unlearning let greedy decoding run to 200 tokens, which can only raise ROUGE-L recall (pass
max_new_tokens=200 to match them).
"""
from __future__ import annotations

import math

from ..data.example import Example, checked_examples
from .answer_likelihood import answer_probability, answer_token_logprobs
from .answer_metrics import answer_metrics
from .truth_ratio import truth_ratio_score, truth_ratios

SPLITS = ("retain", "real_authors", "world_facts")
SCORES = {"retain": ("answer_prob", "rougeL_recall", "truth_ratio"),
          "real_authors": ("answer_prob_normalized", "rougeL_recall", "truth_ratio"),
          "world_facts": ("answer_prob_normalized", "rougeL_recall", "truth_ratio")}
# extra fields each split's examples need: the paraphrase is retain's correct answer for the truth ratio
NEEDED = {"retain": ("paraphrased_answer", "perturbed_answer"), "real_authors": ("perturbed_answer",),
          "world_facts": ("perturbed_answer",)}


def model_utility(model, tokenizer, splits: dict, batch_size: int = 16, max_length: int = 512,
                  max_new_tokens: int | None = None, chat_template: bool = False, progress: bool = False) -> dict:
    """{"model_utility": harmonic mean of the nine scores, "scores": {split: {name: value}} (names in SCORES),
    "n": {split: number of examples}}. splits: {"retain", "real_authors", "world_facts"} -> lists of Examples,
    each with extra["perturbed_answer"] (a string or a list of strings; retain also extra["paraphrased_answer"]),
    as load_examples(format="tofu") reads TOFU's *_perturbed files. Checked before any model call."""
    checked = check_splits(splits)
    common = dict(batch_size=batch_size, max_length=max_length, chat_template=chat_template)
    scores = {"retain": _retain_scores(model, tokenizer, checked["retain"], common, max_new_tokens, progress)}
    for name in ("real_authors", "world_facts"):
        scores[name] = _options_scores(model, tokenizer, checked[name], common, max_new_tokens, progress)
    values = [scores[s][k] for s in SPLITS for k in SCORES[s]]
    return {"model_utility": harmonic_mean(values), "scores": scores,
            "n": {name: len(checked[name]) for name in SPLITS}}


def harmonic_mean(values) -> float:
    """n / sum(1 / v) of non-negative numbers, as scipy.stats.hmean: 0.0 when any value is 0, nan when any is nan."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic_mean of no values")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean takes non-negative values (scores), got {values}")
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def check_splits(splits) -> dict[str, list[Example]]:
    """The three splits as lists of Examples; a ValueError that names the missing (or unknown) split, or the split,
    example and extra field that is missing or malformed."""
    if not isinstance(splits, dict):
        raise TypeError(f"splits must be a dict {{'retain', 'real_authors', 'world_facts'}} -> examples, got "
                        f"{type(splits).__name__}")
    unknown = sorted(set(splits) - set(SPLITS), key=str)
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}: Model Utility uses exactly {list(SPLITS)}")
    checked = {}
    for name in SPLITS:
        if splits.get(name) is None:
            raise ValueError(f"Model Utility needs the split {name!r} (TOFU's {name}_perturbed); got only "
                             f"{sorted(splits, key=str)}")
        checked[name] = checked_examples(splits[name], f"model_utility (split {name!r})",
                                         f"the split {name!r} is empty")
        for i, ex in enumerate(checked[name]):
            for field in NEEDED[name]:
                _answers(ex, field, f"split {name!r}, example {i} (id {ex.id!r})")
    return checked


def _retain_scores(model, tokenizer, examples, common, max_new_tokens, progress) -> dict:
    metrics = answer_metrics(model, tokenizer, examples, max_new_tokens=max_new_tokens, progress=progress, **common)
    ratios = truth_ratios(model, tokenizer, examples, progress=progress, **common)
    return {"answer_prob": metrics["answer_prob"], "rougeL_recall": metrics["rougeL_recall"],
            "truth_ratio": truth_ratio_score(ratios, "retain")}


def _options_scores(model, tokenizer, examples, common, max_new_tokens, progress) -> dict:
    metrics = answer_metrics(model, tokenizer, examples, max_new_tokens=max_new_tokens, progress=progress, **common)
    # the answer itself is the "correct" side of the truth ratio here (TOFU's base_answer_key "answer")
    as_options = [Example(ex.prompt, ex.answer, id=ex.id, task=ex.task,
                          extra={"paraphrased_answer": ex.answer, "perturbed_answer": ex.extra["perturbed_answer"]})
                  for ex in examples]
    ratios = truth_ratios(model, tokenizer, as_options, progress=progress, **common)
    # truth_ratios keeps its per-answer probabilities to itself, so the perturbed answers are scored once more
    # for the normalized probability: teacher-forced passes, cheap next to generating the answers
    wrong = _perturbed_probabilities(model, tokenizer, examples, common, progress)
    shares = [_share(p, w) for p, w in zip(metrics["per_example"]["answer_prob"], wrong)]
    shares = [s for s in shares if not math.isnan(s)]
    return {"answer_prob_normalized": sum(shares) / len(shares) if shares else math.nan,
            "rougeL_recall": metrics["rougeL_recall"], "truth_ratio": truth_ratio_score(ratios, "retain")}


def _perturbed_probabilities(model, tokenizer, examples, common, progress) -> list[list[float]]:
    """p(perturbed) for each perturbed answer of each example (nan where tokenization dropped it)."""
    queries, owners = [], []
    for i, ex in enumerate(examples):
        for answer in _answers(ex, "perturbed_answer", ""):
            queries.append(Example(prompt=ex.prompt, answer=answer, id=ex.id, task=ex.task))
            owners.append(i)
    logprobs = answer_token_logprobs(model, tokenizer, queries, common["batch_size"], common["max_length"],
                                     common["chat_template"], progress, desc="perturbed answers")
    out: list[list[float]] = [[] for _ in examples]
    for i, lp in zip(owners, logprobs):
        out[i].append(answer_probability(lp))
    return out


def _share(correct: float, wrong: list[float]) -> float:
    """p(answer) / (p(answer) + sum p(perturbed)); nan when the answer or every perturbed answer was dropped."""
    wrong = [w for w in wrong if not math.isnan(w)]
    if math.isnan(correct) or not wrong:
        return math.nan
    return correct / (correct + sum(wrong))


def _answers(ex: Example, field: str, where: str) -> list[str]:
    if field not in ex.extra:
        raise ValueError(f"{where} has no {field!r} in its extra fields; Model Utility's truth ratio needs it "
                         "(TOFU's *_perturbed files have it: load them with load_examples(path, format='tofu'))")
    value = ex.extra[field]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where}: extra[{field!r}] must be a non-empty string or a non-empty list of them, "
                         f"got {value!r}")
    return list(values)
