"""Many runs: planning a sweep, running it (in this process, a local process pool or Ray),
measuring its cost (bench) and running the official code beside it (parity). Builds on the
method and one run (`MoMKE/`) and on reading results (`MoMKE/results/`); nothing below imports it."""
