"""evaluate_model: every measure of one model in one call (what `simu-fast eval` and `unlearn --eval` run).

Per split (forget, retain, holdout): ROUGE-L recall, exact match, answer probability, NLL, and the TOFU truth
ratio where the examples carry paraphrased/perturbed answers; with more than one task in a split, the same per
task. Membership inference of forget (members) against holdout (non-members). Forget quality against a
reference (retain-only) model's truth ratios. Utility: perplexity on general texts and multiple-choice
accuracy. Relearning attacks, each a dict of relearning_attack arguments. With the model before unlearning
(`original_model`): its own forget and retain answer scores (result["original"], the "before" of a report, so
that a run that changed nothing shows as such) and the erase-or-hide diagnostic (D+ positive influence
removed, D- negative influence added). Beside the split scores: token-level exact memorization and
extraction strength (memorization.py); on request, the quantization attack (quantization.py: forget after 8- and
4-bit rounding), TOFU's model utility (model_utility.py: with its real-authors and world-facts splits), MUSE's
VerbMem / KnowMem / PrivLeak (muse.py: with a load_muse dict) and lm-evaluation-harness tasks (lm_eval.py).

Every measure works on the model as it comes: frozen parameters (requires_grad=False, as IMU or a masked
recipe leaves them), eval or train mode, under torch.no_grad or torch.inference_mode; the parameters' flags and
the train/eval mode are as they were afterwards.
"""
from __future__ import annotations

from .answer_metrics import METRICS, answer_metrics, nanmean
from .erase_or_hide import erase_or_hide
from .membership_inference import mia_report
from .memorization import memorization_scores
from .relearning import relearning_attack
from .truth_ratio import FIELDS, forget_quality, truth_ratio_score, truth_ratios
from .utility import multiple_choice_accuracy, perplexity

SPLITS = ("forget", "retain", "holdout")


