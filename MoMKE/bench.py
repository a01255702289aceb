"""`python -m MoMKE.bench`: per-epoch cost and projected study time of the run scripts' settings. The
code lives in `MoMKE/experiments/bench.py`; this entry point keeps the command users type."""
import sys

from MoMKE.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
