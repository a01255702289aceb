"""Reading results: saved run folders in, tables, intervals, verdicts and plots out. Reads what
runs wrote (`MoMKE/runlog.py`'s layout) and never imports the trainer; `MoMKE/experiments/`
may use it, it never uses `MoMKE/experiments/`."""
