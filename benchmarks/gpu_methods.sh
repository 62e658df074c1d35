#!/usr/bin/env bash
# GPU benchmark of the methods of issues 13 and 14 on one GPU, in under 9 minutes (an H200):
# training throughput of each method on CIFAR-10 (ResNet-18 CIFAR stem; ViT-Small/4 for MAE and
# mocov3-vit) with its params/profiles/cifar10-<method>.yaml, and one short accuracy point
# (online kNN top-1 after 2 epochs, against the random initialisation).
#
#   benchmarks/gpu_methods.sh                 # writes $OUT/methods.json, methods.md, gpu.txt, log.txt
#   OUT=/tmp/gpu-methods EPOCHS=3 benchmarks/gpu_methods.sh
#
# The CIFAR-10 JPEG archive: ../shared/datasets/cifar10-jpeg.tar.gz beside the checkout, or
# ./shared/datasets/..., or $SSLFLOW_CIFAR10. torch.compile is off (pretrain.compile=false):
# compiling each method's shapes would take most of the budget, so the figures are eager bf16
# channels_last throughput (the loop's other CUDA settings as in training); methods are started
# while BUDGET_S seconds last and the files are rewritten after each one, so a cut-short run
# keeps what finished. The whole script is bounded by `timeout` at LIMIT_S.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-methods-out}"
EPOCHS="${EPOCHS:-2}"
BUDGET_S="${BUDGET_S:-400}"
LIMIT_S="${LIMIT_S:-530}"
mkdir -p "$OUT"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if [ -z "${SSLFLOW_CIFAR10:-}" ]; then
  for a in ../shared/datasets/cifar10-jpeg.tar.gz shared/datasets/cifar10-jpeg.tar.gz; do
    if [ -f "$a" ]; then export SSLFLOW_CIFAR10="$PWD/$a"; break; fi
  done
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } > "$OUT/gpu.txt"
timeout --signal=TERM --kill-after=20 "$LIMIT_S" "$PY" benchmarks/methods.py --device cuda --epochs "$EPOCHS" \
    --budget-s "$BUDGET_S" --set pretrain.compile=false --cache "${TMPDIR:-/tmp}/sslflow-bench" --out "$OUT" \
    "$@" 2>&1 | tee "$OUT/log.txt"
