"""Side by side: our multi-step LIF vs SpikingJelly's multi-step LIF node, same shape, same CPU.

Needs torch and spikingjelly, which are NOT project requirements; use a separate venv:

  python3 -m venv /work/sjvenv
  /work/sjvenv/bin/pip install torch==2.13.0 spikingjelly jax==0.10.2 jaxlib==0.10.2 flax==0.12.8
  /work/sjvenv/bin/python benchmarks/lif_vs_spikingjelly.py

SpikingJelly side: `activation_based.neuron.LIFNode(step_mode="m")`, the multi-step LIF node
(older releases: `clock_driven.neuron.MultiStepLIFNode`), on its default torch path on CPU,
with tau=2, v_th=1, hard reset to 0, decay_input=True, detach_reset=True, ATan(alpha=2): the
settings of DESIGN.md §2. fwd+bwd is `s = node(x);
s.backward(g)` after `reset_net`. JAX side: jitted `lif_multistep` forward and `jax.vjp`
forward+backward with the same settings. The two are timed alternately in one process (so a
busy machine slows both alike); medians are reported, and the spikes of both are checked equal.

Prints a readable table and then ONE JSON line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spikeatconv_jax.snn.lif import lif_multistep  # noqa: E402

try:
  import torch
  from spikingjelly.activation_based import functional, neuron, surrogate
except ImportError as e:  # an optional extra: say how to get it instead of a traceback
  raise SystemExit(f"needs torch and spikingjelly ({e}); see this file's docstring") from None

SJ_VERSION = importlib.metadata.version("spikingjelly")


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bench_t(t: int, shape, repeats: int, warmup: int) -> list[dict]:
  """SpikingJelly and JAX timings at T=t, interleaved."""
  rows = []
  rng = np.random.default_rng(t)
  x_np = (1.0 + 1.5 * rng.standard_normal((t, *shape))).astype(np.float32)
  g_np = rng.standard_normal((t, *shape)).astype(np.float32)
  n = x_np.size

  node = neuron.LIFNode(
    tau=2.0,
    decay_input=True,
    v_threshold=1.0,
    v_reset=0.0,
    surrogate_function=surrogate.ATan(alpha=2.0),
    detach_reset=True,
    step_mode="m",
  )
  # SpikingJelly is elementwise, so layout does not matter; keep the same [T, ...] order.
  x_t = torch.from_numpy(x_np)
  g_t = torch.from_numpy(g_np)

  def sj_fwd():
    functional.reset_net(node)
    with torch.no_grad():
      return node(x_t)

  def sj_fwd_bwd():
    functional.reset_net(node)
    xr = x_t.detach().requires_grad_(True)
    s = node(xr)
    s.backward(g_t)
    return s, xr.grad

  x_j = jnp.asarray(x_np)
  g_j = jnp.asarray(g_np)
  j_fwd = jax.jit(lif_multistep)

  def _fb(x, g):
    s, vjp = jax.vjp(lif_multistep, x)
    return s, vjp(g)[0]

  j_fb = jax.jit(_fb)

  # Same spikes and (to float32 rounding) the same input gradient.
  s_sj, gx_sj = sj_fwd_bwd()
  s_j, gx_j = j_fb(x_j, g_j)
  np.testing.assert_array_equal(np.asarray(s_j), s_sj.detach().numpy())
  np.testing.assert_allclose(np.asarray(gx_j), gx_sj.numpy(), rtol=1e-5, atol=1e-6)

  cases = {
    "sj fwd": sj_fwd,
    "sj fwd+bwd": sj_fwd_bwd,
    "jax fwd": lambda: jax.block_until_ready(j_fwd(x_j)),
    "jax fwd+bwd": lambda: jax.block_until_ready(j_fb(x_j, g_j)),
  }
  for fn in cases.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in cases}
  for _ in range(repeats):  # interleaved
    for k, fn in cases.items():
      times[k].append(_time(fn))
  med = {k: statistics.median(v) for k, v in times.items()}
  for mode in ("fwd", "fwd+bwd"):
    sj, jx = med[f"sj {mode}"], med[f"jax {mode}"]
    rows.append(
      dict(
        T=t,
        mode=mode,
        sj_ms=sj * 1e3,
        jax_ms=jx * 1e3,
        sj_elements_per_s=n / sj,
        jax_elements_per_s=n / jx,
        speedup=sj / jx,
      )
    )

  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--timesteps", default="1,2,4")
  ap.add_argument("--shape", default="32,32,32,64", help="B,H,W,C (channels-last for JAX)")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args(argv)
  shape = tuple(int(s) for s in args.shape.split(","))

  rows = []
  for t in (int(v) for v in args.timesteps.split(",")):
    rows.extend(bench_t(t, shape, args.repeats, args.warmup))

  malloc_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
  print(
    f"LIF [T, {', '.join(map(str, shape))}] float32, median of {args.repeats} (interleaved); "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads), spikingjelly "
    f"{SJ_VERSION}, jax {jax.__version__}; "
    f"malloc env: {malloc_env or 'glibc defaults'}"
  )
  hdr = (
    f"{'T':>2} {'mode':>8} {'SJ ms':>8} {'JAX ms':>8} {'SJ Melem/s':>11} {'JAX Melem/s':>12} "
    f"{'x':>6}"
  )
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    print(
      f"{r['T']:>2} {r['mode']:>8} {r['sj_ms']:8.2f} {r['jax_ms']:8.2f} "
      f"{r['sj_elements_per_s'] / 1e6:11.1f} {r['jax_elements_per_s'] / 1e6:12.1f} "
      f"{r['speedup']:6.2f}"
    )
  print(
    json.dumps(
      dict(
        benchmark="lif_vs_spikingjelly",
        shape=[None, *shape],
        repeats=args.repeats,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        spikingjelly=SJ_VERSION,
        jax=jax.__version__,
        malloc_env=malloc_env,
        results=rows,
      )
    )
  )


if __name__ == "__main__":
  main()
