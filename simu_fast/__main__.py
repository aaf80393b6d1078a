"""`python -m simu_fast unlearn ...`: the simu-fast command line (simu_fast/cli/)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
