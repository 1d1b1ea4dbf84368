#!/usr/bin/env bash
# The Base train step on one GPU: 224 px, bfloat16, T=1 and T=2, MBPL + SISA (the paper's block).
# Prints train images/s, MFU against the chip's bf16 peak, compile time and peak device memory,
# as benchmarks/model.py's table and JSON line. Budget: under 8 minutes (LIMIT_S, below).
# Blocks run under nn.scan (model.scan_blocks, as in the ImageNet presets) to keep compiles short.
#
#   bash benchmarks/gpu.sh                     # PEAK_TFLOPS: the chip's dense bf16 rate
#   PEAK_TFLOPS=989 BATCH=32 BATCH_T2=16 bash benchmarks/gpu.sh
#
# Steps, each cut off at what is left of LIMIT_S:
#   1. the T=1 train step at BATCH (default 32), 2. the T=2 step at BATCH_T2 (default 16: at
#      batch 32, T=1 alone held 61 GB with lax on an H200). Each also profiles one more step and
#      lists its 25 most expensive kernels (model.py --profile-top).
#   3. benchmarks/dwconv.py on base's stride-1 depthwise shapes (DWCONV_CASES="" for all),
#      bfloat16: lax's grouped conv, the shift form and what the models run on GPU (`auto` =
#      lax_taps, the portable hook table's form: no batch-grouped convolution in the backward).
#
# Needs a JAX with the CUDA backend in $PY (default .venv/bin/python), e.g.
#   pip install "jax[cuda12]==0.10.2"
# plus flax, optax and ml_collections (tensorflow is not needed). On a machine without a package
# index, bring the missing ones as wheels (e.g. `pip download --no-deps ml_collections==1.1.0`)
# and install them with `pip install --no-index --target DIR` plus PYTHONPATH=DIR.
# PEAK_TFLOPS defaults to 989, NVIDIA's dense BF16 tensor-core figure for H100/H200 SXM; set it
# for other chips, or to an empty string to use the bf16 matmul rate measured in the run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BATCH=${BATCH:-32}
BATCH_T2=${BATCH_T2:-16}
PEAK_TFLOPS=${PEAK_TFLOPS-989}
LIMIT_S=${LIMIT_S:-470}

backend=$("$PY" -c 'import jax; print(jax.default_backend())')
if [[ "$backend" != "gpu" && "$backend" != "cuda" && "$backend" != "rocm" ]]; then
  echo "benchmarks/gpu.sh: JAX in $PY sees backend '$backend', not a GPU." >&2
  echo "Install a CUDA JAX (pip install \"jax[cuda12]==0.10.2\") or set PY." >&2
  exit 2
fi
"$PY" -c 'import jax; print("devices:", jax.devices(), "jax", jax.__version__)'
if ! "$PY" -c 'import flax, optax, ml_collections' 2>/dev/null; then
  echo "benchmarks/gpu.sh: $PY lacks flax, optax or ml_collections (pip install -r requirements.txt," >&2
  echo "or carry them as wheels)." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

peak_args=()
if [[ -n "$PEAK_TFLOPS" ]]; then
  peak_args=(--peak-tflops "$PEAK_TFLOPS")
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so peak_bytes_in_use reflects the step
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
left() { local s=$((LIMIT_S - SECONDS)); echo $((s > 1 ? s : 1)); }  # timeout 0 would mean none

for spec in "1 $BATCH" "2 $BATCH_T2"; do
  read -r t b <<<"$spec"
  timeout "$(left)" "$PY" benchmarks/model.py --variant base --timesteps "$t" --nets mbpl/sisa \
    --batch "$b" --dtype bfloat16 --repeats 10 --mfu --scan-blocks --train-only --profile-top 25 \
    "${peak_args[@]}" || echo "benchmarks/gpu.sh: T=$t stopped (rc $?)" >&2
done
timeout "$(left)" "$PY" benchmarks/dwconv.py --models base --dtype bfloat16 --repeats 5 \
  --warmup 1 --cases "${DWCONV_CASES-block}" ||
  echo "benchmarks/gpu.sh: dwconv.py stopped (rc $?)" >&2
