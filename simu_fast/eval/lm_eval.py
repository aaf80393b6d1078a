"""Utility on standard tasks through lm-evaluation-harness (the optional extra: `pip install simu_fast[lm-eval]`).

The model in memory is handed to lm-eval's Python API (its interface docs, "External library usage": an HFLM
wrapping an instantiated transformers model, then `simple_evaluate`), so an unlearned model is scored without
saving it; local task YAML files are read through a TaskManager's include_path. Nothing here reimplements a
task: lm-eval's own prompts, metrics and few-shot settings apply.
"""
from __future__ import annotations

import numbers


def lm_eval_scores(model, tokenizer, tasks, batch_size: int = 16, include_path: str | None = None,
                   limit: int | float | None = None, num_fewshot: int | None = None) -> dict:
    """{task: {metric: value}} from lm-eval's results for `tasks` (names, or a comma-separated string). Only the
    numbers of each task's results are kept (lm-eval names them "acc,none", "acc_stderr,none", ...).
    ImportError with the install command when lm-eval is not installed."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'simu_fast[lm-eval]' "
                          "(or pip install lm-eval)") from e
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("lm_eval_scores: no task names given")
    was_training = model.training
    try:
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=include_path),
                                      limit=limit, num_fewshot=num_fewshot)
    finally:
        model.train(was_training)
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Number)}
            for task, metrics in out["results"].items()}
