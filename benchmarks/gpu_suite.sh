#!/usr/bin/env bash
# The GPU figures of issue 15 in one run on one GPU (budget: < 9 minutes on one H200), written as
# $OUT/gpu_suite.json and $OUT/gpu_suite.md. UNMEASURED so far: no GPU was available where this was
# written; every step has its own time limit so a slow step cannot eat the others' budget.
#
#   OUT=/tmp/gpu-suite benchmarks/gpu_suite.sh            # from the repository root, .venv built
#
# Steps (seconds of budget): CUDA-only tests (60), throughput sslflow vs per-image DataLoader, every
# method (150), 224 px ResNet-50 SimCLR throughput (60), streamed / resident ratio with peak host RSS
# and device memory (60, benchmarks/streaming.py: 20k random 96 px images, store 16x the allowed
# device bytes), SimCLR CIFAR-10 kNN after a fixed 3 minutes of training (200, needs
# ../shared/datasets/cifar10-jpeg.tar.gz).
set -uo pipefail
export OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
SSLFLOW=${SSLFLOW:-.venv/bin/sslflow}
export SSLFLOW_PROJECT=${SSLFLOW_PROJECT:-$(mktemp -d)}
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its log and exit status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    STATUS[$name]=$?
    SECONDS_TAKEN[$name]=$((SECONDS - t0))
    echo "gpu_suite: $name exit ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true

# 1. CUDA-only tests (skipped on a CPU machine, run here)
step cuda_tests 60 .venv/bin/pytest -q -x -p no:cacheprovider -k "cuda" tests/engine/test_augment.py \
    tests/engine/test_large_images.py tests/engine/test_streaming.py

# 2. throughput: sslflow's on-device pipeline vs the per-image DataLoader pipeline, every method
step throughput 150 "$PY" benchmarks/throughput.py --device cuda --epochs 2 --method-epochs 1 \
    --baseline-steps 30 --json "$OUT/throughput.json"

# 3. 224 px ResNet-50 SimCLR: images/s on a generated 224 px store (2,048 images, 2 epochs)
step resnet50_224 60 bash -c "
  set -e
  $PY - <<'PYEOF'
import os
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data.demo import CLASSES, generate_demo
imgs, labels = generate_demo(205, size=224, seed=0)
s = ImageStore.create(os.environ['OUT'] + '/store224', 224, 224)
s.add(imgs, [CLASSES[i] for i in labels])
PYEOF
  $SSLFLOW pretrain --data \"$OUT/store224\" --out \"$OUT/run224\" --no-progress \
    --params params/profiles/imagenet-224px-simclr-resnet50.yaml --set device=cuda --set pretrain.epochs=2 \
    --set pretrain.batch_size=256 --set pretrain.eval_every=0 --set pretrain.export=false \
    --set augment.global_size=0 > \"$OUT/resnet50_224.json\"
"

# 4. streamed / resident ratio (same run, store forced to stream: pretrain.max_device_bytes = store / 16),
#    training and data images/s, peak host RSS per mode (child processes) and device memory
step streaming 60 "$PY" benchmarks/streaming.py --device cuda --json "$OUT/streaming.json"

# 5. time to accuracy: SimCLR CIFAR-10, kNN top-1 after 3 minutes of training
step time_to_accuracy 200 "$PY" benchmarks/accuracy.py --methods simclr --device cuda \
    --set pretrain.epochs=15 --protocols knn --work "$OUT/accuracy"

# the report: one JSON and one markdown table
"$PY" - "$OUT" "${!STATUS[@]}" <<'PYEOF' || true
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
report = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?", "steps": {}}
for name in names:
    entry = {"log": f"{name}.log"}
    for f in (f"{name}.json",):
        p = out / f
        if p.is_file():
            try:
                entry["result"] = json.loads(p.read_text())
            except ValueError:
                entry["result"] = p.read_text()[-2000:]
    report["steps"][name] = entry
(out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
rows = "\n".join(f"| {n} | {'yes' if (out / f'{n}.json').is_file() else 'no'} | {n}.log |" for n in names)
(out / "gpu_suite.md").write_text(f"# GPU suite\n\nGPU: {report['gpu']}\n\n| step | result | log |\n|---|---|---|\n{rows}\n")
PYEOF
for name in "${!STATUS[@]}"; do echo "$name: exit ${STATUS[$name]}, ${SECONDS_TAKEN[$name]} s"; done | tee "$OUT/status.txt"
echo "gpu_suite: $OUT/gpu_suite.json and $OUT/gpu_suite.md" >&2
