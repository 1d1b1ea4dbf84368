"""AdamW with linear warmup and cosine decay, a weight-decay mask and global-norm clipping.

The recipe of DESIGN.md §9: AdamW(b1, b2, eps), the learning rate rising linearly from
`warmup_init_lr` to `lr` over `warmup_epochs`, then following a cosine down to `min_lr` at the
last step; weight decay (decoupled, scaled by the learning rate as in PyTorch's AdamW) skips
biases, norm parameters, layer scales and relative-position tables when
`weight_decay_exclude` is set (MaxViT's `weight_decay_exclude`); the gradient is clipped to a
global L2 norm of `grad_clip` when that is set (timm `--clip-mode norm`).

The learning rate is applied in the train step (`apply_lr`), from the schedule evaluated on
the host, so the compiled step does not depend on the schedule; see `make_optimizer`.

The train step calls `update`: the transformation and the rate run on a grouped view of the
trees in which the small leaves (biases, norm scales, layer scales, MBPL's per-channel merge
parameters) are a few concatenated vectors (`LeafGroups`), which XLA:TPU compiles as a few
kernels instead of one per leaf. The optimizer state and the parameters keep their own trees.

Gradient accumulation is not an optax wrapper here: `train/step.py` splits the global batch
into `grad_accum_steps` micro-batches inside one jitted step and averages their gradients, so
one train step is always one optimizer update and one global batch of data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Leaf names that never get weight decay when `weight_decay_exclude` is on: biases, the
# scale of LayerNorm/BatchNorm, layer scales ("gamma", and "<x>_gamma" such as the MBPL merge's
# "merge_gamma"). Relative-position tables are matched by `_REL_POS` on any path component
# (e.g. ".../grid_attn/rel_pos/table"), since their names vary by author.
_NO_DECAY_LEAVES = frozenset({"bias", "scale", "gamma", "beta"})
_REL_POS = re.compile(r"rel(ative)?_?(pos|position|bias)|relative", re.IGNORECASE)


# Parameter leaves with fewer elements than this are updated as concatenated vectors (`update`).
GROUP_BELOW = 4096
# The top-level key of those vectors in a grouped tree: {GROUPED: {dtype: {"decay" | "no_decay":
# vector}}}, the other leaves where they were.
GROUPED = "_grouped"


def decays(path: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` (its names from the root) gets weight decay."""
  if path[0] == GROUPED:  # a vector of grouped leaves, named by their decay class
    return path[-1] == "decay"
  if path[-1] in _NO_DECAY_LEAVES or path[-1].endswith(("_gamma", "_bias")):
    return False
  return not any(_REL_POS.search(name) for name in path)


def weight_decay_mask(params: Any, exclude: bool = True) -> Any:
  """A pytree of bools like `params`: True where weight decay applies.

  Args:
    params: the "params" collection (nested dicts; abstract shapes are fine).
    exclude: False applies decay to every parameter (the CIFAR recipe of DESIGN.md §9).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  mask = {path: (decays(path) if exclude else True) for path in flat}
  return flax.traverse_util.unflatten_dict(mask)


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Number of linear-warmup steps: `warmup_epochs` worth of steps, rounded."""
  return int(round(config.warmup_epochs * steps_per_epoch))


