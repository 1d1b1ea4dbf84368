"""Device mesh from the config and NamedShardings for the train state and the batch.

`config.mesh` lists (axis name, size) pairs, e.g. `(("data", -1), ("fsdp", 1))`; one size may
be -1 (all remaining devices). Axis names are "data" (required) and "fsdp" (optional).

Rules (a small registry keyed by name, chosen by `strategy`):
- "replicate": every state leaf is replicated on every device (pure data parallelism).
- "fsdp": parameters and optimizer-state leaves with at least `min_size` elements shard their
  largest dimension divisible by the "fsdp" axis size over "fsdp"; everything else replicates.
  Under jit XLA gathers the weights where they are used (ZeRO-3 style).
The batch is always sharded on its leading axis over ("data", "fsdp"), so every device holds
a distinct slice; BatchNorm then averages over the global batch (no pmap axis_name needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_spec: Sequence[Sequence[Any]], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) from `(("data", -1), ("fsdp", n))`.

  Raises:
    ValueError: for an unknown axis name, more than one -1, or sizes that do not multiply
      to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = [], []
  for item in mesh_spec:
    name, size = item
    if name not in AXES:
      raise ValueError(f"config.mesh: unknown axis {name!r}; known axes: {', '.join(AXES)}")
    if name in names:
      raise ValueError(f"config.mesh: axis {name!r} appears twice")
    names.append(name)
    sizes.append(int(size))
  if "data" not in names:
    raise ValueError(f"config.mesh must have a 'data' axis, got {tuple(mesh_spec)}")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {tuple(mesh_spec)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known < 1 or len(devices) % known:
    raise ValueError(
      f"config.mesh {tuple(mesh_spec)} does not divide the {len(devices)} available devices"
    )
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"config.mesh {tuple(mesh_spec)} has {int(np.prod(sizes))} devices, but "
      f"{len(devices)} are available; use -1 for the data axis"
    )
  # Auto axes: XLA propagates the shardings inside the step from the in/out shardings.
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types, devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"); the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def batch_size_per_step(mesh: Mesh) -> int:
  """Number of batch slices: the global batch must be a multiple of this."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
  """Shards the largest dimension divisible by `fsdp` of a big leaf; else replicates."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  # Largest first; ties go to the later (output/channel) dimension.
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for i in order:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return PartitionSpec(*spec)
  return PartitionSpec()


def _replicate_rule(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  del min_size
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def _fsdp_rule(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  fsdp = mesh.shape.get("fsdp", 1)

  def leaf(path, x):
    # Only parameters and their optimizer moments are worth sharding; step counters, rngs
    # and BatchNorm statistics are small and read by every device.
    keys = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    if keys and keys[0] in ("params", "opt_state"):
      return NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp, min_size))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


RULES: dict[str, Callable[[Any, Mesh, int], Any]] = {
  "replicate": _replicate_rule,
  "fsdp": _fsdp_rule,
}


def state_shardings(
  abstract_state: Any, mesh: Mesh, strategy: str | None = None, min_size: int = 2**14
) -> Any:
  """NamedShardings for every leaf of `abstract_state` (a pytree of ShapeDtypeStructs).

  Args:
    abstract_state: e.g. `jax.eval_shape(init)`; a TrainState whose top-level fields are
      named "params", "opt_state", ... (the FSDP rule keys on those names).
    mesh: from `make_mesh`.
    strategy: a key of `RULES`; None picks "fsdp" when the mesh has an "fsdp" axis of size
      > 1, else "replicate".
    min_size: leaves with fewer elements stay replicated under FSDP.
  """
  if strategy is None:
    strategy = "fsdp" if mesh.shape.get("fsdp", 1) > 1 else "replicate"
  if strategy not in RULES:
    raise ValueError(f"unknown sharding strategy {strategy!r}; known: {', '.join(RULES)}")
  return RULES[strategy](abstract_state, mesh, min_size)
