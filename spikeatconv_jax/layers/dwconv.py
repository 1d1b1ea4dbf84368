"""Depthwise 2-D convolution, NHWC, with a channel multiplier.

`depthwise_conv2d(x, kernel)` maps x [N, H, W, C] and kernel [kh, kw, C, M] to
[N, H', W', C*M] (output channel c*M + m, lax's grouped-conv order), SAME padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def depthwise_conv2d_lax(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Reference: lax.conv_general_dilated with feature_group_count=C."""
  kh, kw, c, m = kernel.shape
  return lax.conv_general_dilated(
    x,
    kernel.reshape(kh, kw, 1, c * m),
    window_strides=tuple(strides),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
  )


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Depthwise conv; picks the fastest implementation for the current backend."""
  return depthwise_conv2d_lax(x, kernel, strides)


class DepthwiseConv(nn.Module):
  """Depthwise conv [N, H, W, C] -> [N, H', W', C*multiplier], SAME padding, optional bias."""

  kernel_size: int = 7
  multiplier: int = 1
  strides: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.truncated_normal(0.02)

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    k = self.param(
      "kernel",
      self.kernel_init,
      (self.kernel_size, self.kernel_size, c, self.multiplier),
      self.param_dtype,
    )
    y = depthwise_conv2d(x.astype(self.dtype), k.astype(self.dtype), (self.strides,) * 2)
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (c * self.multiplier,), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y
