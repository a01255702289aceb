#!/bin/sh
# MoMKE on IEMOCAP, 4 classes (emotion; WA, UA, F1, five session folds), the paper's settings:
# the fixed-condition table (a, t, v, at, av, tv, atv) and the random missing-rate sweep 0.0-0.7.
# Time at the paper's epochs: about 10-15 h on a 2-core laptop CPU (stage 1 trained once per seed and
# protocol), projected by `python -m MoMKE.bench` from measured epochs; no GPU was measured.
# Results: saved/IEMOCAPFour/<setting>_seed<seed>_<hash>/result.json; the tables are printed at the end
# (python -m MoMKE.report saved/IEMOCAPFour). Without features/IEMOCAP/ the synthetic default is
# generated into features/synthetic/ and used: its numbers are SYNTHETIC and are labelled so.
# Usage: sh run_MoMKE_iemocap4.sh [more MoMKE.train flags]; every variable below and in scripts/sweep.sh
# (CONDITIONS, RATES, UNIFIED, ABLATIONS, DEVICE, LAUNCHER, ...) can be set from the environment,
# e.g. EPOCHS=20 STAGE_EPOCHS=10 SEEDS="66 67 68" sh run_MoMKE_iemocap4.sh
set -eu
cd "$(dirname "$0")"

DATASET=IEMOCAPFour
SEEDS=${SEEDS:-66}
EPOCHS=${EPOCHS:-200}
STAGE_EPOCHS=${STAGE_EPOCHS:-100}
BATCH_SIZE=${BATCH_SIZE:-16}
LR=${LR:-1e-4}
L2=${L2:-1e-5}
HIDDEN=${HIDDEN:-256}
DEPTH=${DEPTH:-4}
NUM_HEADS=${NUM_HEADS:-2}
DROP_RATE=${DROP_RATE:-0.5}
ATTN_DROP_RATE=${ATTN_DROP_RATE:-0.0}

. scripts/sweep.sh
