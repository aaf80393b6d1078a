"""Applications built on the library, not part of it: the unlearning demo (`simu-fast demo`) and the models
that know the data to forget, trained locally (memorization), which the demo and the benchmarks start from."""
