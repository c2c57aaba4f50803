#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests of the Triton backend
# and the CUDA benchmark (float32 and bfloat16).  Logs and JSON go to $1
# (default benchmarks/results/gpu).  Assumes torch with CUDA and triton are installed.
set -o pipefail
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python -m pytest tests/test_kernels.py -q -rs 2>&1 | tee "$out/tests.log"
python benchmarks/bench_layers.py --device cuda --configs ptb35 ptb128 large b1 --max-seconds 5 \
    --out "$out/cuda_float32.json" 2>&1 | tee "$out/bench_float32.log"
python benchmarks/bench_layers.py --device cuda --dtype bfloat16 --configs ptb35 large --cells lstm --max-seconds 5 \
    --out "$out/cuda_bfloat16.json" 2>&1 | tee "$out/bench_bfloat16.log"
