"""lm-evaluation-harness through simu_fast.eval.lm_eval_scores: a local multiple-choice task file read through
include_path, scored on the model in memory (skipped when the optional extra is not installed), and the clear
ImportError when it is not."""
import importlib.util
import json

import pytest

from simu_fast.eval.lm_eval import lm_eval_scores

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.mark.skipif(HAVE_LM_EVAL, reason="lm-eval is installed: the error path cannot be reached")
def test_without_lm_eval_the_error_says_how_to_install(memorized):
    model, tok, _ = memorized
    with pytest.raises(ImportError, match=r"pip install 'simu_fast\[lm-eval\]'"):
        lm_eval_scores(model, tok, "anything")


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval (the optional extra) is not installed")
def test_a_local_multiple_choice_task_scores_the_memorized_people_above_chance(memorized, tmp_path):
    model, tok, data = memorized
    rows = []
    answers = sorted({ex.answer for ex in data["retain"]})
    for ex in data["retain"][:12]:
        wrong = [a for a in answers if a != ex.answer][:3]
        rows.append({"question": ex.prompt, "choices": [ex.answer, *wrong], "answer": 0})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_people.yaml").write_text(
        "task: tiny_people\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'rows.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    scores = lm_eval_scores(model, tok, ["tiny_people"], batch_size=4, include_path=str(tmp_path))
    assert scores["tiny_people"]["acc,none"] > 0.5  # 4 choices: chance is 0.25; the model memorized these people
