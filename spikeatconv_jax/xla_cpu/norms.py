"""The "xla_cpu" table's LayerNorms: nn.LayerNorm's parameters and values, with hand-written
backward passes for XLA:CPU.

`CPULayerNorm` is the table's `layer_norm`; `CPUScaledLayerNorm` (γ ⊙ LayerNorm(x + shift), MBPL's
merge tail) its `scaled_layer_norm`. Both keep only the input and two per-row statistics for the
backward pass, in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _row_stats(u, eps):
  """Mean and 1/std over the last axis (two-pass variance), kept with a trailing 1."""
  mu = jnp.mean(u, -1, keepdims=True)
  uc = u - mu
  return mu, lax.rsqrt(jnp.mean(uc * uc, -1, keepdims=True) + eps)


def _normalised_input_grad(dy, xh, r, g):
  """LayerNorm's input gradient for the output cotangent dy, normalised input xh, 1/std r and
  per-channel scale g. The two channel means it needs are mat-vecs with the scale: written as
  sums of dy·g, XLA:CPU's YNNPACK reductions first write the scale broadcast to the full
  [..., C] map (they take no broadcast operand)."""
  m1 = (dy @ g)[..., None] / xh.shape[-1]
  m2 = ((dy * xh) @ g)[..., None] / xh.shape[-1]
  return r * (dy * g - m1 - xh * m2)


def _layer_norm_fwd(x, scale, bias, eps):
  xf = _f32(x)
  mu, r = _row_stats(xf, eps)
  y = (xf - mu) * r * _f32(scale) + _f32(bias)
  return y, (x, mu, r, scale)


def _layer_norm_bwd(eps, res, dy):
  x, mu, r, scale = res
  dy = _f32(dy)
  xh = (_f32(x) - mu) * r
  axes = tuple(range(x.ndim - 1))
  dx = _normalised_input_grad(dy, xh, r, _f32(scale))
  # scale and bias share param_dtype (CPULayerNorm), so the scale's dtype serves both.
  dscale, dbias = jnp.sum(dy * xh, axes), jnp.sum(dy, axes)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scaled_layer_norm(x, shift, scale, bias, gamma, eps):
  return _scaled_layer_norm_fwd(x, shift, scale, bias, gamma, eps)[0]


def _scaled_layer_norm_fwd(x, shift, scale, bias, gamma, eps):
  u = _f32(x) + _f32(shift)
  mu, r = _row_stats(u, eps)
  y = ((u - mu) * r * _f32(scale) + _f32(bias)) * _f32(gamma)
  return y, (x, shift, mu, r, scale, bias, gamma)


def _scaled_layer_norm_bwd(eps, res, dy):
  """With x̂ the normalised input, A = Σ dy and B = Σ dy·x̂ over all but the channel axis give
  all three parameter gradients: d(scale) = γ·B, d(bias) = γ·A, dγ = scale·B + bias·A. The
  input gradient is the LayerNorm's with the scale γ·scale, and the shift's is its sum."""
  x, shift, mu, r, scale, bias, gamma = res
  dy = _f32(dy)
  xh = (_f32(x) + _f32(shift) - mu) * r
  axes = tuple(range(x.ndim - 1))
  a, b = jnp.sum(dy, axes), jnp.sum(dy * xh, axes)
  dx = _normalised_input_grad(dy, xh, r, _f32(gamma) * _f32(scale))
  return (
    dx.astype(x.dtype),
    jnp.sum(dx, axes).astype(shift.dtype),
    (_f32(gamma) * b).astype(scale.dtype),
    (_f32(gamma) * a).astype(bias.dtype),
    (_f32(scale) * b + _f32(bias) * a).astype(gamma.dtype),
  )


_scaled_layer_norm.defvjp(_scaled_layer_norm_fwd, _scaled_layer_norm_bwd)


class CPULayerNorm(nn.Module):
  """nn.LayerNorm over the last axis (same parameters, "scale" and "bias", and the same result
  up to float32 rounding) with a hand-written backward for XLA:CPU: it keeps the input and two
  per-row statistics, and takes the input gradient's channel means as mat-vecs with the scale
  (autodiff of nn.LayerNorm keeps float32 copies of the centred and normalised input, and its
  reductions take no broadcast operand). Statistics are float32 whatever the input dtype;
  two-pass variance."""

  epsilon: float = 1e-6
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones

  def _params(self, x: jax.Array):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return scale, bias, self.dtype or jnp.promote_types(x.dtype, self.param_dtype)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias, dtype = self._params(x)
    return _layer_norm(x, scale, bias, float(self.epsilon)).astype(dtype)


class CPUScaledLayerNorm(CPULayerNorm):
  """γ ⊙ LayerNorm(x + shift): CPULayerNorm's parameters (so checkpoints are the same as for a
  CPULayerNorm of that name), with the shift and the per-channel γ passed in, as one custom VJP.

  It is MBPL's merge tail (merge bias, LayerNorm, layer scale). Written as three ops, its
  backward took four per-channel reductions over the whole map (the LayerNorm's scale and bias
  gradients, γ's, the shift's); here two reductions give the three parameter gradients, and the
  γ product's cotangent map is never written."""

  @nn.compact
  def __call__(self, x: jax.Array, *, shift: jax.Array, gamma: jax.Array) -> jax.Array:
    scale, bias, dtype = self._params(x)
    return _scaled_layer_norm(x, shift, scale, bias, gamma, float(self.epsilon)).astype(dtype)