def make_schedule(
  config: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
  """Linear warmup `warmup_init_lr -> lr`, then cosine `lr -> min_lr` at `total_steps`.

  lr(0) = warmup_init_lr, lr(warmup) = lr, lr(total_steps) = min_lr.

  Raises:
    ValueError: when the warmup does not fit before the last step, or a rate is negative.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  warm = warmup_steps(config, steps_per_epoch)
  if warm >= total_steps:
    raise ValueError(
      f"warmup_epochs={config.warmup_epochs} is {warm} steps, not fewer than the "
      f"{total_steps} training steps; lower warmup_epochs"
    )
  for name in ("lr", "warmup_init_lr", "min_lr"):
    if not config[name] >= 0:  # also catches NaN
      raise ValueError(f"config.{name} must be >= 0, got {config[name]}")
  return optax.warmup_cosine_decay_schedule(
    init_value=config.warmup_init_lr,
    peak_value=config.lr,
    warmup_steps=warm,
    decay_steps=total_steps,  # optax counts the warmup inside decay_steps
    end_value=config.min_lr,
  )


def make_optimizer(
  config: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """AdamW of the config, with the learning rate left out of the transformation.

  `tx` is [clip_by_global_norm] -> scale_by_adam(b1, b2, eps) -> add_decayed_weights(wd,
  mask): optax.adamw without its final scale_by_learning_rate. The step applies the rate,
  `params - lr * updates` (`update`, `apply_lr`), with lr = schedule(step) passed in as an
  argument.
  The result is exactly optax.adamw(schedule, ...), but the compiled train step no longer
  depends on the schedule (lr, warmup, run length), so one compiled step (and the persistent
  compilation cache) serves every run of the same model, batch and mesh.

  Returns:
    (tx, schedule): the transformation and the learning-rate schedule (step -> lr).
  """
  schedule = make_schedule(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  exclude = bool(config.weight_decay_exclude)
  parts = []
  if config.grad_clip is not None:
    if not config.grad_clip > 0:
      raise ValueError(f"config.grad_clip must be > 0 or None, got {config.grad_clip}")
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps))
  parts.append(
    optax.add_decayed_weights(
      config.weight_decay, mask=lambda params: weight_decay_mask(params, exclude)
    )
  )
  return optax.chain(*parts), schedule


class LeafGroups:
  """A fixed split of a parameter tree for the update: leaves with fewer than `below` elements
  are concatenated into one vector per (dtype, decay class); the others stay as they are.

  Why: XLA:TPU compiles each leaf's update (and its share of every global norm) as kernels of
  their own, and the paper's models have hundreds of per-channel leaves (biases, norm and layer
  scales, MBPL's merge shift/γ/LayerNorm: 753 of tiny's 967 leaves hold 1.2 % of its
  parameters). Updating them as a few vectors gives the same values (elementwise transforms;
  the global norms sum in another order) from far fewer kernels. The optimizer state keeps the
  parameters' own tree (checkpoints do not change): `update` groups and ungroups it per step.

  Args:
    params: the parameter tree (nested dicts; arrays or abstract shapes).
    exclude: `config.weight_decay_exclude`: leaves are grouped by `decays(path)` when set, all
      in one decay class when not.
    below: the element count under which a leaf is grouped (default `GROUP_BELOW`).
  """

  def __init__(self, params: Any, *, exclude: bool, below: int | None = None):
    below = GROUP_BELOW if below is None else below
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    self._treedef = jax.tree.structure(params)
    self._kept = [path for path, x in flat.items() if np.prod(x.shape) >= below]
    self._groups: dict[tuple[str, str], list[tuple[tuple[str, ...], tuple[int, ...]]]] = {}
    for path, x in flat.items():
      if np.prod(x.shape) < below:
        label = "decay" if (decays(path) if exclude else True) else "no_decay"
        key = (jnp.dtype(x.dtype).name, label)
        self._groups.setdefault(key, []).append((path, tuple(x.shape)))
    keys = self._kept + [(GROUPED, *key) for key in self._groups]
    self._grouped_treedef = jax.tree.structure(
      flax.traverse_util.unflatten_dict(dict.fromkeys(keys, 0))
    )

  def group(self, tree: Any) -> Any:
    """A tree shaped like the parameters -> the grouped tree (see the module constants)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    out = {path: flat[path] for path in self._kept}
    for key, members in self._groups.items():
      out[(GROUPED, *key)] = jnp.concatenate([flat[path].reshape(-1) for path, _ in members])
    return flax.traverse_util.unflatten_dict(out)

  def ungroup(self, grouped: Any) -> Any:
    """The inverse of `group`."""
    flat = flax.traverse_util.flatten_dict(grouped)
    out = {path: flat[path] for path in self._kept}
    for key, members in self._groups.items():
      vector, start = flat[(GROUPED, *key)], 0
      for path, shape in members:
        size = int(np.prod(shape))
        out[path] = vector[start : start + size].reshape(shape)
        start += size
    return flax.traverse_util.unflatten_dict(out)

  def _map_subtrees(self, fn, tree: Any, treedef) -> Any:
    """fn applied to every subtree of `tree` (e.g. an optax state) with structure `treedef`."""

    def matches(node):
      return jax.tree.structure(node) == treedef

    return jax.tree.map(lambda n: fn(n) if matches(n) else n, tree, is_leaf=matches)

  def group_state(self, state: Any) -> Any:
    """An optax state with every parameter-shaped part (e.g. Adam's mu, nu) grouped."""
    return self._map_subtrees(self.group, state, self._treedef)

  def ungroup_state(self, state: Any) -> Any:
    return self._map_subtrees(self.ungroup, state, self._grouped_treedef)


def update(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, lr, *, exclude: bool
) -> tuple[Any, Any, jax.Array, jax.Array]:
  """One optimizer update: (new params, new opt_state, gradient norm, new parameter norm).

  `tx` (from `make_optimizer`) runs on the grouped trees of `LeafGroups` and the rate is
  applied there (`apply_lr`); params and opt_state come back in the parameters' own tree. The
  values equal tx.update + apply_lr on the plain trees up to the global norms' float32
  summation order. `exclude` is `config.weight_decay_exclude`, as `make_optimizer` read it
  (it sorts the small leaves into the decay classes that tx's mask then sees).
  """
  groups = LeafGroups(params, exclude=exclude)
  g, p = groups.group(grads), groups.group(params)
  updates, state = tx.update(g, groups.group_state(opt_state), p)
  p = apply_lr(p, updates, lr)
  grad_norm, param_norm = optax.global_norm(g), optax.global_norm(p)
  return groups.ungroup(p), groups.ungroup_state(state), grad_norm, param_norm


def apply_lr(params: Any, updates: Any, lr) -> Any:
  """params - lr * updates (the scale_by_learning_rate step of AdamW)."""
  return jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), params, updates)


def schedule_table(schedule, total_steps: int) -> np.ndarray:
  """lr(step) for step = 0..total_steps as a float32 host array (read once per step)."""
  steps = jnp.arange(total_steps + 1)
  return np.asarray(jax.jit(jax.vmap(schedule))(steps), np.float32)
