"""`python -m MoMKE.parity`: the official MoMKE run beside this one on the same data, and the table
comparing them. The code lives in `MoMKE/experiments/parity.py`; this entry point keeps the command
users type."""
import sys

from MoMKE.experiments.parity import main

if __name__ == "__main__":
    sys.exit(main())
