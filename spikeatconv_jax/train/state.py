"""TrainState and its abstract-first construction (STYLE.md §3 habit 8).

The state is built in three moves: `jax.eval_shape(init)` gives the shapes without
allocating, `sharding.state_shardings` turns them into NamedShardings, and
`jax.jit(init, out_shardings=...)` materialises every leaf directly where it belongs. The
same abstract state (with shardings attached) is the Orbax restore target.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spikeatconv_jax import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything a restart needs besides the data position (which equals `step`).

  Attributes:
    step: int32 scalar, optimizer updates done so far.
    params: the "params" collection (float32).
    batch_stats: the BatchNorm running statistics ("batch_stats"; {} if the model has none).
    opt_state: the optax state.
    rng: a raw uint32[2] PRNG key; each step folds in `step`, so it never changes.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def init_fn(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, int, int]):
  """Returns `init(rng) -> TrainState` for `jax.eval_shape` / `jax.jit`.

  Args:
    model: the linen module of `models.build`.
    tx: the optax transformation.
    image_shape: (H, W, C) of one input image, as the data pipeline yields it.
  """

  def init(rng: jax.Array) -> TrainState:
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    # Two images: BatchNorm's init sees a batch, and the shapes do not depend on it.
    images = jnp.zeros((2, *image_shape), jnp.float32)  # [B, H, W, C]
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, images, train=False)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      rng=state_rng,
    )

  return init


def abstract_state(model, tx, image_shape, seed: int = 0) -> TrainState:
  """The TrainState's ShapeDtypeStructs, computed without allocating or compiling."""
  return jax.eval_shape(init_fn(model, tx, image_shape), jax.random.PRNGKey(seed))


def create_train_state(model, tx, image_shape, mesh, seed: int = 0) -> tuple[TrainState, Any]:
  """Builds the real state on `mesh`, every leaf created where its sharding puts it.

  Returns:
    (state, shardings): the state and its NamedSharding pytree (the jit in/out shardings).
  """
  state, shardings, _, _ = build_or_restore(model, tx, image_shape, mesh, seed=seed)
  return state, shardings


def build_or_restore(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
  mesh,
  *,
  seed: int = 0,
  ckpt: Any = None,
  step: int | None = None,
  model_config: Any = None,
) -> tuple[TrainState, Any, int, dict]:
  """The TrainState on `mesh`: restored from a checkpoint, or initialised.

  abstract state -> shardings -> restore (onto those shardings) or init (each leaf created
  where its sharding puts it). Training and evaluation both build their state here.

  Args:
    model, tx, image_shape, seed: as for `init_fn` / `abstract_state`.
    mesh: the device mesh (`sharding.make_mesh`).
    ckpt: a `checkpoint.Checkpointer`, or None to initialise.
    step: the checkpoint step to restore; None restores the newest readable one (a warning
      names each newer one that cannot be read) and initialises when there is none.
    model_config: when given, checked against the checkpoint's model config first.

  Returns:
    (state, shardings, step, meta): step 0 and meta {} for a fresh state.

  Raises:
    checkpoint.CheckpointMismatchError / CheckpointUnreadableError (ValueErrors).
  """
  shapes = abstract_state(model, tx, image_shape, seed)
  shardings = sharding_lib.state_shardings(shapes, mesh)
  if ckpt is not None:
    target = abstract_with_shardings(shapes, shardings)
    if step is not None:
      state, meta = ckpt.restore(step, target, model_config)
      return state, shardings, int(step), meta
    restored = ckpt.restore_latest_readable(target, model_config)
    if restored is not None:
      step, state, meta = restored
      return state, shardings, int(step), meta
  init = jax.jit(init_fn(model, tx, image_shape), out_shardings=shardings)
  return init(jax.random.PRNGKey(seed)), shardings, 0, {}


def abstract_with_shardings(shapes: TrainState, shardings: Any) -> TrainState:
  """ShapeDtypeStructs that carry the target shardings (the Orbax restore target)."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
