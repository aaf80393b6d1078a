"""`python -m bench`: run every benchmark (see bench/run.py)."""
import sys

from .run import main

sys.exit(main())
