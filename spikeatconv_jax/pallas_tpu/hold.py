"""The TPU table's `materialize` / `materialize_cotangent` / `materialize_heads`:
`lax.optimization_barrier`s.

Without them XLA:TPU fused the BatchNorm'd q, k, v of grid attention (and, backward, their
float32 cotangents) and the partition's transposes into the operands of the score products,
and its cost model counted several times the bytes of computing each once into a buffer
(notes/2026-12-05-tpu-parts.md). A barrier on the value, and in the backward on its cotangent,
keeps each a buffer of its own.
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
