#!/bin/bash
# The accelerator part of BENCHMARKS.md (issue 11) in one go: about 8 minutes on one H200.
# Needs jax with CUDA, flax, optax, ml_collections and, for the PyTorch side, torch; not
# TensorFlow. Each piece has its own time limit, so one failure leaves the others' tables.
#   bash benchmarks/gpu_benchmarks.sh [out_dir]
set -u
out=${1:-runs/gpu_benchmarks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

piece() {  # piece <name> <seconds> <command...>
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s) ==="
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  grep -E '^\||^device|^machine' "$out/$name.log" | head -40
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(),
  "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)'

# 1. Train step: FreiHAND setting (DeiT-Base 224, batch 64) in bf16 and fp32, the synthetic
#    default in bf16; MFU against the measured bf16/fp32 matmul rate and the 989 TFLOP/s peak.
piece train_step 150 python3 benchmarks/train_step.py --configs=freihand_base,synthetic \
  --dtypes=bfloat16,float32 --steps=10 --repeats=5 --peak_tflops=989 --json="$out/train_step.json"
# 2. PyTorch side by side (eager, torch.compile) on the same inputs.
piece torch_reference 170 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 python3 benchmarks/torch_reference.py --device=cuda --repeats=10
# 3. Sampling latency and throughput: S = 10, K = 1 and 16, batch 1 and 64.
piece sampling 100 python3 benchmarks/sampling.py --models=deit_base,default --steps=10 \
  --hypotheses=1,16 --batches=1,64 --compile=false --repeats=10
# 4. Memory: remat on/off and the largest batch that fits (bf16, FreiHAND setting).
piece memory 100 python3 benchmarks/train_step.py --configs=freihand_base --dtypes=bfloat16 \
  --remat=false,true --steps=5 --repeats=3 --fit_batch --json="$out/memory.json"
