#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA (the device tool): benchmarks/gpu_check.py (the mini world and tiny bfloat16
# diffusers SD3 / FLUX training on cuda: phases, peak memory), tests/gpu (nccl with two GPUs, the ComfyUI nodes on
# the GPU), SD3.5 Medium with PickScore on a card capped at 24 GiB (benchmarks/gpu_memory_24gb.py) and the speed
# benchmark on cuda. Writes benchmarks/results/gpu/, gpu_24gb_sd35m_pickscore.json and speed_cuda.json.
#   bash benchmarks/gpu_check.sh            (from the repository root, with .venv or the current python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu 2>&1 | tail -40
"$PY" -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tail -40
"$PY" -m pytest -q -p no:cacheprovider tests/e2e/test_bf16_training.py -k cuda 2>&1 | tail -40  # FLUX/SD3 in bf16
"$PY" benchmarks/gpu_memory_24gb.py --device cuda --out benchmarks/results/gpu_24gb_sd35m_pickscore.json 2>&1 | tail -10
"$PY" -m sfgrpo_core.cli bench speed --device cuda --iterations 3 --out benchmarks/results/speed_cuda.json 2>&1 | tail -30
