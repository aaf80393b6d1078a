"""Membership-inference attacks on the answers, their AUC and the privacy score built on it.

Each attack scores an example from its answer tokens under teacher forcing (the tokens answer_token_logprobs
scores): the higher the score, the more the attack believes the example was trained on. The first four read only
the answer tokens' log-probabilities, min_k_plus_plus the whole next-token distribution, gradnorm a gradient.
- loss: the mean answer-token log-probability (the negative mean NLL; Yeom et al. 2018).
- zlib: the total answer log-probability over the zlib-compressed length in bytes of the answer text
  (Carlini et al. 2021: low NLL for a hard-to-compress text is a sign of memorization).
- min_k: the mean of the lowest k fraction of the token log-probabilities, at least one token (Min-K% Prob,
  Shi et al. 2024: a member has few very unlikely tokens).
- reference: the mean log-probability under the model minus that under a reference model (Carlini et al.
  2021/2022: calibrates away how easy the text is in general).
- min_k_plus_plus: Min-K%++ (Zhang et al. 2024, arXiv 2404.02936): each answer token's log-probability
  standardized by the model's own next-token distribution at that position, z_t = (log p(x_t) - mu_t) / sigma_t
  with mu_t = E_{z~p}[log p(z)] and sigma_t^2 = Var_{z~p}[log p(z)] over the whole vocabulary; the score is the
  mean of the lowest k fraction of z_t, at least one token (a member sits near a local maximum of the
  likelihood: its tokens are likely relative to the alternatives, not just in absolute terms). As
  open-unlearning computes it (src/evals/metrics/mia/min_k_plus_plus.py): the variance is clamped at 1e-6
  before the square root (a one-hot distribution would give 0/0) and k is the fraction min_k uses.
- gradnorm: minus the mean over the model's parameter tensors of the p-norm (p=2 by default; 1 and inf also) of
  the gradient of the example's mean answer NLL (arXiv 2402.17012; open-unlearning's
  src/evals/metrics/mia/gradnorm.py, p=2 in its configs): a member sits near a minimum of its loss, so its
  gradient is small. The mean is of per-tensor norms, not the norm of the whole gradient, as open-unlearning
  takes it. One forward and backward per example; every floating-point parameter counts, also one that is
  frozen now (as in open-unlearning's evaluation, where the loaded model's parameters all require grad).
  The requires_grad flags, the .grad buffers and the train/eval mode are left as they were (open-unlearning
  runs the pass in train mode and zeros .grad; here it is eval mode, so dropout cannot make it random).
Both compute their statistics in float32 from bf16 logits and gradients. Unlike open-unlearning, which leaves out
the last answer token (the EOS), every attack here scores the answer tokens of answer_token_logprobs, EOS included.
An example dropped by tokenization (no answer token fits max_length) scores nan.

After unlearning, a good model leaves forget examples indistinguishable from examples it never saw: AUC 0.5.
privacy_score turns the AUC into 1 - 2|AUC - 0.5| (1 at chance, 0 when the attack separates perfectly either
way; an AUC far below 0.5 also leaks membership), the privacy term of the LUME benchmark's score.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import zlib

import torch

from ..data.collate import collate
from ..data.example import checked_examples
from ..data.tokenization import ensure_pad_token, tokenize_examples
from ..lm import answer_logprobs, answer_positions, logits_of, model_device
from .answer_likelihood import answer_token_logprobs, map_answer_logits
from .batching import in_eval_mode, progress_bar

LIKELIHOOD_ATTACKS = ("loss", "zlib", "min_k", "reference")  # from the answer tokens' log-probabilities alone
ATTACKS = LIKELIHOOD_ATTACKS + ("min_k_plus_plus", "gradnorm")
DEFAULT_ATTACKS = ("loss", "zlib", "min_k")  # plus reference with a ref_model; the two others cost more passes
GRADNORM_P = (1, 2, math.inf)


def mia_scores(model, tokenizer, examples, attacks=None, ref_model=None, k: float = 0.2, batch_size: int = 16,
               max_length: int = 512, chat_template: bool = False, ref_tokenizer=None,
               progress: bool = False, gradnorm_p: float = 2) -> dict[str, list[float]]:
    """{attack: one score per example} (nan for a dropped example). attacks None: loss, zlib, min_k, and
    reference when ref_model is given (min_k_plus_plus and gradnorm only when named). ref_tokenizer defaults to
    tokenizer; gradnorm_p is the norm gradnorm takes (1, 2 or math.inf)."""
    examples = checked_examples(examples, "mia_scores", "no examples to score")
    attacks = _check_attacks(attacks, ref_model)
    _check_k(k)
    if "gradnorm" in attacks:
        _check_p(gradnorm_p)
    out = {}
    if set(attacks) & set(LIKELIHOOD_ATTACKS):
        out.update(_likelihood_scores(model, tokenizer, examples, attacks, ref_model, ref_tokenizer, k, batch_size,
                                      max_length, chat_template, progress))
    if "min_k_plus_plus" in attacks:
        out["min_k_plus_plus"] = min_k_plus_plus_scores(model, tokenizer, examples, k, batch_size, max_length,
                                                        chat_template, progress)
    if "gradnorm" in attacks:
        out["gradnorm"] = gradnorm_scores(model, tokenizer, examples, gradnorm_p, max_length, chat_template, progress)
    return {name: out[name] for name in attacks}


def _likelihood_scores(model, tokenizer, examples, attacks, ref_model, ref_tokenizer, k, batch_size, max_length,
                       chat_template, progress) -> dict:
    """The attacks of LIKELIHOOD_ATTACKS named in attacks, from one answer_token_logprobs pass (two with reference)."""
    logprobs = answer_token_logprobs(model, tokenizer, examples, batch_size, max_length, chat_template, progress,
                                     desc="MIA")
    out = {}
    if "loss" in attacks or "reference" in attacks:
        loss = [_mean(lp) for lp in logprobs]
    if "loss" in attacks:
        out["loss"] = loss
    if "zlib" in attacks:
        out["zlib"] = [_zlib(lp, ex.answer) for lp, ex in zip(logprobs, examples)]
    if "min_k" in attacks:
        out["min_k"] = [_min_k(lp, k) for lp in logprobs]
    if "reference" in attacks:
        ref_lp = answer_token_logprobs(ref_model, ref_tokenizer if ref_tokenizer is not None else tokenizer,
                                       examples, batch_size, max_length, chat_template, progress, desc="MIA reference")
        out["reference"] = [t - _mean(r) for t, r in zip(loss, ref_lp)]
    return out


def min_k_plus_plus_scores(model, tokenizer, examples, k: float = 0.2, batch_size: int = 16, max_length: int = 512,
                           chat_template: bool = False, progress: bool = False) -> list[float]:
    """The min_k_plus_plus score of each example (see the module docstring; nan for a dropped example)."""
    examples = checked_examples(examples, "min_k_plus_plus_scores", "no examples to score")
    _check_k(k)
    z = map_answer_logits(model, tokenizer, examples, _standardized_logprobs, batch_size, max_length, chat_template,
                          progress, desc="MIA min-k%++")
    return [_min_k(t, k) for t in z]


def gradnorm_scores(model, tokenizer, examples, p: float = 2, max_length: int = 512, chat_template: bool = False,
                    progress: bool = False) -> list[float]:
    """The gradnorm score of each example (see the module docstring; nan for a dropped example)."""
    _check_p(p)
    examples = checked_examples(examples, "gradnorm_scores", "no examples to score")
    pad = ensure_pad_token(tokenizer)
    features = tokenize_examples(examples, tokenizer, max_length=max_length, chat_template=chat_template)
    params = [q for q in model.parameters() if q.is_floating_point()]
    out = [math.nan] * len(examples)
    device = model_device(model)
    with in_eval_mode(model), _requiring_grad(params), torch.enable_grad(), \
            progress_bar(len(features), progress, "MIA gradnorm") as bar:
        for feature in features:  # one example per pass: a batch's backward gives only the sum of the gradients
            batch = {key: v.to(device) for key, v in collate([feature], pad).items()}
            out[feature["example_index"]] = -_mean_grad_norm(model, batch, params, p)
            bar.update(1)
    return out


def _mean_grad_norm(model, batch, params, p) -> float:
    """The mean over params of the p-norm of d(mean answer NLL of the one-row batch)/d(param), in float32."""
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    nll = -answer_logprobs(logits, batch["labels"])[answer_positions(batch["labels"])].mean()
    # autograd.grad, not backward: the caller's .grad buffers (an accumulation in progress) stay untouched
    grads = torch.autograd.grad(nll, params, allow_unused=True)
    norms = [g.float().norm(p) for g in grads if g is not None]  # float32: a bf16 norm loses digits
    if not norms:
        raise ValueError("gradnorm: the answer loss depends on no floating-point parameter of the model")
    return float(torch.stack(norms).mean())


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of telling members from non-members by score (higher = member): the Mann-Whitney U statistic
    over n_members * n_nonmembers, i.e. P(member score > non-member score) with ties counted 1/2. nan/None
    scores (dropped examples) are skipped with a warning that counts them."""
    members, skipped_m = _kept(member_scores, "member_scores")
    nonmembers, skipped_n = _kept(nonmember_scores, "nonmember_scores")
    if skipped_m or skipped_n:
        warnings.warn(f"auc: skipped {skipped_m} member and {skipped_n} non-member scores that are nan/None "
                      "(dropped examples)", stacklevel=2)
    return _auc(members, nonmembers)


