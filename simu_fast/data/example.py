"""Example: one prompt/answer pair, the unit every loader returns and every tokenizer call takes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    prompt: str
    answer: str
    id: str | None = None
    task: str | None = None
    extra: dict = field(default_factory=dict)  # every other field of the row (TOFU's paraphrased_answer, ...)

    def __post_init__(self):
        for name in ("prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Example.{name} must be a str, got {type(value).__name__}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"Example.extra must be a dict, got {type(self.extra).__name__}")
