"""The quantization attack (Zhang et al., "Catastrophic failure of LLM unlearning via quantization", ICLR 2025,
arXiv 2410.16454): quantize the unlearned model's weights to 8 and 4 bits and measure the forget set again.

Unlearning with a utility constraint moves the weights very little; when each move is smaller than half a
quantization step, the unlearned and the original weights round to the same grid point and the quantized
unlearned model answers like the original one: the knowledge was hidden, not erased. The paper found that
4-bit quantization brought back most of the forgotten knowledge (MUSE KnowMem / VerbMem); 8-bit much less.

What the paper's code (github.com/zzwjames/FailureLLMUnlearning, utils.py load_model) does: it loads the model
with transformers' bitsandbytes integration, `BitsAndBytesConfig(load_in_4bit=True)` (bf16 model; bnb's
defaults: FP4 codes, one absmax scale per block of 64 consecutive weights) or `BitsAndBytesConfig(
load_in_8bit=True)` (LLM.int8: int8 weights with one absmax scale per output row, int8 activations with the
outlier columns above 6.0 kept in 16 bits); the paper also reports GPTQ and AWQ (calibrated, 4-bit, groups of
128 input columns). Those need a CUDA GPU (and calibration data for GPTQ/AWQ). The stand-in here is
round-to-nearest (RTN), device-free and exact to reproduce: symmetric, one scale per output channel (or per
group of input columns), the weights replaced by their de-quantized values and everything else computed as
before. Where it differs: at 8 bits the weight grid is the one LLM.int8 stores (per-row absmax / 127), but
activations stay in full precision; at 4 bits the grid is uniform (16 levels, 15 used) where bnb's FP4 grid
is not, and the scale is per row unless group_size is given (group_size=64 matches bnb's 4-bit blocks for a
row-major weight whose width is a multiple of 64; GPTQ/AWQ use 128); no calibration (GPTQ's error
compensation, AWQ's activation-aware scaling) is done. backend="bnb" uses bitsandbytes' own FP4 quantizer for
4 bits (on a CUDA GPU); see quantize_bnb.
"""
from __future__ import annotations

import copy
import numbers

import torch
import torch.nn.functional as F

from ..data.example import checked_examples
from .answer_metrics import answer_metrics

BACKENDS = ("auto", "rtn", "bnb")
SCORES = ("answer_prob", "rougeL_recall")
MODULE_SETS = ("linear", "all_linear")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest quantization of a 2-D weight (out_features x in_features, nn.Linear's layout),
    returned de-quantized, in the weight's dtype and on its device. Computed in float32, per output channel
    (row), or per group of `group_size` consecutive input columns of a row (the last group of a row may be
    shorter). For each row or group g, with qmax = 2^(bits-1) - 1:

        scale_g = max_{j in g} |w_j| / qmax          (scale_g = 1 for an all-zero group: its q are all 0)
        q_j     = clamp(round(w_j / scale_g), -2^(bits-1), qmax)     (round: half to even, torch.round)
        w'_j    = q_j * scale_g

    So the largest |w| of a group is kept, every other w moves by at most scale_g / 2, a group takes at most
    2 * qmax + 1 distinct values (the code -2^(bits-1) is never reached: absmax scaling, as LLM.int8 does), and
    quantizing w' again gives w' back (all up to float rounding)."""
    _check_bits(bits)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError("quantize_rtn takes a 2-D floating-point tensor (out_features x in_features), got "
                         f"{_describe(weight)}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_rtn: the weight holds inf or nan values, which have no quantization scale")
    rows, cols = w.shape
    size = cols if group_size is None else min(group_size, cols)
    pad = (-cols) % size
    groups = F.pad(w, (0, pad)).reshape(rows, -1, size)  # zero padding never raises a group's max |w|
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: no division by zero
    q = torch.clamp(torch.round(groups / scale), -qmax - 1, qmax)
    return (q * scale).reshape(rows, -1)[:, :cols].to(weight.dtype)


def quantize_bnb(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The de-quantized weight that transformers' bitsandbytes loading computes with (needs bitsandbytes and a
    CUDA GPU; the result is returned on the weight's device, in its dtype). 4 bits:
    bitsandbytes.functional.quantize_4bit / dequantize_4bit with BitsAndBytesConfig(load_in_4bit=True)'s defaults
    (FP4 codes, blocksize 64, no double quantization). 8 bits: LLM.int8 stores int8 weights with the scale
    max|row| / 127, which is quantize_rtn(weight, 8) exactly, so that is used (its int8 activations and outlier
    columns are not reproduced)."""
    if bits == 8:
        return quantize_rtn(weight, 8)
    if bits != 4:
        raise ValueError(f"the bnb backend quantizes to 4 or 8 bits (what bitsandbytes offers), got bits={bits!r}")
    from bitsandbytes import functional as bnb_functional

    w = weight.detach().to("cuda")
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    return bnb_functional.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.device, weight.dtype)


