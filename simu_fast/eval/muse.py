"""MUSE's measures: VerbMem, KnowMem and PrivLeak (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models", arXiv 2407.06460), as its code computes them (github.com/swj0419/muse_bench:
eval.py, metrics/verbmem.py, metrics/knowmem.py, metrics/privleak.py, metrics/logger.py, constants.py).

- VerbMem: greedy continuation (max_new_tokens 128) of each verbmem prompt, scored with ROUGE-L against the
  true continuation `gt` cut to its first max_new_tokens tokens (tokenized with the tokenizer's special
  tokens, so a BOS takes one of them, then decoded without them: muse_bench's verbmem.py); the mean over
  the prompts.
- KnowMem: each question asked after the few-shot context "Question: {q}\\nAnswer: {a}\\n\\n" of the _icl
  file's pairs, the prompt ending "Question: {q}\\nAnswer: "; a greedy answer of up to 32 new tokens, cut
  before the first "\\n\\n", "\\nQuestion" or "Question:"; ROUGE-L against the answer; the mean.
- ROUGE-L in both: the F1 ("fmeasure") of the rouge-score package without a stemmer (RougeEvalLogger in
  metrics/logger.py; eval.py's default verbmem_agg_key / knowmem_agg_key "mean_rougeL" is the mean of that
  F1). open-unlearning's MUSE configs also use rougeL_f1. The recall (what this package's TOFU-style
  rouge_l_recall reports, there with a stemmer) comes alongside as rougeL_recall.
- PrivLeak = (AUC_unlearned - AUC_retrained) / AUC_retrained * 100, where AUC is that of the Min-40% Prob
  attack (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models", arXiv 2310.16789)
  telling the privleak forget texts from the
  holdout texts, taken the way MUSE takes it: the holdout texts are the positive class (eval.py's default
  privleak_auc_key "forget_holdout_Min-40%": non-members forget, members holdout), i.e. AUC = P(a holdout
  text scores more member-like than a forget text), ties 1/2. That is 1 - the usual AUC with the forget set
  as members (open-unlearning's privleak notes the same "1 - x"). A model that still remembers the forget
  set gives an AUC near 0 and a PrivLeak near -100 (under-unlearning); one that unlearned "too much" (the
  forget texts look less likely than unseen ones) gives a positive PrivLeak; near 0 is the goal.
  AUC_retrained is that of a model retrained without the forget set. MUSE's own retrained Llama-2 7B models
  give 0.4772 (News) and 0.5393 (Books) (constants.py AUC_RETRAIN), kept here as MUSE_RETRAINED_AUC: they
  belong to those models and that tokenizer only.

Scores are fractions in [0, 1]; MUSE's tables show VerbMem and KnowMem times 100. PrivLeak is in percent.
"""
from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache

from ..data.example import Example, checked_examples
from ..data.tokenization import tokenize_examples
from .answer_metrics import nanmean
from .generation import generate_answers
from .membership_inference import auc as mia_auc
from .membership_inference import mia_scores

MUSE_RETRAINED_AUC = {"news": 0.4772, "books": 0.5393}  # muse_bench constants.py: forget_holdout_Min-40%
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")  # muse_bench metrics/knowmem.py


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # as muse_bench's RougeEvalLogger


def rouge_l(prediction: str, reference: str) -> tuple[float, float]:
    """(F1, recall) of ROUGE-L between a generated text and its reference, MUSE's way (no stemmer)."""
    score = _scorer().score(reference, prediction)["rougeL"]
    return float(score.fmeasure), float(score.recall)


