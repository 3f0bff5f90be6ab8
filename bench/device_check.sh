#!/usr/bin/env bash
# The CUDA path, checked on a machine with a GPU and no imtext install: the CUDA-only tests, the
# default recipe (pretrain -> finetune -> evaluate -> export) trained on the GPU with params.yaml's
# bf16 autocast, and bench_train's loop-vs-bare-step ratio on the GPU. CI has no GPU; run it by hand
# where one is lent:
#
#   OUT=some/dir bash bench/device_check.sh [PREPARED]   (PREPARED: default artifacts/prepared)
#
# Needs python3 with torch, torchvision, numpy, Pillow, PyYAML, matplotlib, onnx, onnxruntime and
# pytest; MLflow, kfp and DVC are not used. Each step's failure is logged and the next one runs.
set -u
out=${OUT:-artifacts/device-check}
prepared=${1:-artifacts/prepared}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
log="$out/device.log"

step() {  # step NAME COMMAND...: run, time and log one step
    local name=$1 start rc
    shift
    echo "== $name: $*" | tee -a "$log"
    start=$(date +%s%N)
    "$@" >>"$log" 2>&1
    rc=$?
    echo "== $name: rc $rc in $((($(date +%s%N) - start) / 1000000)) ms" | tee -a "$log"
}
imtext() { python3 -m imtext.cli "$@"; }

step env bash -c 'nvidia-smi -L; python3 -c "import torch, onnxruntime as ort;
print(torch.__version__, torch.cuda.get_device_name(), ort.__version__, ort.get_available_providers())"'
step cuda-tests python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/unit/test_losses.py tests/unit/test_losses_methods.py
step pretrain imtext pretrain --prepared "$prepared" --out "$work/pretrain" --device cuda
step finetune imtext finetune --prepared "$prepared" --init "$work/pretrain/model.pt" \
    --out "$work/finetune" --device cuda
step evaluate imtext evaluate --model "$work/finetune/model.pt" --prepared "$prepared" \
    --out "$work/evaluate"
step export imtext export --model "$work/finetune/model.pt" --prepared "$prepared" \
    --out "$work/export"
cp "$work/finetune/history.json" "$out/finetune-history.json" 2>/dev/null
cp "$work/evaluate/metrics.json" "$out/evaluate-metrics.json" 2>/dev/null
cp "$work/evaluate/report.png" "$out/report.png" 2>/dev/null
step bench-train python3 bench/bench_train.py --prepared "$prepared" --device cuda --repeats 2 \
    --workers 1 2 4 --out "$out/train-cuda.md"
rm -rf "$work"
