"""simu_fast benchmarks: one module per op (bench/optim.py, ...), run all with `python -m bench`."""
