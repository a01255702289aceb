#!/bin/sh
# The GPU check (issue 20): the CUDA tests, the benchmark on the GPU in fp32 and bf16, one short
# run on the GPU and on the CPU (their metrics agree), and the seven-condition table with one and
# with several runs per GPU. At most 8 minutes on one GPU; no network; installs nothing beyond
# requirements.txt. Prints one summary table and writes it to <out>/summary.md (default
# gpu_check/). Without a GPU it runs the CPU parts, says "no CUDA device" and exits 0.
# Usage: sh scripts/gpu_check.sh [--out DIR]
set -eu
cd "$(dirname "$0")/.."
PYTHONPATH=. exec python scripts/gpu_check.py "$@"
