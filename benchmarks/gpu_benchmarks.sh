#!/bin/bash
# The accelerator part of BENCHMARKS.md (issues 11, 35) as ONE markdown table, in under 10
# minutes on one GPU: DeiT-Base and DeiT-Large train step in bf16 (ms, images/s, MFU against the
# bf16 matmul rate measured in the same run and against a given peak, planned memory without /
# with remat, the largest batch), sampling S = 10 with K = 1 and 16, and the same network in
# PyTorch eager and torch.compile. Each piece runs in a process with a time limit; a piece that
# fails or runs out of time says so in its rows (benchmarks/gpu_table.py).
#
# Needs jax with CUDA, flax, optax, ml_collections and, for the PyTorch rows, torch (without it
# those rows say 'not installed'); not TensorFlow.
#   bash benchmarks/gpu_benchmarks.sh [--toy] [out_dir]
#     --toy (or GPU_BENCH_TOY=1): ViT-micro at 32 px, batch 2: the whole table on a CPU in a
#     minute or two, to check the plumbing.
#   PYTHON=python3 (default), PEAK_TFLOPS=989 (H100/H200 SXM dense bf16; --toy: 1),
#   BUDGET_S=540 (all pieces together; --toy: 1200, an upper bound for a loaded CPU).
# Writes <out>/gpu_table.md (and .json, one .log per piece); prints the table.
set -u
toy=${GPU_BENCH_TOY:-}
if [ "${1:-}" = "--toy" ]; then
  toy=1
  shift
fi
out=${1:-runs/gpu_benchmarks}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__)'

args=(--out="$out" --python="$python")
if [ -n "$toy" ]; then
  args+=(--toy)
fi
if [ -n "${PEAK_TFLOPS:-}" ]; then
  args+=(--peak_tflops="$PEAK_TFLOPS")
fi
if [ -n "${BUDGET_S:-}" ]; then
  args+=(--budget_s="$BUDGET_S")
fi
exec "$python" benchmarks/gpu_table.py "${args[@]}"