def knowmem_prompt(question: str, icl_examples=None) -> str:
    """MUSE's KnowMem prompt: "Question: {q}\\nAnswer: {a}\\n\\n" for each few-shot pair, then
    "Question: {question}\\nAnswer: " (muse_bench metrics/knowmem.py)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    return _prompt(question, _icl(icl_examples))


def _prompt(question: str, icl: list) -> str:
    context = "".join(f"Question: {ex.prompt}\nAnswer: {ex.answer}\n\n" for ex in icl)
    return context + f"Question: {question}\nAnswer: "


def cut_at_stops(text: str, stops=KNOWMEM_STOPS) -> str:
    """The text before the first of each stop string in turn, as muse_bench's get_prefix_before_words_occur."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def verbmem(model, tokenizer, prompts_and_truths, max_new_tokens: int = 128, batch_size: int = 8,
            max_length: int = 4096, truncate_truth: bool = True, progress: bool = False) -> dict:
    """MUSE's VerbMem: {"verbmem" (the mean ROUGE-L F1), "rougeL_f1", "rougeL_recall" (means), "n" (scored),
    "dropped", "per_example": {"rougeL_f1", "rougeL_recall", "generated", "truth"}}.

    prompts_and_truths: Examples (prompt, answer = the true continuation; load_muse_verbmem gives them) or
    (prompt, truth) pairs of strings. Each prompt (with the tokenizer's BOS) is continued greedily for up to
    max_new_tokens tokens (stopping at EOS); truncate_truth cuts the truth as MUSE does (see the module
    docstring). An example whose prompt alone fills max_length tokens is dropped (nan, left out of the means,
    counted in "dropped")."""
    _check_positive_int("max_new_tokens", max_new_tokens)
    examples = _pairs(prompts_and_truths)
    truths = [_truncate(tokenizer, ex.answer, max_new_tokens) if truncate_truth else ex.answer for ex in examples]
    generated = _generate(model, tokenizer, examples, max_new_tokens, batch_size, max_length, progress,
                          "VerbMem")
    return _scored("verbmem", generated, truths, examples, tokenizer, max_length)


def knowmem(model, tokenizer, qa_examples, icl_examples=None, max_new_tokens: int = 32, batch_size: int = 16,
            max_length: int = 2048, progress: bool = False) -> dict:
    """MUSE's KnowMem: {"knowmem" (the mean ROUGE-L F1), "rougeL_f1", "rougeL_recall" (means), "n", "dropped",
    "per_example": {"rougeL_f1", "rougeL_recall", "generated", "truth"}}.

    qa_examples: Examples (prompt = question, answer; load_muse_knowmem gives them). icl_examples: the few-shot
    pairs put before every question (MUSE uses the split's _icl file: forget_qa_icl for forget_qa,
    retain_qa_icl for retain_qa); None: no context. Answers are greedy, up to max_new_tokens tokens, cut at
    KNOWMEM_STOPS. KnowMem on retain_qa is MUSE's utility measure (knowmem_r)."""
    _check_positive_int("max_new_tokens", max_new_tokens)
    questions = checked_examples(qa_examples, "knowmem", "no questions to ask")
    icl = _icl(icl_examples)
    examples = [Example(prompt=_prompt(ex.prompt, icl), answer=ex.answer, id=ex.id, task=ex.task)
                for ex in questions]
    generated = _generate(model, tokenizer, examples, max_new_tokens, batch_size, max_length, progress,
                          "KnowMem")
    generated = [cut_at_stops(g) for g in generated]
    return _scored("knowmem", generated, [ex.answer for ex in questions], examples, tokenizer, max_length)


def privleak(auc_unlearned, auc_retrained) -> float:
    """(AUC_unlearned - AUC_retrained) / AUC_retrained * 100: MUSE's PrivLeak, in percent (negative: the
    forget set is still told apart from holdout data as training data; 0: as a retrained model)."""
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retrained", auc_retrained)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if auc_retrained == 0:
        raise ValueError("auc_retrained is 0: PrivLeak divides by it")
    return (float(auc_unlearned) - float(auc_retrained)) / float(auc_retrained) * 100.0


