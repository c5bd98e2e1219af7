#!/usr/bin/env bash
# The GPU benchmark as one prepared device call (bench/freeze.py --gpu: yolov5s, imgsz 640,
# batch 32, AMP), for a session that is lent a GPU machine:
#
#   make device-wheels        # here, once: wheels the device image lacks -> .device-wheels/
#   device run: bash bench/gpu.sh      carry: [".device-wheels"]      timeout_s: 540
#
# Arguments go on to bench/freeze.py (e.g. --depths 0,24 to save time).
#
# The device image brings its own python3 with PyTorch, torchvision, numpy, Pillow, OpenCV, PyYAML,
# prometheus-client, tqdm, psutil and nvidia-ml-py; pycocotools comes from .device-wheels.
# The figures land in $OUT (or bench/results/ when run elsewhere): copy freeze-gpu.json and
# freeze-gpu.md into bench/results/ and list the run in bench/results/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
if ! python3 -c "import pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links .device-wheels --target /tmp/finetune-deps pycocotools
  export PYTHONPATH="/tmp/finetune-deps"
fi
export PYTHONPATH="$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-bench.log"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$out/gpu-bench.log"
# 2048 training images: at GPU speed a 160-image epoch is a handful of batches, too short
# to time. The trainer's own output goes to the log; the summary table to stdout.
python3 bench/freeze.py --gpu --images 2048 --out "$out" "$@" >> "$out/gpu-bench.log" 2>&1 || {
  tail -40 "$out/gpu-bench.log"; exit 1; }
cat "$out/freeze-gpu.md"