def evaluate_model(model, tokenizer, forget, retain=None, holdout=None, *, reference_model=None,
                   original_model=None, utility_texts=None, multiple_choice=None, relearning=(), benign_examples=None,
                   mia_attacks=None, quantization=None, tofu_utility=None, muse=None, lm_eval_tasks=None,
                   lm_eval_options=None,
                   batch_size: int = 16, max_length: int = 512, chat_template: bool = False,
                   progress: bool = False) -> dict:
    """{"forget": {...}, "retain": {...}, "holdout": {...}, "mia": {...}, "forget_quality": ...,
    "utility": {...}, "relearning": [...], "original": {"forget": {...}, "retain": {...}}, "erase_or_hide": {...},
    "quantization": {...}, "model_utility": {...}, "muse": {...}, "lm_eval": {...}}; keys only for what was given.
    "original" holds the original model's scores, the same metrics as the model's own "forget" / "retain"
    (retain only when retain examples were given).

    mia_attacks: the membership-inference attacks (membership_inference.ATTACKS; None: its defaults, and the
    reference attack with a reference_model). quantization: True or quantization_attack's options (bits,
    group_size, ...). tofu_utility: {"real_authors": [...], "world_facts": [...]} (and "retain", else the retain
    set): TOFU's model utility. muse: load_muse's dict (verbmem / knowmem / privleak parts). lm_eval_tasks:
    lm-evaluation-harness task names (the optional extra), lm_eval_options: lm_eval_scores's other arguments
    (include_path, limit, num_fewshot)."""
    splits = {"forget": _list(forget, "forget"), "retain": _list(retain, "retain"),
              "holdout": _list(holdout, "holdout")}
    if not splits["forget"]:
        raise ValueError("evaluate_model needs a non-empty forget set")
    common = dict(batch_size=batch_size, max_length=max_length, chat_template=chat_template)
    result: dict = {}
    ratios = {}
    for name, examples in splits.items():
        if not examples:
            continue
        result[name] = _split_metrics(model, tokenizer, examples, common, progress)
        if name != "holdout":
            for key, value in memorization_scores(model, tokenizer, examples, **common).items():
                result[name][key] = value["mean"]
        if all(all(ex.extra.get(f) for f in FIELDS) for ex in examples):
            ratios[name] = truth_ratios(model, tokenizer, examples, progress=progress, **common)
            result[name]["truth_ratio"] = truth_ratio_score(ratios[name], "forget" if name == "forget" else "retain")
    if splits["holdout"]:
        attacks = mia_attacks
        if attacks is not None and reference_model is not None and "reference" not in attacks:
            attacks = (*attacks, "reference")
        result["mia"] = mia_report(model, tokenizer, splits["forget"], splits["holdout"], attacks=attacks,
                                   ref_model=reference_model, batch_size=batch_size, max_length=max_length)
    if reference_model is not None and "forget" in ratios:
        reference = truth_ratios(reference_model, tokenizer, splits["forget"], **common)
        result["forget_quality"] = forget_quality(ratios["forget"], reference)
    utility = {}
    if utility_texts:
        utility["perplexity"] = perplexity(model, tokenizer, list(utility_texts), batch_size=batch_size,
                                           max_length=max_length)
    if multiple_choice:
        mc = multiple_choice_accuracy(model, tokenizer, multiple_choice, batch_size=batch_size, max_length=max_length)
        utility["mc_accuracy"], utility["mc_n"] = mc["accuracy"], mc["n"]
    if utility:
        result["utility"] = utility
    attacks = []
    for i, options in enumerate(relearning or ()):
        options = dict(options)
        if options.get("kind") == "benign" and "benign_examples" not in options:
            if not benign_examples:
                raise ValueError(f"relearning attack {i} is benign but no benign_examples were given")
            options["benign_examples"] = benign_examples
        attacks.append(relearning_attack(model, tokenizer, splits["forget"], max_length=max_length,
                                         progress=progress, **options))
    if attacks:
        result["relearning"] = attacks
    if quantization:
        from .quantization import quantization_attack
        options = {} if quantization is True else dict(quantization)
        result["quantization"] = quantization_attack(model, tokenizer, splits["forget"], progress=progress,
                                                     **common, **options)
    if tofu_utility is not None:
        from .model_utility import model_utility
        parts = dict(tofu_utility)
        parts.setdefault("retain", splits["retain"])
        result["model_utility"] = model_utility(model, tokenizer, parts, progress=progress, **common)
    if muse is not None:
        from .muse import muse_measures
        result["muse"] = muse_measures(model, tokenizer, muse, reference_model=reference_model, progress=progress)
    if lm_eval_tasks:
        from .lm_eval import lm_eval_scores
        result["lm_eval"] = lm_eval_scores(model, tokenizer, lm_eval_tasks, batch_size=batch_size,
                                           **(lm_eval_options or {}))
    if original_model is not None:
        result["original"] = {name: _split_metrics(original_model, tokenizer, splits[name], common, progress)
                              for name in ("forget", "retain") if splits[name]}
        result["erase_or_hide"] = erase_or_hide(original_model, model, tokenizer, splits["forget"],
                                                batch_size=batch_size, max_length=max_length)
    return result


def _split_metrics(model, tokenizer, examples, common, progress) -> dict:
    full = answer_metrics(model, tokenizer, examples, progress=progress, **common)
    out = {k: full[k] for k in ("n", *METRICS) if k in full}
    tasks = sorted({ex.task for ex in examples if ex.task is not None})
    if len(tasks) > 1:
        per = full["per_example"]
        out["by_task"] = {}
        for task in tasks:
            rows = [i for i, ex in enumerate(examples) if ex.task == task]
            out["by_task"][task] = {"n": len(rows), **{m: nanmean([per[m][i] for i in rows]) for m in METRICS}}
    return out


def _list(examples, name) -> list:
    if examples is None:
        return []
    examples = list(examples)
    if name != "forget" and not examples:
        raise ValueError(f"the {name} set is empty (give None to leave it out)")
    return examples
