# The body the run scripts share (run_MoMKE_<dataset>.sh sources it after setting DATASET and
# their hyperparameters): the paper's study of one dataset, the seven fixed conditions and the
# eight missing rates, with the report and the robustness matrices at the end.
# Variables (each settable from the environment): SEEDS, EPOCHS, STAGE_EPOCHS, BATCH_SIZE, LR, L2,
# HIDDEN, DEPTH, NUM_HEADS, DROP_RATE, ATTN_DROP_RATE, and the arithmetic: PRECISION=fp32|bf16,
# COMPILE=no|yes (docs/precision-and-speed.md). Arguments: MoMKE.sweep and MoMKE.train flags,
# which win over the script's (docs/flags.md), e.g.
#   EPOCHS=20 STAGE_EPOCHS=10 SEEDS="66 67 68" sh run_MoMKE_cmumosi.sh
#   sh run_MoMKE_cmumosi.sh --test-condition a,atv --missing-rate ""   # fewer runs
#   PRECISION=bf16 sh run_MoMKE_cmumosi.sh   # bfloat16 autocast: faster

# fp32 is the default and the reference (docs/precision-and-speed.md).
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
    --dataset "$DATASET" \
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
