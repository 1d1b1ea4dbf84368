"""The "xla_cpu" table's `materialize` and `materialize_cotangent`: fusion barriers.

XLA:CPU copies a cheap elementwise producer into every fusion that consumes it, and fuses it
into a consumer even when that consumer is a transpose, then evaluates the producer in the
transpose's strided order. Two places in the model pay for that:

- A LIF's input gradient (summed over MBPL's K branches) feeds the three fusions of the
  BatchNorm backward before it, so each of them recomputed it from the K branch cotangents,
  after K more fusions had stored the surrogate derivatives. Held by `materialize_cotangent`,
  it is one fusion and one buffer (about a quarter less compiled temporary memory in the tiny
  spiking train step).
- An SPK output feeding attention's grid/block partition became a fusion that ran the LIF step
  in the transpose's strided order; in the backward the partition's transposed cotangent was
  read in strided order, several times over, by the LIF backward. Behind `materialize` (value
  and cotangent) the SPK output is one contiguous elementwise pass and the partition a copy.

Both hold their value with `native.fusion_barrier`, a no-op custom call whose result aliases its
operand. Without the native library they are the identity. The backward of
`materialize_cotangent` is not itself differentiable on CPU (no second-order gradients).
"""

from __future__ import annotations

import jax

from spikeatconv_jax.xla_cpu import native


def _hold(x: jax.Array) -> jax.Array:
  return native.fusion_barrier(x) if native.available() else x


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """The identity; its backward computes the cotangent of `x` once, into a buffer."""
  return x


def _materialize_cotangent_fwd(x):
  return x, None


def _materialize_cotangent_bwd(_, g):
  return (_hold(g),)


materialize_cotangent.defvjp(_materialize_cotangent_fwd, _materialize_cotangent_bwd)


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """The identity; `x`, and in the backward its cotangent, are each computed once into a buffer
  in their own layout."""
  return _hold(x)


def _materialize_fwd(x):
  return materialize(x), None


materialize.defvjp(_materialize_fwd, _materialize_cotangent_bwd)
