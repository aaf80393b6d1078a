"""What a command reads, checked so that every mistake is one line that names it: the model directory (its
tokenizer, weights that fit its config, a vocabulary that holds every token id, the position limit) and the
data files (a file not a directory, the prompt/answer columns, empty answers, a forget set that is also the
retain set)."""
from __future__ import annotations

import json
import os
import re

from .errors import UsageError, one_line, warn

# the files one of which a saved transformers tokenizer has (fast, sentencepiece, BPE, WordPiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "tokenizer.tiktoken")
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# --dtype: the weights' dtype after loading; "auto" keeps the checkpoint's own (config.json's dtype)
DTYPES = ("auto", "float32", "bfloat16", "float16")


HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")  # never pickled weights (*.bin)


def resolve_model(path: str, flag: str = "--model") -> str:
    """A local path as is; a hub name (owner/name that is no local path) downloaded into the hub's cache (config,
    tokenizer and safetensors weights only) and its snapshot directory returned, or a UsageError when the hub
    cannot give it (offline, unknown name)."""
    if os.path.exists(path) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path):
        return path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=list(HUB_FILES))
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"{flag} {path} is not a local directory, and the hub did not give a model of that name "
                         f"({one_line(e)[:200]})")


def add_dtype_argument(parser, default=None) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=default,
                        help="the model's dtype once loaded (default auto: the checkpoint's own, as config.json "
                             "says); bfloat16 halves a float32 checkpoint's memory")


def load_model(path: str, flag: str = "--model", dtype: str = "auto"):
    """(model, tokenizer) from a local transformers directory, or a UsageError saying what is wrong with it."""
    if not os.path.exists(path):
        raise UsageError(f"model directory not found: {path}")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; give the directory that holds config.json and the weights")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{path} is not a transformers model directory (no config.json)")
    from transformers import AutoTokenizer
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise UsageError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:4])}, ...): save the "
                         "model's tokenizer there with tokenizer.save_pretrained(DIR)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {one_line(e)}")
    model = load_weights(path, dtype)
    return model, tokenizer


def load_weights(path: str, dtype: str = "auto"):
    """The causal LM of a local directory in `dtype` (one of DTYPES, checked by the option parsers; "auto": the
    checkpoint's own, also under transformers 4, whose default is float32), or a UsageError for a non-causal-LM,
    or weights that do not fit the config (a size mismatch is named, not a traceback)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    value = dtype if dtype == "auto" else getattr(torch, dtype)
    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{name: value})
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a causal LM from {path}: {one_line(e)}")
    except RuntimeError as e:  # torch's load_state_dict: "size mismatch for model.layers.0...: copying a param ..."
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), one_line(e))
        raise UsageError(f"the weights in {path} do not fit its config.json ({first[:300]}); was config.json "
                         "edited, or copied from another model?")


def position_limit(model) -> int | None:
    """The longest sequence the model was built for (config), None when the config names none."""
    config = getattr(model, "config", None)
    for key in POSITION_LIMIT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_max_length(model, max_length: int, given: bool, model_path: str) -> int:
    """--max-length checked against the model's position limit: an explicit value past it is an error (a GPT-2
    would index past its position table, a RoPE model would run past its trained length); the default is
    lowered to it."""
    limit = position_limit(model)
    if limit is None or max_length <= limit:
        return max_length
    if given:
        raise UsageError(f"--max-length {max_length} is longer than the model's position limit {limit} "
                         f"({model_path}/config.json); give --max-length {limit} or less")
    return limit


def check_vocabulary(model, features, path: str, role: str, model_path: str) -> None:
    """Every token id of the tokenized data indexes the model's embedding (a tokenizer larger than the model's
    vocabulary would otherwise end in an IndexError inside the forward)."""
    rows = model.get_input_embeddings().weight.shape[0]
    largest = max((max(f["input_ids"]) for f in features if len(f["input_ids"])), default=-1)
    if largest >= rows:
        raise UsageError(f"{role} file {path}: token id {largest} is past the model's vocabulary ({rows} embedding "
                         f"rows in {model_path}): the tokenizer does not belong to this model, or its added tokens "
                         "were never added to the model (model.resize_token_embeddings)")


def read_examples(path, fmt, role, prompt_field=None, answer_field=None):
    """The Examples of a data file, or a UsageError naming the file and what is wrong."""
    from ..data import load_examples
    if not os.path.exists(path):
        raise UsageError(f"{role} file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"the {role} path {path} is a directory; give the path of one data file")
    try:
        examples = load_examples(path, format=fmt, prompt_field=prompt_field, answer_field=answer_field)
    except (ValueError, KeyError) as e:
        raise UsageError(f"cannot read the {role} file {path}: {cli_wording(one_line(e))}")
    if not examples:
        raise UsageError(f"the {role} file {path} has no examples")
    return examples


def cli_wording(message: str) -> str:
    """The loader's advice in the command line's words (its keyword arguments are flags here)."""
    return message.replace("prompt_field=", "--prompt-field NAME").replace("answer_field=", "--answer-field NAME")


def tokenize(examples, tokenizer, max_length, path, role):
    from ..data import tokenize_examples
    try:
        features = tokenize_examples(examples, tokenizer, max_length=max_length)
    except ValueError as e:
        raise UsageError(f"{role} file {path}: {one_line(e)}")
    if not features:
        raise UsageError(f"{role} file {path}: no example fits in max-length {max_length}")
    return features


def check_answers(examples, path: str, role: str) -> None:
    """Rows whose answer is empty or whitespace train on the EOS token only: a warning with their count and
    first rows, an error when every row is so."""
    empty = [i for i, e in enumerate(examples, 1) if not e.answer.strip()]
    if not empty:
        return
    if len(empty) == len(examples):
        raise UsageError(f"{role} file {path}: every answer is empty or whitespace; there is nothing to "
                         f"{'unlearn' if role == 'forget' else 'keep'} (is --answer-field the right column?)")
    rows = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
    warn(f"{role} file {path}: {len(empty)} of {len(examples)} rows have an empty answer (rows {rows}); they "
         "train on the end-of-sequence token only")


def check_forget_vs_retain(forget, retain, forget_path: str, retain_path: str) -> None:
    """A forget set that is also the retain set makes GradDiff-type training meaningless (its two losses
    cancel): refused when the files are the same or every forget row is in retain; a partial overlap is a
    warning with its count."""
    if os.path.realpath(forget_path) == os.path.realpath(retain_path):
        raise UsageError(f"--forget and --retain are the same file ({forget_path}): the retain loss would undo "
                         "the forget loss")
    kept = {(e.prompt.strip(), e.answer.strip()) for e in retain}
    shared = [i for i, e in enumerate(forget, 1) if (e.prompt.strip(), e.answer.strip()) in kept]
    if not shared:
        return
    if len(shared) == len(forget):
        raise UsageError(f"every forget row of {forget_path} is also in the retain file {retain_path}: the retain "
                         "loss would undo the forget loss")
    rows = ", ".join(map(str, shared[:5])) + (", ..." if len(shared) > 5 else "")
    warn(f"{len(shared)} of {len(forget)} forget rows (rows {rows}) are also in the retain file {retain_path}: "
         "for those the forget and retain losses pull against each other")


def read_texts(path):
    """Utility text: a .txt file (one text per non-empty line) or JSON Lines with a 'text' field."""
    if not os.path.isfile(path):
        raise UsageError(f"utility text file not found: {path}")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})")
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise UsageError(f"{path}:{number}: expected an object with a string 'text' field")
                line = row["text"]
            texts.append(line)
    if not texts:
        raise UsageError(f"utility text file {path} has no text")
    return texts
