#!/usr/bin/env bash
# Peak memory, step time and MFU of one GRPO step and one OPD step (3 teachers + anchor) on
# SD3.5-M's exact transformer and VAE with random weights, bf16, 512 px, the paper's batch per GPU
# (runs/gpu_check.py). No hub, no data: the check to run on the first GPU at hand, before the
# paper's run. Each step runs in its own process, so that its peak memory is its own. Output: one
# line per step, and <OUT>/gpu_check_{grpo,opd}.json.
#
#   bash runs/gpu_check.sh            # one GPU
#   bash runs/gpu_check.sh --tiny     # the same code on the tiny SD3.5-M-shaped world on a CPU
#
# Settings: OUT (out/gpu_check), PYTHON (python), DEVICE (cuda), MIXED_PRECISION (bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PYTHON=${PYTHON:-python}
ARGS=(--device "${DEVICE:-cuda}" --mixed-precision "${MIXED_PRECISION:-bf16}")
for arg in "$@"; do
    case "$arg" in
        --tiny) ARGS=(--size tiny --device cpu --mixed-precision "${MIXED_PRECISION:-bf16}"
                      --group-size 2 --steps 3 --threads 1) ;;
        *) echo "runs/gpu_check.sh: unknown argument $arg (expected --tiny)" >&2; exit 2 ;;
    esac
done
start=$SECONDS
for step in grpo opd; do
    "$PYTHON" runs/gpu_check.py --step "$step" --out "$OUT" "${ARGS[@]}"
done
echo "runs/gpu_check.sh: $((SECONDS - start)) s; details in $OUT/gpu_check_{grpo,opd}.json"
