"""`python -m MoMKE.sweep`: every (seed, condition or rate) as one resumable list of runs. The code
lives in `MoMKE/experiments/sweep.py`; this entry point keeps the command users type."""
import sys

from MoMKE.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
