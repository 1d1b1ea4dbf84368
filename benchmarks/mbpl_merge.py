"""MBPL SPK blocks at every SPK site of a model: forward+backward time per merge.

  .venv/bin/python benchmarks/mbpl_merge.py                       # nano at 32 px, batch 128
  .venv/bin/python benchmarks/mbpl_merge.py --image-size 28 --partition 7 --merges dwconv

The site shapes [T, B, H, W, C] come from tracing the model (`configs/common.model_config`,
MBPL + SISA). Each distinct shape is timed once: a jitted `jax.grad` of sum(SPK(x)²) with respect
to the parameters and x, median of `--repeats` calls after one warm-up. A site's total weighs the
shape by how many sites have it. The merge runs in the hook table `model.kernels="auto"` picks
for this backend (on CPU the XLA:CPU wing, where SPIKEATCONV_DWCONV overrides the form). Prints
a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.common import model_config  # noqa: E402
from spikeatconv_jax import models  # noqa: E402
from spikeatconv_jax.layers import ops  # noqa: E402
from spikeatconv_jax.snn import spk as spk_lib  # noqa: E402


def site_shapes(variant, image_size, partition, batch, timesteps) -> collections.Counter:
  cfg = model_config(variant=variant, spk="mbpl", attention="sisa", timesteps=timesteps)
  cfg.attention.partition = partition
  cfg.kernels = "xla"  # only shapes are read: the portable forms trace fastest
  models.validate(cfg, image_size)
  shapes = collections.Counter()

  def icpt(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, spk_lib.SPK) and context.method_name == "__call__":
      shapes[(tuple(args[0].shape), tuple(mod.thresholds))] += 1
    return next_fun(*args, **kwargs)

  x = jnp.zeros((batch, image_size, image_size, 3))
  with nn.intercept_methods(icpt):
    jax.eval_shape(lambda: models.build(cfg).init(jax.random.PRNGKey(0), x, train=False))
  return shapes


def time_site(shape, thresholds, merge, repeats) -> float:
  module = spk_lib.SPK(kind="mbpl", thresholds=thresholds, mbpl_merge=merge)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  params = module.init(jax.random.PRNGKey(1), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1)))
  with ops.use("auto"):  # traced (by the first call) with this backend's table
    jax.block_until_ready(grad(params, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params, x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--variant", default="nano")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--partition", type=int, default=4)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--timesteps", type=int, default=1)
  ap.add_argument("--merges", default="sum,dwconv")
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)

  shapes = site_shapes(args.variant, args.image_size, args.partition, args.batch, args.timesteps)
  merges = args.merges.split(",")
  rows = []
  for (shape, th), count in sorted(shapes.items(), key=lambda kv: kv[0][0][2:]):
    row = dict(shape=list(shape), thresholds=list(th), count=count)
    for merge in merges:
      row[f"{merge}_ms"] = 1e3 * time_site(shape, th, merge, args.repeats)
    rows.append(row)
    print("# " + json.dumps(row), flush=True)
  print(
    f"MBPL SPK fwd+bwd, {args.variant} at {args.image_size} px, batch {args.batch}, "
    f"T={args.timesteps}, backend {jax.default_backend()}, ms = median of {args.repeats}"
  )
  print(f"{'site shape [T,B,H,W,C]':<28}{'sites':>6}" + "".join(f"{m + ' ms':>14}" for m in merges))
  for r in rows:
    print(
      f"{'x'.join(map(str, r['shape'])):<28}{r['count']:>6}"
      + "".join(f"{r[f'{m}_ms']:>14.2f}" for m in merges)
    )
  totals = {m: sum(r[f"{m}_ms"] * r["count"] for r in rows) for m in merges}
  print(f"{'all sites (weighted)':<28}{sum(shapes.values()):>6}"
        + "".join(f"{totals[m]:>14.1f}" for m in merges))  # fmt: skip
  print(
    json.dumps(
      dict(
        benchmark="mbpl_merge",
        backend=jax.default_backend(),
        variant=args.variant,
        image_size=args.image_size,
        batch=args.batch,
        timesteps=args.timesteps,
        load_avg=list(os.getloadavg()),
        total_ms=totals,
        rows=rows,
      )
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