def muse_auc(model, tokenizer, forget_texts, holdout_texts, k: float = 0.4, batch_size: int = 4,
             max_length: int = 2048, progress: bool = False) -> dict:
    """MUSE's privleak AUC of one model: {"auc", "forget_scores", "holdout_scores", "skipped"}. Each text is
    scored by membership_inference's min_k attack (the mean of its lowest k fraction of token log-probs,
    each token given the BOS and the text before it) and the AUC is P(holdout score > forget score), ties 1/2
    (the holdout set as the positive class, as MUSE takes it; see the module docstring)."""
    forget = _texts(forget_texts, "forget_texts")
    holdout = _texts(holdout_texts, "holdout_texts")
    scores = {}
    for name, texts in (("forget", forget), ("holdout", holdout)):
        examples = [Example(prompt="", answer=t) for t in texts]
        scores[name] = mia_scores(model, tokenizer, examples, attacks="min_k", k=k, batch_size=batch_size,
                                  max_length=max_length, progress=progress)["min_k"]
    skipped = sum(math.isnan(s) for s in scores["forget"] + scores["holdout"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the count of skipped scores is returned instead
        value = mia_auc(scores["holdout"], scores["forget"])
    return {"auc": value, "forget_scores": scores["forget"], "holdout_scores": scores["holdout"],
            "skipped": skipped}


def privleak_report(model, tokenizer, forget_texts, holdout_texts, reference_model=None, k: float = 0.4,
                    auc_retrained=None, reference_tokenizer=None, batch_size: int = 4, max_length: int = 2048,
                    progress: bool = False) -> dict:
    """MUSE's PrivLeak of `model`: {"privleak", "auc_unlearned", "auc_retrained", "auc_retrained_source",
    "note", "k", "n_forget", "n_holdout", "skipped"}.

    forget_texts / holdout_texts: MUSE's privleak forget and holdout splits (load_muse_texts). The retrained
    AUC comes from, in this order: reference_model, a model retrained without the forget set, scored the same
    way (with reference_tokenizer, default tokenizer): source "reference_model"; else auc_retrained, a number
    you give (e.g. MUSE_RETRAINED_AUC["news"] for MUSE's own models): source "given"; else 0.5, the AUC of an
    ideal retrained model to which forget and holdout texts look alike: source "assumed_0.5", and the note
    says so. Texts longer than max_length tokens are cut at the end (tokenize_examples warns)."""
    if reference_model is not None and auc_retrained is not None:
        raise ValueError("give reference_model or auc_retrained, not both")
    forget = _texts(forget_texts, "forget_texts")
    holdout = _texts(holdout_texts, "holdout_texts")
    kwargs = dict(k=k, batch_size=batch_size, max_length=max_length, progress=progress)
    unlearned = muse_auc(model, tokenizer, forget, holdout, **kwargs)
    skipped = unlearned["skipped"]
    if reference_model is not None:
        retrained = muse_auc(reference_model, reference_tokenizer if reference_tokenizer is not None else tokenizer,
                             forget, holdout, **kwargs)
        auc_ref, source = retrained["auc"], "reference_model"
        note = "AUC_retrained measured on the given reference (retrained) model"
        skipped += retrained["skipped"]
    elif auc_retrained is not None:
        auc_ref, source = auc_retrained, "given"
        note = f"AUC_retrained given as {auc_retrained!r} (not measured here)"
    else:
        auc_ref, source = 0.5, "assumed_0.5"
        note = ("no retrained model given: AUC_retrained = 0.5 assumed, the AUC of an ideal retrained model to "
                "which forget and holdout texts look alike (MUSE's own retrained models measure 0.4772 on News "
                "and 0.5393 on Books)")
    return {"privleak": privleak(unlearned["auc"], auc_ref), "auc_unlearned": unlearned["auc"],
            "auc_retrained": float(auc_ref), "auc_retrained_source": source, "note": note, "k": k,
            "n_forget": len(forget), "n_holdout": len(holdout), "skipped": skipped}


# ------------------------------------------------------------------------------------------------ helpers
def _check_positive_int(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _pairs(items) -> list[Example]:
    if isinstance(items, (str, Example)):
        raise TypeError("prompts_and_truths must be a list of Examples or (prompt, truth) pairs, not one item")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item):
            out.append(Example(prompt=item[0], answer=item[1]))
        else:
            raise TypeError(f"prompts_and_truths[{i}] must be an Example or a (prompt, truth) pair of strings, "
                            f"got {type(item).__name__}")
    if not out:
        raise ValueError("no prompts to continue")
    return out


def _icl(icl_examples) -> list[Example]:
    if icl_examples is None:
        return []
    return checked_examples(icl_examples, "knowmem (icl_examples)", "icl_examples is empty; pass None for none")


def _texts(texts, name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty string, got {t!r:.40}")
    return texts


def _truncate(tokenizer, text: str, n: int) -> str:
    """MUSE's cut of the true continuation: its first n tokens with special tokens, decoded without them. (MUSE
    also asks for clean_up_tokenization_spaces, which only moves spaces next to punctuation: ROUGE's tokens
    are the same either way, and recent transformers ignore it for BPE tokenizers.)"""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:n]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _generate(model, tokenizer, examples, max_new_tokens, batch_size, max_length, progress, desc) -> list[str]:
    return generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            max_length=max_length, progress=progress, desc=desc)


def _kept(examples, tokenizer, max_length) -> set[int]:
    """Indices of the examples generate_answers did not drop (those whose prompt fits in max_length)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate_answers has warned already
        return {f["example_index"] for f in tokenize_examples(examples, tokenizer, max_length=max_length)}


def _scored(name, generated, truths, examples, tokenizer, max_length) -> dict:
    kept = _kept(examples, tokenizer, max_length)
    f1, recall = [], []
    for i, (g, t) in enumerate(zip(generated, truths)):
        f, r = rouge_l(g, t) if i in kept else (math.nan, math.nan)
        f1.append(f)
        recall.append(r)
    mean_f1 = nanmean(f1)
    return {name: mean_f1, "rougeL_f1": mean_f1, "rougeL_recall": nanmean(recall), "n": len(kept),
            "dropped": len(examples) - len(kept),
            "per_example": {"rougeL_f1": f1, "rougeL_recall": recall, "generated": generated, "truth": truths}}


def muse_measures(model, tokenizer, parts: dict, reference_model=None, auc_retrained=None,
                  progress: bool = False) -> dict:
    """MUSE's four measures from load_muse's parts, each when its parts are there: "verbmem_f" (verbmem_forget),
    "knowmem_f" / "knowmem_r" (knowmem_{forget,retain}_qa with their _icl few-shot files) and "privleak"
    (privleak_forget against privleak_holdout; privleak_report's reference rules). ValueError when none is."""
    out = {}
    if parts.get("verbmem_forget"):
        out["verbmem_f"] = verbmem(model, tokenizer, parts["verbmem_forget"], progress=progress)["verbmem"]
    for side, short in (("forget", "f"), ("retain", "r")):
        qa = parts.get(f"knowmem_{side}_qa")
        if qa:
            out[f"knowmem_{short}"] = knowmem(model, tokenizer, qa, icl_examples=parts.get(f"knowmem_{side}_qa_icl"),
                                              progress=progress)["knowmem"]
    if parts.get("privleak_forget") and parts.get("privleak_holdout"):
        report = privleak_report(model, tokenizer, parts["privleak_forget"], parts["privleak_holdout"],
                                 reference_model=reference_model, auc_retrained=auc_retrained, progress=progress)
        out["privleak"], out["privleak_note"] = report["privleak"], report["note"]
    if not out:
        raise ValueError("muse_measures: none of MUSE's parts (verbmem_forget, knowmem_forget_qa, knowmem_retain_qa, "
                         f"privleak_forget + privleak_holdout) in the given dict (keys: {sorted(parts)})")
    return out
