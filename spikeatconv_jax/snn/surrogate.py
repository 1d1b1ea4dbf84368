"""The spike function: Heaviside forward, surrogate gradient backward (DESIGN.md §2).

Each surrogate is registered by name with its default `alpha` and the derivative
of its smooth primitive. The forward pass is always Θ(u) = 1 for u >= 0 (note the
>=, as SpikingJelly), returned in the input dtype. Gradients are computed in
float32 and cast back, so bfloat16 inputs give finite, exact-as-possible values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """A registered surrogate: `grad(u, alpha)` is dΘ̃/du for the smooth primitive Θ̃."""

  name: str
  default_alpha: float
  grad: Callable[[jax.Array, float], jax.Array]
  doc: str


SURROGATES: dict[str, Surrogate] = {}


def register(name: str, default_alpha: float, doc: str):
  """Registers `fn(u, alpha) -> derivative` under `name`."""

  def wrap(fn):
    SURROGATES[name] = Surrogate(name, default_alpha, fn, doc)
    return fn

  return wrap


@register("atan", 2.0, "SpikingJelly ATan: primitive 1/2 + arctan(pi*alpha*u/2)/pi")
def _atan_grad(u, alpha):
  return alpha / (2.0 * (1.0 + jnp.square(math.pi / 2.0 * alpha * u)))


@register("sigmoid", 4.0, "SpikingJelly Sigmoid: primitive sigmoid(alpha*u)")
def _sigmoid_grad(u, alpha):
  # σ(αu)(1-σ(αu)) written as σ(αu)·σ(-αu): both factors come from jax.nn.sigmoid, which
  # never overflows, so there is no inf/inf at large |u| (snntorch issue #427).
  z = alpha * u
  return alpha * jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)


@register("triangle", 1.0, "piecewise linear: alpha * max(0, 1 - alpha*|u|), unit area")
def _triangle_grad(u, alpha):
  return alpha * jnp.maximum(0.0, 1.0 - alpha * jnp.abs(u))


@register("rectangular", 1.0, "boxcar: alpha on |u| < 1/(2 alpha), unit area")
def _rectangular_grad(u, alpha):
  return jnp.where(jnp.abs(u) < 0.5 / alpha, alpha, 0.0).astype(u.dtype)


@register("fast_sigmoid", 1.0, "SuperSpike: 1 / (1 + alpha*|u|)^2, peak 1")
def _fast_sigmoid_grad(u, alpha):
  return 1.0 / jnp.square(1.0 + alpha * jnp.abs(u))


def get_surrogate(name: str) -> Surrogate:
  """Returns the registered surrogate `name`, or raises a ValueError listing the known ones."""
  try:
    return SURROGATES[name]
  except KeyError:
    raise ValueError(
      f"unknown surrogate {name!r}; known surrogates: {', '.join(sorted(SURROGATES))}"
    ) from None


def resolve_alpha(surrogate: str, alpha: float | None) -> float:
  """`alpha`, or the surrogate's default when it is None."""
  s = get_surrogate(surrogate)
  return float(s.default_alpha if alpha is None else alpha)


def surrogate_grad(u: jax.Array, surrogate: str = "atan", alpha: float | None = None) -> jax.Array:
  """dΘ̃/du of the named surrogate, computed in float32."""
  return get_surrogate(surrogate).grad(u.astype(jnp.float32), resolve_alpha(surrogate, alpha))


def heaviside(u: jax.Array) -> jax.Array:
  """Θ(u) = 1 where u >= 0, else 0, in u's dtype."""
  return (u >= 0).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _spike(u, surrogate, alpha):
  return heaviside(u)


def _spike_fwd(u, surrogate, alpha):
  return heaviside(u), u


def _spike_bwd(surrogate, alpha, u, g):
  return ((g.astype(jnp.float32) * surrogate_grad(u, surrogate, alpha)).astype(u.dtype),)


_spike.defvjp(_spike_fwd, _spike_bwd)


def spike(u: jax.Array, surrogate: str = "atan", alpha: float | None = None) -> jax.Array:
  """Heaviside spike of a membrane-minus-threshold input `u`, with a surrogate gradient.

  Args:
    u: H - V_th, any shape and floating dtype.
    surrogate: a registered surrogate name (see `SURROGATES`).
    alpha: the surrogate's sharpness; None means its default (atan 2, sigmoid 4).

  Returns:
    0/1 spikes in `u`'s dtype and shape.
  """
  return _spike(u, surrogate, resolve_alpha(surrogate, alpha))
