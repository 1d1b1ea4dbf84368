"""Per-block rematerialisation whose recomputation waits for the block's output cotangent.

`jax.checkpoint` keeps only a block's inputs and recomputes the rest in the backward pass. It
orders that recomputation after the block's incoming cotangent with an HLO optimization barrier
over (saved inputs, cotangent). XLA:CPU expands optimization barriers early in its pipeline, so
its scheduler is then free to run every block's recomputation at the start of the backward pass,
and all recomputed activations are live at once: a checkpointed train step then needs as much
memory as an unchecked one (tests/test_remat.py measures it).

`remat` wraps `jax.checkpoint` in a `jax.custom_vjp` whose backward adds `0 * ct[0]` (one element
of the output cotangent, times zero) to every floating-point residual before the recomputation.
XLA does not fold a floating-point multiply by zero (NaN semantics), so this is a data dependency
every backend keeps: block b's recomputation cannot start before block b+1's backward is done.
The extra cost is one elementwise pass over the saved inputs and the block's parameters. A
non-finite cotangent element turns the block's gradients into NaN (they would not be finite
anyway); the train loop stops on a non-finite loss or gradient.

`remat(ModuleClass, static_argnums=...)` is a drop-in for `nn.remat` (same module names and
variable trees; `static_argnums` counts `self`, as for `nn.remat`). Inside `nn.scan` plain
`nn.remat` is enough: the scan's loop already orders each step's recomputation.

What a rematerialised block keeps besides its inputs is `model.remat_policy` (`POLICIES`):
"full" keeps nothing else; "save_spikes" also keeps every SPK output (the values named
`SPIKES` by `name_spikes`), so the backward recomputes each layer from the spikes before it
(conv, norm, LIF) instead of the whole block from its input.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import lift
from flax.linen import transforms as nn_transforms
from jax.ad_checkpoint import checkpoint_name

SPIKES = "spikes"  # the checkpoint name of SPK outputs
POLICIES = ("full", "save_spikes")


def check_policy(name: str) -> None:
  if name not in POLICIES:
    raise ValueError(f"unknown model.remat_policy {name!r}; known: {', '.join(POLICIES)}")


def policy(name: str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy of a `model.remat_policy` value (None: save nothing)."""
  check_policy(name)
  if name == "full":
    return None
  return jax.checkpoint_policies.save_only_these_names(SPIKES)


_REMATERIALISED = contextvars.ContextVar("rematerialised", default=False)


@contextlib.contextmanager
def rematerialised(active: bool = True) -> Iterator[None]:
  """Marks the modules traced inside the block as rematerialised by `model.remat` (the models
  wrap their rematerialised stem and blocks in it)."""
  token = _REMATERIALISED.set(bool(active) or _REMATERIALISED.get())
  try:
    yield
  finally:
    _REMATERIALISED.reset(token)


def inside_rematerialised() -> bool:
  """Whether the caller is being traced inside a block that `model.remat` rematerialises: its
  backward recomputes the block's forward anyway, so a layer's own recomputation would only
  repeat it."""
  return _REMATERIALISED.get()


def name_spikes(x: jax.Array) -> jax.Array:
  """The identity; names an SPK output for the "save_spikes" policy."""
  return checkpoint_name(x, SPIKES)


def _anchor(ct: Any) -> jax.Array | None:
  """A zero scalar computed from the first non-empty floating-point cotangent leaf."""
  for leaf in jax.tree_util.tree_leaves(ct):
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size:
      return leaf.reshape(-1)[0] * 0
  return None


def _tie(leaf: jax.Array, zero: jax.Array) -> jax.Array:
  """`leaf`, made to depend on `zero` (a data-dependent 0). Integer leaves (PRNG keys, counters)
  are tied too: otherwise e.g. a dropout mask, computed from the key alone, could be hoisted."""
  if jnp.issubdtype(leaf.dtype, jnp.inexact):
    return leaf + zero.astype(leaf.dtype)
  if jnp.issubdtype(leaf.dtype, jnp.integer) or leaf.dtype == jnp.bool_:
    return jnp.where(zero != 0, jnp.zeros_like(leaf), leaf)  # zero is 0: leaf itself
  return leaf  # e.g. typed PRNG keys: left as they are


def after_cotangent(fun: Callable[..., Any]) -> Callable[..., Any]:
  """`fun` with a VJP whose residuals depend on the output cotangent (see module docstring).

  Meant for `jax.checkpoint(f)`: its residuals are just f's inputs, and everything the
  backward pass recomputes from them then waits for the cotangent."""

  @jax.custom_vjp
  def tied(*args):
    return fun(*args)

  def fwd(*args):
    return jax.vjp(fun, *args)

  def bwd(vjp_fn, ct):
    zero = _anchor(ct)
    if zero is not None:
      leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
      leaves = [_tie(leaf, zero) for leaf in leaves]
      vjp_fn = jax.tree_util.tree_unflatten(treedef, leaves)
    return vjp_fn(ct)

  tied.defvjp(fwd, bwd)
  return tied


def _lifted_remat(
  fn: Callable[..., Any],
  static_argnums: Sequence[int] = (),
  prevent_cse: bool = True,
  policy: Callable[..., bool] | None = None,
) -> Callable[..., Any]:
  """flax.core.lift.checkpoint with the cotangent-ordered VJP (all collections and rngs)."""
  static = frozenset(static_argnums)

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    def rematted(variable_groups, rng_groups, *dynamic):
      it = iter(dynamic)
      full = [args[i] if i in static else next(it) for i in range(len(args))]
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *full)
      return y, repack_fn(scope)

    dynamic = [a for i, a in enumerate(args) if i not in static]
    f = after_cotangent(jax.checkpoint(rematted, prevent_cse=prevent_cse, policy=policy))
    return f(variable_groups, rng_groups, *dynamic)

  return lift.pack(inner, (True,), (True,), (True,), name="remat")


def remat(
  target: Any,
  static_argnums: int | Sequence[int] = (),
  prevent_cse: bool = True,
  policy: Callable[..., bool] | None = None,
) -> Any:
  """Like `nn.remat(target, static_argnums=..., policy=...)`, with the recomputation ordered
  after the output cotangent. `static_argnums` counts `self` (argument 0) and must include every
  Python-valued argument (e.g. `train`); keyword arguments are not supported."""
  if isinstance(static_argnums, int):
    static_argnums = (static_argnums,)
  if any(i < 1 for i in static_argnums):
    raise ValueError(f"static_argnums count self as 0; got {tuple(static_argnums)}")
  return nn_transforms.lift_transform(
    _lifted_remat,
    target,
    static_argnums=tuple(i - 1 for i in static_argnums),
    prevent_cse=prevent_cse,
    policy=policy,
  )