def privacy_score(auc_value) -> float:
    """1 - 2|AUC - 0.5|: 1 when the attack is at chance, 0 when it separates members perfectly (either way)."""
    if isinstance(auc_value, bool) or not isinstance(auc_value, numbers.Real) or not 0.0 <= auc_value <= 1.0:
        raise ValueError(f"auc must be a number in [0, 1], got {auc_value!r}")
    return 1.0 - 2.0 * abs(float(auc_value) - 0.5)


def mia_report(model, tokenizer, members, nonmembers, attacks=None, ref_model=None, k: float = 0.2,
               batch_size: int = 16, max_length: int = 512, chat_template: bool = False, ref_tokenizer=None,
               progress: bool = False, gradnorm_p: float = 2) -> dict:
    """{attack: {"auc", "privacy", "n_members", "n_nonmembers", "skipped"}}: each attack's AUC of members
    (e.g. the forget set) against non-members (a held-out set of the same kind), its privacy score, how many
    examples of each side were scored and how many were skipped as dropped (nan)."""
    members, nonmembers = list(members), list(nonmembers)
    if not members or not nonmembers:
        raise ValueError(f"mia_report needs members and non-members; got {len(members)} and {len(nonmembers)}")
    kwargs = dict(attacks=attacks, ref_model=ref_model, k=k, batch_size=batch_size, max_length=max_length,
                  chat_template=chat_template, ref_tokenizer=ref_tokenizer, progress=progress, gradnorm_p=gradnorm_p)
    scores_m = mia_scores(model, tokenizer, members, **kwargs)
    scores_n = mia_scores(model, tokenizer, nonmembers, **kwargs)
    report = {}
    for name in scores_m:
        kept_m, skipped_m = _kept(scores_m[name], "member scores")
        kept_n, skipped_n = _kept(scores_n[name], "non-member scores")
        value = _auc(kept_m, kept_n)
        report[name] = {"auc": value, "privacy": privacy_score(value), "n_members": len(kept_m),
                        "n_nonmembers": len(kept_n), "skipped": skipped_m + skipped_n}
    return report


