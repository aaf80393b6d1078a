"""MUSE's VerbMem, KnowMem and PrivLeak: PrivLeak and the prompt / stop-string rules on hand-computed cases;
VerbMem, KnowMem and the Min-40% AUC on tiny Llamas against an independent computation (model.generate and
rouge_score called directly, token log-probabilities from one forward pass per text)."""
import math

import pytest
import torch

from simu_fast.data import Example
from simu_fast.eval.muse import (MUSE_RETRAINED_AUC, cut_at_stops, knowmem, knowmem_prompt, muse_auc, privleak,
                                 privleak_report, rouge_l, verbmem)
from tiny_models import tiny_llama

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


# ------------------------------------------------------------------------------------------- hand-computed
def test_privleak_hand_computed():
    assert privleak(0.25, 0.5) == -50.0
    assert privleak(0.0, 0.5) == -100.0  # the target model: forget texts always look more member-like
    assert privleak(0.75, 0.5) == 50.0  # over-unlearned
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.6, 0.4772) == pytest.approx(25.7334451, abs=1e-6)  # 0.1228 / 0.4772 * 100
    assert privleak(0.4772, MUSE_RETRAINED_AUC["news"]) == 0.0


@pytest.mark.parametrize("unlearned, retrained", [(1.2, 0.5), (-0.1, 0.5), (0.5, 0.0), (0.5, "0.5"), (True, 0.5)])
def test_privleak_rejects_bad_aucs(unlearned, retrained):
    with pytest.raises(ValueError):
        privleak(unlearned, retrained)


def test_knowmem_prompt_as_muse_builds_it():
    icl = [Example("Who won?", "The Lions"), Example("Where?", "Cardiff")]
    assert knowmem_prompt("When was it?", icl) == ("Question: Who won?\nAnswer: The Lions\n\n"
                                                   "Question: Where?\nAnswer: Cardiff\n\n"
                                                   "Question: When was it?\nAnswer: ")
    assert knowmem_prompt("When was it?") == "Question: When was it?\nAnswer: "


def test_cut_at_stops():
    assert cut_at_stops("In 2023\n\nQuestion: next") == "In 2023"
    assert cut_at_stops("In 2023\nQuestion: next") == "In 2023"
    assert cut_at_stops("In 2023 Question: next\n\nmore") == "In 2023 "
    assert cut_at_stops("one\ntwo") == "one\ntwo"


def test_rouge_l_is_f1_and_recall_without_stemming():
    # reference 4 tokens, prediction 2 tokens, LCS 2: recall 1/2, precision 1, F1 2/3
    assert rouge_l("budget rise", "the budget would rise") == pytest.approx((2 / 3, 0.5))
    # no stemmer: "rises" is not "rise" (TOFU's stemmed ROUGE would count it)
    assert rouge_l("rises", "rise") == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- independent
