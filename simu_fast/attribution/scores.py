"""NeuronScores: float32 [num_layers, F] attribution scores with their metadata, saved as safetensors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from ..io import write_atomic


@dataclass
class NeuronScores:
    scores: torch.Tensor  # float32 [num_layers, F]
    layers: list[int]
    metadata: dict = field(default_factory=dict)  # model, steps, rule, target, positions, method, examples

    def __post_init__(self):
        if self.scores.dim() != 2:
            raise ValueError(f"scores must be [num_layers, F], got shape {list(self.scores.shape)}")
        if len(self.layers) != self.scores.shape[0]:
            raise ValueError(f"{len(self.layers)} layer ids for {self.scores.shape[0]} score rows")

    @property
    def num_examples(self) -> int:
        return int(self.metadata.get("examples", 0))

    def save(self, path: str) -> None:
        """Write atomically: a temporary file in the same directory, then rename."""
        meta = {"layers": json.dumps(self.layers), "metadata": json.dumps(self.metadata)}
        tensors = {"scores": self.scores.detach().to("cpu", torch.float32).contiguous()}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str) -> "NeuronScores":
        if not os.path.exists(path):
            raise FileNotFoundError(f"no scores file at {path}")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "layers" not in meta:
            raise ValueError(f"{path} is not a NeuronScores file (no 'layers' metadata)")
        tensors = load_file(path)
        return cls(tensors["scores"], json.loads(meta["layers"]), json.loads(meta.get("metadata", "{}")))

    def __repr__(self) -> str:
        L, F = self.scores.shape
        return f"NeuronScores(layers={L}, F={F}, examples={self.num_examples}, {self.metadata.get('method', '')})"