def _check_attacks(attacks, ref_model) -> tuple:
    if attacks is None:
        return DEFAULT_ATTACKS + ("reference",) if ref_model is not None else DEFAULT_ATTACKS
    if isinstance(attacks, str):
        attacks = (attacks,)
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError(f"attacks is empty; choose from {ATTACKS}")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    if "reference" in attacks and ref_model is None:
        raise ValueError("the 'reference' attack needs ref_model (a model not trained on the members, e.g. the "
                         "base model before fine-tuning)")
    return tuple(dict.fromkeys(attacks))


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0.0 < k <= 1.0:
        raise ValueError(f"k (the fraction of lowest-probability tokens min_k averages) must be in (0, 1], got {k!r}")


def _check_p(p) -> None:
    if isinstance(p, bool) or p not in GRADNORM_P:
        raise ValueError(f"gradnorm_p (the norm of the gradient gradnorm takes) must be one of {GRADNORM_P}, "
                         f"got {p!r}")


@contextlib.contextmanager
def _requiring_grad(params):
    """Every parameter in params requires grad for the block, then each gets its own flag back (also on error)."""
    flags = [q.requires_grad for q in params]
    try:
        for q in params:
            q.requires_grad_(True)
        yield
    finally:
        for q, flag in zip(params, flags):
            q.requires_grad_(flag)


