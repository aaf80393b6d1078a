"""Applications built on the library, not part of it: the unlearning protocol (its corpora, its base and
fine-tuned models, its pieces) and the demo (`simu-fast demo`), the protocol in miniature."""
