"""`python -m MoMKE.report`: the tables of saved runs (markdown, CSV, plots). The code lives in
`MoMKE/results/report.py`; this entry point keeps the command users type."""
import sys

from MoMKE.results.report import main

if __name__ == "__main__":
    sys.exit(main())
