#!/usr/bin/env bash
# The GPU checks of step_ros in one run, for a machine with an NVIDIA GPU and a CUDA build of
# PyTorch (TensorRT optional): the CUDA test subset, the ViT-S/14 bench with its GPU rows, and a
# torchrun job with 2 processes on one GPU.  It uses the machine's own torch: the venv sees the
# system site-packages and requirements.txt's (CPU) torch pin is left out.  About 5-10 minutes.
# Usage: bash scripts/gpu_check.sh [output folder, default runs/gpu_check]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA GPU visible to PyTorch")'
[ -x .venv-gpu/bin/python ] || python3 -m venv --system-site-packages .venv-gpu
# shellcheck disable=SC1091
. .venv-gpu/bin/activate
grep -v '^torch==' requirements.txt > "$OUT/requirements-gpu.txt"
python -m pip install -q -r "$OUT/requirements-gpu.txt"
python -m pip install -q --no-deps -e .
python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))' \
  | tee "$OUT/environment.txt"

echo "== 1/3 CUDA tests (device flow, training and evaluation on CUDA, TensorRT if installed)"
python -m pytest -q -rs test/test_devices.py test/test_scale.py test/test_deploy.py \
  -k "cuda or device or tensorrt" 2>&1 | tee "$OUT/tests.txt"

echo "== 2/3 bench: ViT-S/14 at 224, 3 exact STEP heads; GPU rows: backbone fp32/bf16/TensorRT, streaming"
python -m step_ros bench --repeat 20 --clip-repeat 1 --token-pool 1 --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"

echo "== 3/3 torchrun: 2 processes sharing GPU 0 (gloo), demo template, 2 epochs"
python -m step_ros synth --out "$OUT/synth" --train 4 --val 1 --test 1 --unknown 1
torchrun --standalone --nproc-per-node 2 -m step_ros train --manifest models/demo/template.yaml \
  --data "$OUT/synth/annotations.csv" --cache "$OUT/cache" --out "$OUT/ddp" --epochs 2 --device cuda:0 \
  2>&1 | tee "$OUT/torchrun.txt"
python -m step_ros evaluate --manifest "$OUT/ddp/manifest.yaml" --data "$OUT/synth/annotations.csv" \
  --cache "$OUT/cache" --out "$OUT/ddp/eval" --device cuda 2>&1 | tail -20 | tee -a "$OUT/torchrun.txt"
echo "gpu_check: done, results in $OUT"
