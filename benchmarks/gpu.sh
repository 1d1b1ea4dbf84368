#!/usr/bin/env bash
# The Base train step on one GPU: 224 px, bfloat16, T=1 and T=2, MBPL + SISA (the paper's block).
# Prints train images/s, MFU against the chip's bf16 peak, compile time and peak device memory,
# as benchmarks/model.py's table and JSON line. Budget: under 8 minutes (hard limit below).
# Blocks run under nn.scan (model.scan_blocks, as in the ImageNet presets) to keep compiles short.
#
#   bash benchmarks/gpu.sh                     # PEAK_TFLOPS: the chip's dense bf16 rate
#   PEAK_TFLOPS=989 BATCH=64 bash benchmarks/gpu.sh
#
# Needs a JAX with the CUDA backend in $PY (default .venv/bin/python), e.g.
#   pip install "jax[cuda12]==0.10.2"
# PEAK_TFLOPS defaults to 989, NVIDIA's dense BF16 tensor-core figure for H100/H200 SXM; set it
# for other chips, or to an empty string to use the bf16 matmul rate measured in the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BATCH=${BATCH:-64}
PEAK_TFLOPS=${PEAK_TFLOPS-989}
LIMIT_S=${LIMIT_S:-470}

backend=$("$PY" -c 'import jax; print(jax.default_backend())')
if [[ "$backend" != "gpu" && "$backend" != "cuda" && "$backend" != "rocm" ]]; then
  echo "benchmarks/gpu.sh: JAX in $PY sees backend '$backend', not a GPU." >&2
  echo "Install a CUDA JAX (pip install \"jax[cuda12]==0.10.2\") or set PY." >&2
  exit 2
fi
"$PY" -c 'import jax; print("devices:", jax.devices())'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

peak_args=()
if [[ -n "$PEAK_TFLOPS" ]]; then
  peak_args=(--peak-tflops "$PEAK_TFLOPS")
fi
# lax's grouped conv on GPU (the CPU Toeplitz/shift forms are for XLA:CPU only).
export SPIKEATCONV_DWCONV=lax
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so peak_bytes_in_use reflects the step
timeout "$LIMIT_S" "$PY" benchmarks/model.py --variant base --timesteps 1,2 --nets mbpl/sisa \
  --batch "$BATCH" --dtype bfloat16 --repeats 10 --mfu --scan-blocks "${peak_args[@]}"
