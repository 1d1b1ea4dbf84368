"""Depthwise conv on this backend: lax's grouped conv, the portable taps form, the XLA:CPU shift-sum
form and the `auto` choice (what the models run here: the hook table `model.kernels="auto"`
resolves to; on CPU the native XLA FFI kernels when they build, else the Toeplitz matmul for
small maps and the shift-sum above), forward and fwd+bwd.

Shapes are the ConvNeXt branches of the models (kernel 7):
  nano: dims 32/64/128/256, 32 px input -> maps 8/4/2/1, batch 64
  tiny: dims 64/128/256/512, 224 px input -> maps 56/28/14/7, batch 8
  base: dims 128/256/512/1024, 224 px input -> maps 56/28/14/7, batch 32 (for GPUs)
Per stage: the stride-1 block (C -> C) and the stride-2 stage-entry block (map 2x larger,
multiplier C/C_in; M=2 for stages 1-3, M=1 for stage 0 whose input is the stem's C_0 = dims[0]).

"fwd+bwd" is one jitted call returning the output and the gradients wrt x and kernel for a random
cotangent (the output is returned so XLA cannot drop the forward). Times are medians over
`--repeats` calls after two warm-up calls; GFLOP/s counts 2*kh*kw*N*H'*W'*C*M per pass (x3 for
fwd+bwd). Prints a table, then one JSON line.

  .venv/bin/python benchmarks/dwconv.py
  .venv/bin/python benchmarks/dwconv.py --models=tiny --dtype=bfloat16 --repeats=5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from spikeatconv_jax.layers import dwconv, ops  # noqa: E402
from spikeatconv_jax.xla_cpu import dwconv as cpu_dwconv  # noqa: E402

MODELS = {
  "nano": dict(dims=(32, 64, 128, 256), maps=(8, 4, 2, 1), batch=64),
  "tiny": dict(dims=(64, 128, 256, 512), maps=(56, 28, 14, 7), batch=8),
  "base": dict(dims=(128, 256, 512, 1024), maps=(56, 28, 14, 7), batch=32),  # benchmarks/gpu.sh
}
IMPLS = {
  "lax": dwconv.depthwise_conv2d_lax,  # the portable table's form
  "lax_taps": dwconv.depthwise_conv2d_lax_taps,
  "shift": cpu_dwconv.depthwise_conv2d_shift,
  # What the models run here: on CPU the native kernels (the Toeplitz matmul for small maps at
  # large batches); without a compiler the Toeplitz matmul below SHIFT_MIN_POSITIONS, else the
  # shift. Elsewhere lax.
  "auto": ops.get(ops.resolve("auto")).depthwise_conv2d,
}


def cases(model: str, kernel: int):
  """(name, x shape, kernel shape, stride) for every depthwise conv shape of the model."""
  spec = MODELS[model]
  b = spec["batch"]
  out = []
  for s, (dim, hw) in enumerate(zip(spec["dims"], spec["maps"])):
    c_in = spec["dims"][s - 1] if s > 0 else spec["dims"][0]  # stage 0 enters from the stem (C_0)
    out.append(
      (f"{model}/s{s}/entry", (b, 2 * hw, 2 * hw, c_in), (kernel, kernel, c_in, dim // c_in), 2)
    )
    out.append((f"{model}/s{s}/block", (b, hw, hw, dim), (kernel, kernel, dim, 1), 1))
  return out


def time_fn(fn, args, repeats: int, warmup: int) -> float:
  """Median seconds of `repeats` calls after `warmup` warm-up calls (the first compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_case(x_shape, k_shape, stride, dtype, repeats, warmup):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, x_shape, dtype)
  k = (0.02 * jax.random.normal(kk, k_shape)).astype(dtype)
  strides = (stride, stride)
  result = {}
  for name, impl in IMPLS.items():
    conv = lambda x, k, impl=impl: impl(x, k, strides)
    fwd = jax.jit(conv)
    y_shape = jax.eval_shape(conv, x, k).shape
    g = jax.random.normal(kg, y_shape, dtype)

    def fwd_bwd(x, k, g, conv=conv):
      y, vjp = jax.vjp(conv, x, k)
      return y, vjp(g)

    result[name] = dict(
      fwd_s=time_fn(fwd, (x, k), repeats, warmup),
      fwd_bwd_s=time_fn(jax.jit(fwd_bwd), (x, k, g), repeats, warmup),
    )
  n, ho, wo, cm = y_shape
  flops = 2 * k_shape[0] * k_shape[1] * n * ho * wo * cm
  return flops, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="nano,tiny")
  parser.add_argument("--kernel", type=int, default=7)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--cases", default="", help="only cases whose name contains this")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)

  rows = []
  for model in args.models.split(","):
    for name, x_shape, k_shape, stride in cases(model, args.kernel):
      if args.cases not in name:
        continue
      flops, res = bench_case(x_shape, k_shape, stride, dtype, args.repeats, args.warmup)
      row = dict(case=name, x=list(x_shape), kernel=list(k_shape), stride=stride, mflop=flops / 1e6)
      for impl, t in res.items():
        row[f"{impl}_fwd_ms"] = 1e3 * t["fwd_s"]
        row[f"{impl}_fwd_bwd_ms"] = 1e3 * t["fwd_bwd_s"]
        row[f"{impl}_fwd_gflops"] = flops / t["fwd_s"] / 1e9
        row[f"{impl}_fwd_bwd_gflops"] = 3 * flops / t["fwd_bwd_s"] / 1e9
      row["speedup_fwd"] = res["lax"]["fwd_s"] / res["shift"]["fwd_s"]
      row["speedup_fwd_bwd"] = res["lax"]["fwd_bwd_s"] / res["shift"]["fwd_bwd_s"]
      row["auto_impl"] = (
        cpu_dwconv.implementation(x_shape[1:3], x_shape[0])
        if ops.resolve("auto") == "xla_cpu"
        else "lax_taps"
      )
      row["auto_speedup_fwd_bwd"] = res["lax"]["fwd_bwd_s"] / res["auto"]["fwd_bwd_s"]
      rows.append(row)
      print(
        f"# {name}: lax/shift fwd {row['speedup_fwd']:.1f}x, fwd+bwd {row['speedup_fwd_bwd']:.1f}x;"
        f" lax/auto ({row['auto_impl']}) fwd+bwd {row['auto_speedup_fwd_bwd']:.1f}x",
        flush=True,
      )

  header = (
    f"{'case':<16}{'x':>20}{'M':>3}{'s':>3}{'lax fwd':>10}{'shift fwd':>10}{'x':>8}"
    f"{'lax f+b':>10}{'shift f+b':>10}{'x':>8}{'lax GF/s':>10}{'shift GF/s':>11}"
    f"{'auto':>8}{'auto f+b':>10}{'x':>8}"
  )
  print(
    f"depthwise conv, kernel {args.kernel}, {args.dtype}, ms = median of {args.repeats}; "
    "GF/s = fwd+bwd GFLOP/s"
  )
  print(header)
  for r in rows:
    print(
      f"{r['case']:<16}{'x'.join(map(str, r['x'])):>20}{r['kernel'][3]:>3}{r['stride']:>3}"
      f"{r['lax_fwd_ms']:>10.2f}{r['shift_fwd_ms']:>10.2f}{r['speedup_fwd']:>8.1f}"
      f"{r['lax_fwd_bwd_ms']:>10.2f}{r['shift_fwd_bwd_ms']:>10.2f}{r['speedup_fwd_bwd']:>8.1f}"
      f"{r['lax_fwd_bwd_gflops']:>10.2f}{r['shift_fwd_bwd_gflops']:>11.2f}"
      f"{r['auto_impl']:>8}{r['auto_fwd_bwd_ms']:>10.2f}{r['auto_speedup_fwd_bwd']:>8.1f}"
    )
  summary = {}
  for model in args.models.split(","):
    mine = [r for r in rows if r["case"].startswith(model + "/")]
    if not mine:
      continue
    for key in ("fwd", "fwd_bwd"):
      lax_total = sum(r[f"lax_{key}_ms"] for r in mine)
      shift_total = sum(r[f"shift_{key}_ms"] for r in mine)
      summary[f"{model}_{key}_total_speedup"] = lax_total / shift_total
      summary[f"{model}_{key}_min_speedup"] = min(r[f"speedup_{key}"] for r in mine)
    lax_total = sum(r["lax_fwd_bwd_ms"] for r in mine)
    summary[f"{model}_auto_fwd_bwd_total_speedup"] = lax_total / sum(
      r["auto_fwd_bwd_ms"] for r in mine
    )
    summary[f"{model}_auto_fwd_bwd_min_speedup"] = min(r["auto_speedup_fwd_bwd"] for r in mine)
  for k, v in summary.items():
    print(f"{k}: {v:.2f}")
  env = {
    k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD", "XLA_FLAGS"))
  }
  print(
    json.dumps(
      dict(
        benchmark="dwconv",
        backend=jax.default_backend(),
        jax=jax.__version__,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        dtype=args.dtype,
        kernel=args.kernel,
        repeats=args.repeats,
        warmup=args.warmup,
        env=env,
        summary=summary,
        rows=rows,
      )
    )
  )


if __name__ == "__main__":
  main()
