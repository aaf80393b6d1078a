"""Evaluation: answer metrics (ROUGE-L recall, exact match, answer probability, NLL), the ROUGE-L stopping
rule, and (in their own modules) truth ratio, membership inference, relearning attacks, utility, reports."""
from .answer_likelihood import answer_probability, answer_token_logprobs, mean_nll
from .answer_metrics import answer_metrics
from .generation import generate_answers
from .stopping import rouge_eval_fn, stop_at_forget_rouge
from .text_scores import exact_match, normalize_answer, rouge_l_recall
from .truth_ratio import forget_quality, truth_ratio_score, truth_ratios
from .membership_inference import auc, gradnorm_scores, mia_report, mia_scores, min_k_plus_plus_scores, privacy_score
from .memorization import exact_memorization, extraction_strength, memorization_scores
from .quantization import quantization_attack, quantize_rtn, quantized_copy
from .model_utility import model_utility
from .utility import multiple_choice_accuracy, perplexity
from .relearning import relearning_attack, split_forget
from .report import format_markdown, report
from .muse import MUSE_RETRAINED_AUC, knowmem, knowmem_prompt, muse_auc, privleak, privleak_report, verbmem

__all__ = ["rouge_l_recall", "exact_match", "normalize_answer", "answer_token_logprobs", "mean_nll",
           "answer_probability", "generate_answers", "answer_metrics", "rouge_eval_fn", "stop_at_forget_rouge",
           "truth_ratios", "truth_ratio_score", "forget_quality", "mia_scores", "auc", "privacy_score", "mia_report",
           "perplexity", "multiple_choice_accuracy",
           "relearning_attack", "split_forget", "report", "format_markdown", "verbmem", "knowmem", "knowmem_prompt",
           "privleak", "privleak_report", "muse_auc", "MUSE_RETRAINED_AUC", "min_k_plus_plus_scores", "gradnorm_scores",
           "exact_memorization", "extraction_strength", "memorization_scores", "quantize_rtn", "quantized_copy",
           "quantization_attack",
           "model_utility"]
