# Sourced by the run_MoMKE_*.sh scripts after they set DATASET and the paper's hyperparameters:
# the run controls below (each settable from the environment), then one sweep and its tables.
# Extra arguments of the run script ("$@") go to the trainer.

DATA_ROOT=${DATA_ROOT:-features}
OUTPUT_DIR=${OUTPUT_DIR:-saved}
CONDITIONS=${CONDITIONS:-a,t,v,at,av,tv,atv}
RATES=${RATES:-0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7}
UNIFIED=${UNIFIED:-none}          # any or any+rates: also train one model for every missing pattern
ABLATIONS=${ABLATIONS:-}          # e.g. all, or no-stage1,uniform-router,self-experts,frozen-experts
DEVICE=${DEVICE:-auto}
LAUNCHER=${LAUNCHER:-local}       # ray: every run a Ray task, in parallel (requirements-ray.txt)
RAY_ADDRESS=${RAY_ADDRESS:-local} # with ray: local (this machine), auto, or host:port of a head
CPUS_PER_RUN=${CPUS_PER_RUN:-1}   # with ray: CPUs (and torch threads) of each run
GPUS_PER_RUN=${GPUS_PER_RUN:-0}   # with ray: GPUs of each run, e.g. 1 on a GPU box
INTERVALS=${INTERVALS:-1}         # 1: bootstrap intervals and paired comparisons in the tables
OFFICIAL=${OFFICIAL:-0}           # 1: the official code's choices (--official: selection among
                                  # stage-1 epochs too, last-epoch hand-over, MAE/Corr on non-zero labels)

if [ "$OFFICIAL" = 1 ]; then
    set -- --official "$@"
fi

python -m MoMKE.sweep \
    --synthetic-fallback \
    --dataset "$DATASET" \
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
if [ "$INTERVALS" = 1 ]; then
    python -m MoMKE.report --ci "$OUTPUT_DIR/$DATASET"
else
    python -m MoMKE.report "$OUTPUT_DIR/$DATASET"
fi
