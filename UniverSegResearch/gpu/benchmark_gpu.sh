#!/usr/bin/env bash
# One command for the GPU machine (torch + numpy only; no SimpleITK/slicerio needed: the sample
# slices come from docs/results/benchmarks/chest_ct_slices.npz). Writes JSON + table into $OUT/.
# Usage (repository root): OUT=/some/dir bash UniverSegResearch/gpu/benchmark_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT="${OUT:-$PWD/benchmark_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
# S=16 and S=64 rows (reference and engine), exactness on the chest CT sample, and two
# propagations: 256x256x200 (the CPU target's volume) and a 300-slice 256x256 volume.
timeout 300 "$PY" -m UniverSegLogic.cli.benchmark --device cuda \
    --sample docs/results/benchmarks/chest_ct_slices.npz \
    --volume-shape 200,256,256 --volume-shape 300,256,256 \
    --json "$OUT/benchmark_cuda.json" 2>&1 | tee "$OUT/benchmark_cuda.txt"
