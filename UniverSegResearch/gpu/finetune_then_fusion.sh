#!/usr/bin/env bash
# Fine-tune the network from the shipped starter weights (GPU), then recalibrate the logistic
# fusion and train the learned fusion on the new network's logits (CPU). Run from the
# repository root, in two stages when the GPU machine lacks SimpleITK / slicer-core:
#
#   STAGE=finetune MINUTES=7 bash UniverSegResearch/gpu/finetune_then_fusion.sh   # GPU machine
#   STAGE=fusion WEIGHTS=out/finetuned.pt bash UniverSegResearch/gpu/finetune_then_fusion.sh
#   STAGE=all ...                                                                 # one machine
#
# Arguments go to the trainer (stage finetune), e.g. --episodes 8.
# Environment: DATA (prepared data, default .data/prepared), OUT (default ./out), MINUTES
# (fine-tuning wall clock, default 7), MAX_STEPS (fine-tuning steps cap, optional), WEIGHTS
# (stage fusion: the fine-tuned weights; default $OUT/finetuned.pt), CASES (evaluation manifest,
# default $DATA/eval/manifest.json), CACHE (download cache of the training sources, default
# .data/cache), ROOT (fusion working folder, default $OUT/fusion), PER_STRUCTURE (3),
# FUSION_STEPS (6000), FEATURES (logistic feature sets, default sdf_fbs_nb+model_nb: the shipped
# choice; "all" re-chooses them, ~25 min more).
# Writes $WEIGHTS, $WEIGHTS.fusion.json (the logistic rule) and $WEIGHTS.fusion_net.pt (the
# learned fusion); `--weights $WEIGHTS` then picks up both (propagate, evaluate).
# Tested on the CPU with MINUTES=0.2 MAX_STEPS=2 PER_STRUCTURE=1 FUSION_STEPS=4 (see
# docs/results/fusion/README.md).
set -euo pipefail
export PYTHONUNBUFFERED=1
STAGE=${STAGE:-all}
DATA=${DATA:-.data/prepared}
OUT=${OUT:-out}
WEIGHTS=${WEIGHTS:-$OUT/finetuned.pt}
CASES=${CASES:-$DATA/eval/manifest.json}
CACHE=${CACHE:-.data/cache}
ROOT=${ROOT:-$OUT/fusion}
FEATURES=${FEATURES:-sdf_fbs_nb+model_nb}
PY=${PYTHON:-$(command -v python3 || command -v python)}

if [ "$STAGE" = finetune ] || [ "$STAGE" = all ]; then
    extra=()
    [ -n "${MAX_STEPS:-}" ] && extra=(--max-steps "$MAX_STEPS")
    OUT="$OUT" DATA="$DATA" MINUTES="${MINUTES:-7}" \
        bash UniverSegResearch/gpu/train_gpu.sh ${extra[@]+"${extra[@]}"} "$@"
    mkdir -p "$(dirname "$WEIGHTS")"
    cp "$OUT/train/best.pt" "$WEIGHTS"  # a plain float32 v1 state dict
    echo "fine-tuned weights: $WEIGHTS"
fi

if [ "$STAGE" = fusion ] || [ "$STAGE" = all ]; then
    [ -f "$WEIGHTS" ] || { echo "finetune_then_fusion.sh: no weights $WEIGHTS" >&2; exit 2; }
    features=()
    [ "$FEATURES" != all ] && features=(--features "$FEATURES")
    "$PY" -m UniverSegResearch calibrate --cases "$CASES" --weights "$WEIGHTS" --device cpu \
        --cache "$ROOT/calibration" --out "$WEIGHTS.fusion.json" ${features[@]+"${features[@]}"}
    "$PY" -m UniverSegResearch fusion data --weights "$WEIGHTS" --root "$ROOT" --cache "$CACHE" \
        --cases "$CASES" --per-structure "${PER_STRUCTURE:-3}"
    "$PY" -m UniverSegResearch fusion train --root "$ROOT" --steps "${FUSION_STEPS:-6000}"
    "$PY" -m UniverSegResearch fusion select --weights "$WEIGHTS" --root "$ROOT" \
        --cases "$CASES" --out "$WEIGHTS.fusion_net.pt" --json "$ROOT/select.json"
fi
