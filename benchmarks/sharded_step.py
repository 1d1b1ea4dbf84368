"""The real train step (`train.step.make_train_step`) on N host-platform CPU devices.

  .venv/bin/python benchmarks/sharded_step.py --devices 8 [--merge dwconv] [--gather]

Runs the default config's model (nano, MBPL + SISA, T=1, 28 px; `--merge` picks MBPL's merge)
with the batch sharded over a ("data", N) mesh, as `train.py` does on a pod, and times the
jitted step. `--gather` drops the native kernels' SPMD partitioning rule
(`xla_cpu.native._partitioned`): XLA then gathers each custom call's operands and runs the whole
batch on every device, as it did before the rule existed. On CPU the N devices share the
machine's cores, so this measures the partitioning, not a speed-up from more devices.

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# No jax import here: XLA_FLAGS can still be set.
from spikeatconv_jax.xla_cpu import malloc  # noqa: E402


def main() -> None:
  malloc.reexec_with_tcmalloc()
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--merge", default="dwconv", choices=["dwconv", "sum", "convnext"])
  ap.add_argument("--gather", action="store_true", help="no partitioning rule for custom calls")
  ap.add_argument("--repeats", type=int, default=8)
  args = ap.parse_args()
  # Before jax is imported.
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import numpy as np

  from configs import default
  from spikeatconv_jax import models, optim, sharding
  from spikeatconv_jax.train import state as state_lib
  from spikeatconv_jax.train import step as step_lib
  from spikeatconv_jax.xla_cpu import dwconv as cpu_dwconv
  from spikeatconv_jax.xla_cpu import native

  if args.gather:
    native._partitioned = lambda kind, arity, static: native._plain(kind, arity, static)[0]
  config = default.get_config()
  config.model.spk.mbpl_merge = args.merge
  config.batch_size = args.batch
  mesh = sharding.make_mesh(config.mesh)
  model = models.build(config.model, platform=mesh.devices.flat[0].platform)
  tx, _ = optim.make_optimizer(config, total_steps=10, steps_per_epoch=4)
  size = config.dataset.image_size
  state, shardings = state_lib.create_train_state(model, tx, (size, size, 1), mesh, config.seed)
  step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  rng = np.random.RandomState(0)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
    "image": jax.device_put(
      rng.randn(args.batch, size, size, 1).astype(np.float32), batch_sharding
    ),
    "label": jax.device_put(rng.randint(0, 10, args.batch).astype(np.int32), batch_sharding),
  }
  hlo = step.lower(state, batch, 1e-3).compile().as_text()
  t0 = time.perf_counter()
  state, m = step(state, batch, 1e-3)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, m = step(state, batch, 1e-3)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  row = dict(
    benchmark="sharded_step",
    devices=jax.device_count(),
    batch=args.batch,
    merge=args.merge,
    partition_rule=not args.gather,
    dwconv=cpu_dwconv.implementation(),
    allocator=malloc.in_use(),
    all_gathers=hlo.count("all-gather-start") + hlo.count("all-gather("),
    first_step_s=round(first, 2),
    step_ms=round(statistics.median(times) * 1e3, 1),
    step_ms_all=[round(t * 1e3, 1) for t in times],
  )
  print(json.dumps(row))
  print(f"{'devices':>8} {'batch':>6} {'merge':>8} {'rule':>5} {'all-gathers':>12} {'step ms':>8}")
  print(
    f"{row['devices']:>8} {row['batch']:>6} {row['merge']:>8} {str(row['partition_rule']):>5} "
    f"{row['all_gathers']:>12} {row['step_ms']:>8}"
  )


if __name__ == "__main__":
  main()
