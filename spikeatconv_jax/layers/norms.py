"""The portable ("xla") table's norms: nn.LayerNorm's and nn.BatchNorm's parameters, statistics
and values, with a backward pass that keeps only the input and per-row (LayerNorm) or
per-channel (BatchNorm) float32 statistics.

Autodiff of flax's norms keeps float32 copies of the whole map for the backward pass (the
centred input, its square, the input times 1/std): in a bf16 network these residuals are larger
than the activations themselves. Here one custom VJP (`normalize`) takes the input in its own
dtype and recomputes the normalised input from it and the statistics in the backward pass.

- `LayerNorm`: the table's `layer_norm` (statistics over the last axis).
- `ScaledLayerNorm`: γ ⊙ LayerNorm(x + shift), the table's `scaled_layer_norm` (MBPL's merge
  tail), with the LayerNorm's parameters.
- `BatchNorm`: the table's `batch_norm` (statistics over every axis but the last; running
  averages "mean" and "var" in "batch_stats" as nn.BatchNorm updates them).

Statistics use the two-pass variance (flax: E[x²] - E[x]², clipped at 0); the results agree to
float32 rounding.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _stats(x, axes):
  """float32 mean and (biased, two-pass) variance over `axes`, kept with size-1 axes."""
  xf = _f32(x)
  mu = jnp.mean(xf, axes, keepdims=True)
  xc = xf - mu
  return mu, jnp.mean(xc * xc, axes, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x, scale, bias, axes: tuple[int, ...], eps: float, dtype):
  """((x - mean) / sqrt(var + eps)) * scale + bias in `dtype`, statistics over `axes` of x in
  float32, scale and bias over x's last axis; returns (y, mean, var) (mean, var with size-1
  `axes`). The backward keeps x (its own dtype), the mean and 1/std; mean and var get no
  gradient (wrap them in `lax.stop_gradient`)."""
  return _normalize_fwd(x, scale, bias, axes, eps, dtype)[0]


def _normalize_fwd(x, scale, bias, axes, eps, dtype):
  mu, var = _stats(x, axes)
  r = lax.rsqrt(var + eps)
  y = ((_f32(x) - mu) * (r * _f32(scale)) + _f32(bias)).astype(dtype)
  return (y, mu, var), (x, mu, r, scale, bias)


def _normalize_bwd(axes, eps, dtype, res, cts):
  del eps, dtype
  x, mu, r, scale, bias = res
  dy = _f32(cts[0])  # the statistics' cotangents are dropped (see docstring)
  xh = (_f32(x) - mu) * r
  param_axes = tuple(range(x.ndim - 1))
  dyg = dy * _f32(scale)
  dx = r * (dyg - jnp.mean(dyg, axes, keepdims=True) - xh * jnp.mean(dyg * xh, axes, keepdims=True))
  dscale = jnp.sum(dy * xh, param_axes)
  dbias = jnp.sum(dy, param_axes)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _out_dtype(dtype, x, param_dtype):
  return dtype or jnp.promote_types(x.dtype, param_dtype)


class LayerNorm(nn.Module):
  """nn.LayerNorm over the last axis (parameters "scale" and "bias") whose backward keeps only
  the input and two float32 numbers per row."""

  epsilon: float = 1e-6
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  def _params(self, c: int):
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    return scale, bias

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = self._params(x.shape[-1])
    dtype = _out_dtype(self.dtype, x, self.param_dtype)
    return normalize(x, scale, bias, (x.ndim - 1,), float(self.epsilon), dtype)[0]


class ScaledLayerNorm(LayerNorm):
  """γ ⊙ LayerNorm(x + shift): LayerNorm's parameters (the same checkpoint entries as a
  LayerNorm of that name), the shift and per-channel γ passed in. γ folds into the affine
  (scale·γ, bias·γ), so the backward keeps x + shift in x's dtype and the row statistics."""

  @nn.compact
  def __call__(self, x: jax.Array, *, shift: jax.Array, gamma: jax.Array) -> jax.Array:
    scale, bias = self._params(x.shape[-1])
    dtype = _out_dtype(self.dtype, x, self.param_dtype)
    g = _f32(gamma)
    u = x + shift.astype(x.dtype)
    eps = float(self.epsilon)
    return normalize(u, _f32(scale) * g, _f32(bias) * g, (x.ndim - 1,), eps, dtype)[0]


class BatchNorm(nn.Module):
  """nn.BatchNorm over every axis but the last, with its parameters ("scale", "bias"), running
  statistics ("batch_stats": "mean", "var", float32) and update rule
  (ra = momentum·ra + (1 - momentum)·batch statistic, not during init). In training mode the
  backward keeps only the input and per-channel float32 mean and 1/std.

  Under jit with a batch-sharded input the statistics are global-batch statistics (XLA inserts
  the all-reduce), as for nn.BatchNorm without axis_name.
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    dtype = _out_dtype(self.dtype, x, self.param_dtype)
    if self.use_running_average:
      r = lax.rsqrt(ra_var.value + self.epsilon)
      y = (_f32(x) - ra_mean.value) * (r * _f32(scale)) + _f32(bias)
      return y.astype(dtype)
    axes = tuple(range(x.ndim - 1))
    y, mean, var = normalize(x, scale, bias, axes, float(self.epsilon), dtype)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean.reshape(c))
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var.reshape(c))
    return y