def _standardized_logprobs(logits, targets):
    """Min-K%++'s z_t = (log p(x_t) - mu_t) / sigma_t per answer position, in float32 on the CPU."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # p * log p is 0 where p underflows to 0 (log p = -inf would make it nan)
    mu = torch.where(p > 0, p * logp, 0.0).sum(-1)
    # E[(log p - mu)^2], not E[(log p)^2] - mu^2: the same maths without float32 cancellation
    var = torch.where(p > 0, p * (logp - mu[:, None]).square(), 0.0).sum(-1)
    target = logp.gather(-1, targets[:, None]).squeeze(-1)
    return ((target - mu) / var.clamp(min=1e-6).sqrt()).cpu()


def _mean(lp) -> float:
    return math.nan if lp is None or lp.numel() == 0 else float(lp.double().mean())


def _zlib(lp, text: str) -> float:
    if lp is None or lp.numel() == 0:
        return math.nan
    return float(lp.double().sum()) / len(zlib.compress(text.encode("utf-8")))


def _min_k(lp, k: float) -> float:
    if lp is None or lp.numel() == 0:
        return math.nan
    n = max(1, int(lp.numel() * k + 1e-9))  # the 1e-9 keeps 0.3 * 10 from flooring to 2
    return float(lp.double().sort().values[:n].mean())


def _kept(scores, name: str) -> tuple[list[float], int]:
    if isinstance(scores, (str, bytes)) or not hasattr(scores, "__iter__"):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(scores).__name__}")
    kept, skipped = [], 0
    for i, s in enumerate(scores):
        if s is None:
            skipped += 1
            continue
        try:
            s = float(s)
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{i}] must be a number, got {type(s).__name__}") from None
        if math.isnan(s):
            skipped += 1
        else:
            kept.append(s)
    return kept, skipped


def _auc(members: list[float], nonmembers: list[float]) -> float:
    if not members or not nonmembers:
        raise ValueError(f"auc needs at least one member and one non-member score (after skipping nan/None); "
                         f"got {len(members)} and {len(nonmembers)}")
    pooled = sorted([(s, True) for s in members] + [(s, False) for s in nonmembers], key=lambda p: p[0])
    rank_sum, i = 0.0, 0
    while i < len(pooled):  # ranks 1..N, ties share their average rank
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2.0
        rank_sum += average_rank * sum(1 for _, is_member in pooled[i:j] if is_member)
        i = j
    n_m, n_n = len(members), len(nonmembers)
    u = rank_sum - n_m * (n_m + 1) / 2.0
    return u / (n_m * n_n)
