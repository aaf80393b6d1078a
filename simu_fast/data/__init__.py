"""Data: local files (JSON / JSON Lines / CSV / Parquet; LUME and TOFU formats) to Examples, Examples to
token features with prompt-masked labels, padded batches, the built-in synthetic people data, and local copies
of benchmark datasets in their hub layouts (MUSE, WMDP: benchmarks.py)."""
from .benchmarks import MUSE_PARTS, load_muse, load_muse_knowmem, load_muse_texts, load_muse_verbmem, load_wmdp, muse_files
from .collate import collate, make_loader
from .example import Example
from .load import FORMATS, load_examples
from .save import save_examples
from .synthetic_people import synthetic_people
from .tokenization import ensure_pad_token, tokenize_examples

__all__ = ["Example", "load_examples", "save_examples", "FORMATS", "tokenize_examples", "ensure_pad_token",
           "collate", "make_loader", "synthetic_people", "load_muse", "load_muse_texts", "load_muse_knowmem",
           "load_muse_verbmem", "muse_files", "MUSE_PARTS", "load_wmdp"]
