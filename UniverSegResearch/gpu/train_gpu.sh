#!/usr/bin/env bash
# One training session on the lent GPU machine. Run from the repository root:
#
#   bash UniverSegResearch/gpu/train_gpu.sh                 # 7 minutes, results in $OUT/train
#   MINUTES=5 RESUME=path/to/checkpoint.pt bash UniverSegResearch/gpu/train_gpu.sh --lr 1e-4
#
# Environment: DATA (default .data/prepared, carried with the call), OUT (the device's return
# folder; default ./out), MINUTES (wall-clock budget of the training process, default 7),
# RESUME (a checkpoint.pt or plain state dict; default Resources/starter_weights.pt when it
# exists; "none" = from scratch). Extra arguments go to the trainer and override the defaults.
# Writes 6 files into $OUT/train: checkpoint.pt (~14 MB), last.pt, best.pt, log.csv, curve.png,
# summary.json. Needs only torch + numpy (no SimpleITK/slicerio on the GPU machine).
set -euo pipefail
export PYTHONUNBUFFERED=1
DATA=${DATA:-.data/prepared}
OUTDIR=${OUT:-out}/train
MINUTES=${MINUTES:-7}
PY=${PYTHON:-$(command -v python3 || command -v python)}

resume=()
if [ -n "${RESUME:-}" ]; then
    [ "$RESUME" != none ] && resume=(--resume "$RESUME")
elif [ -f Resources/starter_weights.pt ]; then
    resume=(--resume Resources/starter_weights.pt)
fi

if [ ! -d "$DATA/train" ]; then
    echo "train_gpu.sh: no $DATA/train (carry .data/prepared with the call)" >&2
    exit 2
fi
echo "data: $(ls "$DATA"/train/*.npz | wc -l) train / $(ls "$DATA"/val/*.npz 2>/dev/null | wc -l) val stacks in $DATA; out: $OUTDIR; minutes: $MINUTES; ${resume[*]:-from scratch}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

exec "$PY" -m UniverSegResearch.cli.train --data "$DATA" --out "$OUTDIR" --minutes "$MINUTES" \
    --episodes 16 --targets 2 --log-every-s 20 --val-every-s 30 --checkpoint-every-s 60 \
    ${resume[@]+"${resume[@]}"} "$@"