def greedy(model, tok, prompt, max_new_tokens):
    """MUSE's generation, one prompt at a time: BOS + prompt, greedy, decoded without special tokens."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def rouge(prediction, reference):
    score = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"]
    return score.fmeasure, score.recall


def test_verbmem_against_generate_and_rouge_score(memorized):
    model, tok, data = memorized
    n = 6  # fewer tokens than most answers: the truth is cut too
    pairs = [(ex.prompt, " " + ex.answer) for ex in data["forget"] + data["holdout"]]
    result = verbmem(model, tok, pairs, max_new_tokens=n, batch_size=4)
    f1, recall = [], []
    for prompt, truth in pairs:
        short = tok.decode(tok(truth).input_ids[:n], skip_special_tokens=True)  # BOS + first n - 1 tokens
        assert len(short) < len(truth.strip())
        f, r = rouge(greedy(model, tok, prompt, n), short)
        f1.append(f)
        recall.append(r)
    assert result["per_example"]["truth"] == [tok.decode(tok(t).input_ids[:n], skip_special_tokens=True)
                                              for _, t in pairs]
    assert result["per_example"]["rougeL_f1"] == pytest.approx(f1, abs=1e-12)
    assert result["per_example"]["rougeL_recall"] == pytest.approx(recall, abs=1e-12)
    assert result["verbmem"] == result["rougeL_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-12)
    assert result["rougeL_recall"] == pytest.approx(sum(recall) / len(recall), abs=1e-12)
    assert result["n"] == len(pairs) and result["dropped"] == 0
    forget_f1 = result["per_example"]["rougeL_f1"][:len(data["forget"])]
    assert sum(forget_f1) / len(forget_f1) > 0.5  # it memorized the forget set


def test_verbmem_full_truth_and_examples(memorized):
    model, tok, data = memorized
    examples = [Example(ex.prompt, " " + ex.answer) for ex in data["forget"][:4]]
    result = verbmem(model, tok, examples, max_new_tokens=24, truncate_truth=False, batch_size=2)
    expected = [rouge(greedy(model, tok, ex.prompt, 24), ex.answer)[0] for ex in examples]
    assert result["per_example"]["rougeL_f1"] == pytest.approx(expected, abs=1e-12)
    assert result["verbmem"] > 0.8  # the memorized answers come back whole


def test_knowmem_against_generate_and_rouge_score(memorized):
    model, tok, data = memorized
    icl = data["retain"][:2]
    questions = data["forget"] + data["holdout"][:2]
    result = knowmem(model, tok, questions, icl_examples=icl, max_new_tokens=12, batch_size=3)
    context = "".join(f"Question: {ex.prompt}\nAnswer: {ex.answer}\n\n" for ex in icl)
    expected_f1, expected_recall, answers = [], [], []
    for ex in questions:
        answer = greedy(model, tok, context + f"Question: {ex.prompt}\nAnswer: ", 12).strip()
        for stop in ("\n\n", "\nQuestion", "Question:"):
            answer = answer.split(stop)[0]
        answers.append(answer)
        f, r = rouge(answer, ex.answer)
        expected_f1.append(f)
        expected_recall.append(r)
    assert result["per_example"]["generated"] == answers
    assert result["per_example"]["rougeL_f1"] == pytest.approx(expected_f1, abs=1e-12)
    assert result["per_example"]["rougeL_recall"] == pytest.approx(expected_recall, abs=1e-12)
    assert result["knowmem"] == pytest.approx(sum(expected_f1) / len(expected_f1), abs=1e-12)
    assert result["rougeL_recall"] == pytest.approx(sum(expected_recall) / len(expected_recall), abs=1e-12)


@pytest.fixture(scope="module")
def knows_the_format():
    """(model, tokenizer, data): a tiny Llama trained on the forget and retain facts asked MUSE's way
    (knowmem_prompt(question) -> answer); the holdout people never seen."""
    from simu_fast.data import make_loader, synthetic_people, tokenize_examples
    from simu_fast.data.corpus_tokenizer import train_tokenizer
    from simu_fast.eval import answer_metrics
    from simu_fast.training.finetune import finetune

    data = synthetic_people(8, seed=2, forget_fraction=0.25, holdout_fraction=0.25)
    framed = [Example(knowmem_prompt(ex.prompt), ex.answer) for ex in data["forget"] + data["retain"]]
    tok = train_tokenizer([t for split in data.values() for ex in split for t in (knowmem_prompt(ex.prompt),
                                                                                  ex.answer)], vocab_size=400)
    model = tiny_llama(vocab_size=len(tok), seed=0, hidden_size=64, intermediate_size=128, num_key_value_heads=4,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    loader = make_loader(tokenize_examples(framed, tok, 64), 16, shuffle=True, seed=0, pad_token_id=tok.pad_token_id)
    finetune(model, loader, lr=3e-3, max_steps=300, warmup_steps=10, schedule="cosine",
             eval_fn=lambda m: {"p": answer_metrics(m, tok, framed, batch_size=64, generate=False)["answer_prob"]},
             eval_every=20, until=lambda m: m["p"] >= 0.95)
    return model.eval(), tok, data


def test_knowmem_tells_known_facts_from_unseen_ones(knows_the_format):
    model, tok, data = knows_the_format
    forget = knowmem(model, tok, data["forget"], max_new_tokens=24)
    holdout = knowmem(model, tok, data["holdout"], max_new_tokens=24)
    assert forget["n"] == len(data["forget"]) and forget["dropped"] == 0
    assert forget["knowmem"] > 0.8  # trained facts come back
    assert holdout["knowmem"] < forget["knowmem"] - 0.3  # unseen people's facts do not


def min_k_score(model, tok, text, k=0.4):
    """Mean of the lowest k fraction of log p(token | BOS + text before it), over the text's tokens and EOS."""
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    n = max(1, int(len(lp) * k + 1e-9))
    return float(lp.sort().values[:n].mean())


