#!/bin/sh
# MoMKE on CMU-MOSI (sentiment regression; Acc2, F1, MAE, Corr, Acc7), the paper's settings:
# the fixed-condition table (a, t, v, at, av, tv, atv) and the random missing-rate sweep 0.0-0.7.
# Time: RUNTIME_CPU on a 2-core laptop CPU (stage 1 trained once per seed and protocol).
# Results: saved/CMUMOSI/<setting>_seed<seed>_<hash>/result.json, tables printed at the end
# (python -m MoMKE.report saved/CMUMOSI). Without features/CMUMOSI/ the synthetic default is
# generated into features/synthetic/ and used: its numbers are SYNTHETIC and are labelled so.
# Usage: sh run_MoMKE_cmumosi.sh [more MoMKE.train flags]; every variable below can be set from
# the environment, e.g. EPOCHS=20 STAGE_EPOCHS=10 SEEDS="66 67 68" sh run_MoMKE_cmumosi.sh
# In parallel on this machine's cores, its GPUs or a cluster: LAUNCHER=ray (README, On a cluster).
set -eu
cd "$(dirname "$0")"

DATA_ROOT=${DATA_ROOT:-features}
OUTPUT_DIR=${OUTPUT_DIR:-saved}
SEEDS=${SEEDS:-66}
CONDITIONS=${CONDITIONS:-a,t,v,at,av,tv,atv}
RATES=${RATES:-0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7}
UNIFIED=${UNIFIED:-none}          # any or any+rates: also train one model for every missing pattern
ABLATIONS=${ABLATIONS:-}          # e.g. all, or no-stage1,uniform-router,self-experts,frozen-experts
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
DEVICE=${DEVICE:-auto}
LAUNCHER=${LAUNCHER:-local}       # ray: every run a Ray task, in parallel (requirements-ray.txt)
RAY_ADDRESS=${RAY_ADDRESS:-local} # with ray: local (this machine), auto, or host:port of a head
CPUS_PER_RUN=${CPUS_PER_RUN:-1}   # with ray: CPUs (and torch threads) of each run
GPUS_PER_RUN=${GPUS_PER_RUN:-0}   # with ray: GPUs of each run, e.g. 1 on a GPU box

python -m MoMKE.sweep \
    --synthetic-fallback \
    --dataset CMUMOSI \
    --data-root "$DATA_ROOT" \
    --output-dir "$OUTPUT_DIR" \
    --seeds "$SEEDS" \
    --test-condition "$CONDITIONS" \
    --missing-rate "$RATES" \
    --unified "$UNIFIED" \
    --ablations "$ABLATIONS" \
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
    --device "$DEVICE" \
    --launcher "$LAUNCHER" \
    --ray-address "$RAY_ADDRESS" \
    --cpus-per-run "$CPUS_PER_RUN" \
    --gpus-per-run "$GPUS_PER_RUN" \
    "$@"
python -m MoMKE.report "$OUTPUT_DIR/CMUMOSI"
