#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA (the device tool): tests/gpu (training on cuda, bfloat16 diffusers SD3 and
# FLUX, nccl with two GPUs, the ComfyUI nodes on the GPU) and the speed benchmark on cuda. Prints "GPU:" lines with
# what was measured and writes benchmarks/results/speed_cuda.json.
#   bash benchmarks/gpu_check.sh            (from the repository root, with .venv or the current python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tail -40
"$PY" -m sfgrpo_core.cli bench speed --device cuda --iterations 3 --out benchmarks/results/speed_cuda.json 2>&1 | tail -30
