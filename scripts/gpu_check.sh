#!/bin/sh
# The GPU check: the CUDA tests, the benchmark on the GPU in fp32 and bf16 (GPU-busy share and
# time per step), one short run on the GPU and on the CPU (their metrics agree), and the
# seven-condition table with one and with several runs per GPU. One deadline of at most 8
# minutes for all of it (--deadline); no network; installs nothing beyond requirements.txt. The
# table is written after every part to <out>/summary.md (at most 8 files in <out>; default a fresh
# temporary folder). Without a GPU it runs the CPU parts, says "no CUDA device" and exits 0.
# On a GPU machine, from the repository: sh scripts/gpu_check.sh --out "$OUT"
set -eu
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3) || { echo "gpu_check.sh: neither python nor python3 is on PATH; install Python 3 or put it on PATH." >&2; exit 2; }
PYTHONPATH=. exec "$PY" scripts/gpu_check.py "$@"
