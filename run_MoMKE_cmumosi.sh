#!/bin/sh
# MoMKE on CMU-MOSI (sentiment; Acc2, F1, MAE, Corr, Acc7) at the paper's settings:
# the seven fixed conditions (a, t, v, at, av, tv, atv) and the missing rates 0.0-0.7.
# Time: about 36 min in float32 on an idle 2-core CPU, 2026-12-04 (README, Runtime, row "the
# whole run script"; projected by `python -m MoMKE.bench` from measured epochs).
# Results: one folder per run in saved/CMUMOSI/ (docs/runs.md); the tables, with 95 % bootstrap
# intervals, printed at the end and written to saved/CMUMOSI/report/. Without features/CMUMOSI/
# the synthetic default is generated into features/synthetic/ and used, labelled SYNTHETIC.
# Variables: the hyperparameters below, each settable from the environment, and
# PRECISION=fp32|bf16 and COMPILE=no|yes: the arithmetic (docs/precision-and-speed.md).
# Arguments: MoMKE.sweep and MoMKE.train flags, which win over the script's (docs/flags.md), e.g.
#   EPOCHS=20 STAGE_EPOCHS=10 SEEDS="66 67 68" sh run_MoMKE_cmumosi.sh
#   sh run_MoMKE_cmumosi.sh --test-condition a,atv --missing-rate ""   # fewer runs
#   PRECISION=bf16 sh run_MoMKE_cmumosi.sh   # bfloat16 autocast: faster
set -eu
cd "$(dirname "$0")"

SEEDS=${SEEDS:-66}
EPOCHS=${EPOCHS:-300}
STAGE_EPOCHS=${STAGE_EPOCHS:-150}
BATCH_SIZE=${BATCH_SIZE:-32}
LR=${LR:-1e-4}
L2=${L2:-1e-5}
HIDDEN=${HIDDEN:-256}
DEPTH=${DEPTH:-4}
NUM_HEADS=${NUM_HEADS:-2}
DROP_RATE=${DROP_RATE:-0.5}
ATTN_DROP_RATE=${ATTN_DROP_RATE:-0.0}

# The arithmetic (docs/precision-and-speed.md): fp32 is the default and the reference.
PRECISION=${PRECISION:-fp32}
COMPILE=${COMPILE:-no}
case "$PRECISION" in
    bf16) AMP=--amp ;;
    fp32) AMP=--no-amp ;;
    *) echo "PRECISION=$PRECISION: use bf16 or fp32." >&2; exit 2 ;;
esac
case "$COMPILE" in
    yes) COMPILE_FLAG=--compile ;;
    no) COMPILE_FLAG=--no-compile ;;
    *) echo "COMPILE=$COMPILE: use yes or no." >&2; exit 2 ;;
esac

python -m MoMKE.sweep \
    --dataset CMUMOSI \
    --synthetic-fallback \
    --report \
    --evaluate-all \
    --ci \
    --seeds "$SEEDS" \
    --test-condition a,t,v,at,av,tv,atv \
    --missing-rate 0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7 \
    --epochs "$EPOCHS" \
    --stage-epochs "$STAGE_EPOCHS" \
    --batch-size "$BATCH_SIZE" \
    --lr "$LR" \
    --l2 "$L2" \
    --hidden "$HIDDEN" \
    --depth "$DEPTH" \
    --num-heads "$NUM_HEADS" \
    --drop-rate "$DROP_RATE" \
    --attn-drop-rate "$ATTN_DROP_RATE" \
    "$AMP" \
    "$COMPILE_FLAG" \
    "$@"
