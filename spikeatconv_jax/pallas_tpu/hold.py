"""The TPU table's `materialize` / `materialize_cotangent`: `lax.optimization_barrier`s.

XLA:TPU fuses a cheap producer (a norm's normalisation and casts, the grid partition's
transposes) into the operands of the dot or convolution that consumes it; its cost model then
counts the producer's inputs once per operand tile the dot reads. In grid attention the
BatchNorm'd q, k, v and their cotangents went that way: held by a barrier, each is computed
once into its own buffer (notes/2026-12-05-tpu-parts.md).
"""

from __future__ import annotations

import jax
from jax import lax


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """The identity; `x` and, in the backward, its cotangent are each computed into a buffer."""
  return lax.optimization_barrier(x)


def _materialize_fwd(x):
  return lax.optimization_barrier(x), None


def _hold_cotangent(_, g):
  return (lax.optimization_barrier(g),)


materialize.defvjp(_materialize_fwd, _hold_cotangent)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """The identity; its backward computes the cotangent of `x` into a buffer."""
  return x


materialize_cotangent.defvjp(lambda x: (x, None), _hold_cotangent)
