"""`python -m MoMKE.evaluate RUN [RUN ...]`: evaluate saved runs under any missing pattern. The
code lives in `MoMKE/experiments/evaluate.py`; this entry point keeps the command users type."""
import sys

from MoMKE.experiments.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