def pairwise_auc(positives, negatives):
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def test_privleak_report_against_independent_min_k_auc(memorized):
    model, tok, data = memorized
    forget = [f"{ex.prompt} {ex.answer}" for ex in data["forget"]]
    holdout = [f"{ex.prompt} {ex.answer}" for ex in data["holdout"]]
    expected_auc = pairwise_auc([min_k_score(model, tok, t) for t in holdout],
                                [min_k_score(model, tok, t) for t in forget])
    report = privleak_report(model, tok, forget, holdout, batch_size=3)
    assert report["auc_unlearned"] == pytest.approx(expected_auc, abs=1e-12)
    assert report["auc_unlearned"] < 0.2  # the forget set was trained on: it looks like training data
    assert report["privleak"] == pytest.approx((expected_auc - 0.5) / 0.5 * 100, abs=1e-9)
    assert report["privleak"] < -60  # under-unlearning reads negative, as in MUSE's tables
    assert report["auc_retrained"] == 0.5 and report["auc_retrained_source"] == "assumed_0.5"
    assert "no retrained model given" in report["note"] and "0.5" in report["note"]
    assert (report["k"], report["n_forget"], report["n_holdout"], report["skipped"]) == (0.4, 10, 5, 0)

    given = privleak_report(model, tok, forget, holdout, auc_retrained=MUSE_RETRAINED_AUC["news"])
    assert given["auc_retrained_source"] == "given"
    assert given["privleak"] == pytest.approx((expected_auc - 0.4772) / 0.4772 * 100, abs=1e-9)


def test_privleak_report_with_a_reference_model(memorized):
    model, tok, data = memorized
    forget = [f"{ex.prompt} {ex.answer}" for ex in data["forget"]]
    holdout = [f"{ex.prompt} {ex.answer}" for ex in data["holdout"]]
    reference = tiny_llama(vocab_size=len(tok), seed=5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id).eval()
    k = 0.2
    auc_model = pairwise_auc([min_k_score(model, tok, t, k) for t in holdout],
                             [min_k_score(model, tok, t, k) for t in forget])
    auc_ref = pairwise_auc([min_k_score(reference, tok, t, k) for t in holdout],
                           [min_k_score(reference, tok, t, k) for t in forget])
    assert 0 < auc_ref  # the division is defined
    report = privleak_report(model, tok, forget, holdout, reference_model=reference, k=k)
    assert report["auc_retrained_source"] == "reference_model"
    assert report["auc_retrained"] == pytest.approx(auc_ref, abs=1e-12)
    assert report["privleak"] == pytest.approx((auc_model - auc_ref) / auc_ref * 100, abs=1e-9)
    scores = muse_auc(reference, tok, forget, holdout, k=k)
    assert scores["auc"] == pytest.approx(auc_ref, abs=1e-12)
    assert scores["forget_scores"] == pytest.approx([min_k_score(reference, tok, t, k) for t in forget], abs=1e-5)


def test_bad_arguments(memorized):
    model, tok, data = memorized
    texts = ["a text", "another text"]
    with pytest.raises(ValueError, match="not both"):
        privleak_report(model, tok, texts, texts, reference_model=model, auc_retrained=0.5)
    with pytest.raises(TypeError, match="not one string"):
        privleak_report(model, tok, "one text", texts)
    with pytest.raises(ValueError, match=r"holdout_texts\[1\] must be a non-empty string"):
        privleak_report(model, tok, texts, ["ok", ""])
    with pytest.raises(ValueError, match="k "):
        muse_auc(model, tok, texts, texts, k=0)
    with pytest.raises(TypeError, match=r"prompts_and_truths\[1\]"):
        verbmem(model, tok, [("p", "t"), ("p", "t", "x")])
    with pytest.raises(ValueError, match="max_new_tokens"):
        verbmem(model, tok, [("p", "t")], max_new_tokens=0)
    with pytest.raises(TypeError, match="knowmem takes Example"):
        knowmem(model, tok, [("q", "a")])
    with pytest.raises(ValueError, match="icl_examples is empty"):
        knowmem(model, tok, data["forget"][:1], icl_examples=[])


def test_dropped_prompt_is_left_out_and_counted(memorized):
    model, tok, data = memorized
    long_prompt = " ".join(ex.prompt for ex in data["retain"])  # far over max_length=32 tokens
    pairs = [(data["forget"][0].prompt, " " + data["forget"][0].answer), (long_prompt, " x")]
    with pytest.warns(UserWarning, match="dropped"):
        result = verbmem(model, tok, pairs, max_new_tokens=4, max_length=32)
    assert (result["n"], result["dropped"]) == (1, 1)
    assert math.isnan(result["per_example"]["rougeL_f1"][1])
    assert result["verbmem"] == result["per_example"]["rougeL_f1"][0]