def quantized_copy(model: torch.nn.Module, bits: int, modules="linear", group_size: int | None = None,
                   backend: str = "rtn") -> torch.nn.Module:
    """A deep copy of `model` whose selected linear layers hold their quantized-then-de-quantized weights (biases,
    embeddings, norms untouched). The model passed in is never changed; the copy needs a second model's memory.

    modules: "linear" (default): every nn.Linear (and transformers' GPT-2 style Conv1D) except the LM head, as
    transformers' load_in_8bit / load_in_4bit do (they skip the output embeddings, and so any layer whose weight
    is tied to an embedding); "all_linear": the LM head too (with tied embeddings that quantizes the input
    embedding as well, as it is the same tensor); or a list of qualified module names (model.named_modules()).
    backend: "rtn" (quantize_rtn, any device), "bnb" (quantize_bnb, 4 or 8 bits, CUDA) or "auto" (bnb when
    bitsandbytes imports and CUDA is available, rtn otherwise); group_size is for rtn only."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_bits(bits)
    backend = resolve_backend(backend)
    if backend == "bnb" and group_size is not None:
        raise ValueError("group_size is for the rtn backend; bitsandbytes uses its own blocks of 64")
    names = quantized_module_names(model, modules)
    quantized = copy.deepcopy(model)
    with torch.no_grad():  # an in-place copy into a parameter that requires grad is refused otherwise
        for name in names:
            layer = quantized.get_submodule(name)
            layer.weight.copy_(_quantized_weight(layer, bits, group_size, backend))
    return quantized


def quantized_module_names(model: torch.nn.Module, modules="linear") -> list[str]:
    """The qualified names of the layers quantized_copy quantizes (see its `modules`)."""
    if isinstance(modules, str):
        if modules not in MODULE_SETS:
            raise ValueError(f"modules must be one of {MODULE_SETS} or a list of module names, got {modules!r}")
        candidates = [(n, m) for n, m in model.named_modules() if _is_linear(m)]
        if modules == "all_linear":
            return [n for n, _ in candidates]
        head = _output_embeddings(model)
        embedded = {id(p) for m in model.modules() if not _is_linear(m) for p in m.parameters(recurse=False)}
        return [n for n, m in candidates
                if m is not head and n.rsplit(".", 1)[-1] != "lm_head" and id(m.weight) not in embedded]
    if isinstance(modules, (bytes, dict)) or not hasattr(modules, "__iter__"):
        raise TypeError(f"modules must be 'linear', 'all_linear' or a list of module names, got {modules!r}")
    named = dict(model.named_modules())
    names = list(modules)
    for name in names:
        if name not in named:
            raise ValueError(f"the model has no module named {name!r}")
        if not _is_linear(named[name]):
            raise ValueError(f"module {name!r} is a {type(named[name]).__name__}, not a linear layer")
    return names


def quantization_attack(model, tokenizer, forget_examples, bits=(8, 4), max_length: int = 512, batch_size: int = 16,
                        score: str = "answer_prob", group_size: int | None = None, modules="linear",
                        backend: str = "auto", max_new_tokens: int | None = None, chat_template: bool = False,
                        progress: bool = False) -> dict:
    """The forget score of the model and of its quantized copies (one copy at a time, freed after scoring).

    score: "answer_prob" (the length-normalized answer probability under teacher forcing of answer_metrics with
    generate=False: cheap) or "rougeL_recall" (greedy answers, the paper's kind of measure). A score that rises
    after quantization towards the original model's means the unlearning hid the answers within the
    quantization step. Returns {"metric", "backend" (the one used), "group_size", "modules", "n",
    "unquantized": score of the model as given, "quantized": {bits: score of its quantized copy}}."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    bit_widths = _bit_widths(bits)
    backend = resolve_backend(backend)
    examples = checked_examples(forget_examples, "quantization_attack", "forget_examples is empty")
    quantized_module_names(model, modules)  # a bad `modules` fails before the (long) first scoring

    def measure(m) -> float:
        result = answer_metrics(m, tokenizer, examples, batch_size=batch_size, max_length=max_length,
                                max_new_tokens=max_new_tokens, chat_template=chat_template,
                                generate=score == "rougeL_recall", progress=progress)
        return float(result[score])

    unquantized, scores = measure(model), {}
    for b in bit_widths:
        attacked = quantized_copy(model, b, modules=modules, group_size=group_size, backend=backend)
        scores[b] = measure(attacked)
        del attacked  # one extra model in memory at a time
    return {"metric": score, "backend": backend, "group_size": group_size,
            "modules": modules if isinstance(modules, str) else list(modules), "n": len(examples),
            "unquantized": unquantized, "quantized": scores}


def resolve_backend(backend: str) -> str:
    """"rtn" or "bnb": "auto" is bnb when bitsandbytes imports and a CUDA GPU is present, rtn otherwise; "bnb"
    without them is a ValueError that says which is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "rtn":
        return backend
    missing = _bnb_missing()
    if backend == "auto":
        return "rtn" if missing else "bnb"
    if missing:
        raise ValueError(f"backend='bnb' needs {missing}; use backend='rtn' (the device-free stand-in)")
    return backend


def _bnb_missing() -> str | None:
    if not torch.cuda.is_available():
        return "a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # an ImportError, or a bitsandbytes build that fails to load its library
        return "the bitsandbytes package (pip install bitsandbytes)"
    return None


def _quantized_weight(layer, bits: int, group_size, backend: str) -> torch.Tensor:
    conv1d = type(layer).__name__ == "Conv1D"  # transformers' GPT-2 layer stores in x out: channels are columns
    weight = layer.weight.t() if conv1d else layer.weight
    out = quantize_bnb(weight, bits) if backend == "bnb" else quantize_rtn(weight, bits, group_size)
    return out.t() if conv1d else out


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _output_embeddings(model):
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):  # transformers' base class raises for models without a head
        return None


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int from 2 to 16, got {bits!r}")


def _bit_widths(bits) -> list[int]:
    widths = [bits] if isinstance(bits, numbers.Integral) and not isinstance(bits, bool) else list(bits)
    if not widths:
        raise ValueError("bits is empty: give the bit widths to quantize to, e.g. (8, 4)")
    for b in widths:
        _check_bits(b)
    if len(set(widths)) != len(widths):
        raise ValueError(f"bits has repeated widths: {widths}")
    return [int(b) for b in widths]


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor"
    return type(x).__name__
