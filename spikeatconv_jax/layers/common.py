"""Shared model pieces: time folding, DropPath, LayerScale, norm and init defaults, exact GELU,
and the layer factories (dense, conv, LayerNorm) whose products and norms come from the active
hook table (`layers.ops`: portable forms, or the XLA:CPU wing's).

Layout conventions (DESIGN.md §1): activations are [T, B, H, W, C] (or [T, B, N, C]);
stateless ops run on the merged T·B axis, only the LIF scans over T.

Every module that owns weight layers also declares `ENERGY_SOURCES`: for each of its weight
layers (by submodule name) where that layer's input comes from. `spikeatconv_jax.energy`
reads it to decide MAC vs AC and which SPK site's firing rate applies (DESIGN.md §10), so
the energy count follows the code instead of a parallel hand formula. A source is the name
of a sibling SPK module, or one of the markers below; "a|b" means "a if a is an SPK site in
this build (e.g. `stem_act='spk'`), else b".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from spikeatconv_jax.layers import ops
from spikeatconv_jax.layers import remat as remat_lib

Dtype = Any

# Energy source markers (see module docstring).
SRC_IMAGE = "image"  # the static input image: MAC, counted once
SRC_REAL_ONCE = "real_once"  # real input computed once (before the broadcast over T): MAC once
SRC_REAL = "real"  # real-valued input at every step: MAC x T
SRC_INPUT = "input"  # the owning module's input: the last SPK site that ran before it was called

KERNEL_INIT = nn.initializers.truncated_normal(0.02)
BIAS_INIT = nn.initializers.zeros
LN_EPS = 1e-6
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
BN_EPS = 1e-5
LAYER_SCALE_INIT = 1e-6


def fold(x: jax.Array) -> jax.Array:
  """[T, B, ...] -> [T*B, ...]."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold(x: jax.Array, t: int) -> jax.Array:
  """[T*B, ...] -> [T, B, ...]."""
  if x.shape[0] % t:
    raise ValueError(f"leading axis {x.shape[0]} is not a multiple of T={t}")
  return x.reshape((t, x.shape[0] // t) + x.shape[1:])


def sum_leading(x: jax.Array) -> jax.Array:
  """jnp.sum(x, axis=0) in the active table's form."""
  return ops.current().sum_leading(x)


def add_broadcast(x: jax.Array, b: jax.Array) -> jax.Array:
  """x + b (in x's dtype) for b broadcast over x's leading axes (b.shape == x.shape[-b.ndim:]),
  e.g. attention's relative-position bias [h, N, N] added to the scores [G, h, N, N]."""
  return ops.current().add_broadcast(x, b)


def repeat_time(x: jax.Array, t: int) -> jax.Array:
  """[B, ...] -> [T, B, ...], x repeated over T steps (direct encoding: what is computed once
  before the first SPK)."""
  return ops.current().repeat_time(x, t)


def materialize(x: jax.Array) -> jax.Array:
  """The identity; marks a value (and its cotangent) to be computed once into its own buffer,
  e.g. an SPK output before attention's partition transposes (`ops` hook)."""
  return ops.current().materialize(x)


def materialize_heads(x: jax.Array) -> jax.Array:
  """The identity; attention's partitioned q/k/v, where a table may hold them (`ops` hook)."""
  return ops.current().materialize_heads(x)


def materialize_cotangent(x: jax.Array) -> jax.Array:
  """The identity; marks the cotangent of `x` to be computed once into its own buffer, e.g. a
  LIF input whose gradient sums several branches (`ops` hook)."""
  return ops.current().materialize_cotangent(x)


def recompute_spikes(fn):
  """`fn(module, x, ...)`, which makes spikes from x and consumes them, with the same values
  and gradients; the table decides whether the backward keeps the spikes or recomputes them
  from x (`ops` hook). Inside a block that `model.remat` rematerialises, `fn` itself: the
  block's recomputation already covers it, and a nested checkpoint would only repeat it in a
  larger program."""
  if remat_lib.inside_rematerialised():
    return fn
  return ops.current().recompute_spikes(fn)


_INV_SQRT2 = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x·Φ(x), written with erf rather than `jax.nn.gelu`'s erfc.

  The two agree to float32 rounding in absolute terms (the erf form loses relative accuracy
  only where |GELU(x)| < 1e-6, for x < -5). XLA:CPU's f32 erfc costs about 3× its erf.
  """
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense, in the active table's form."""
  return ops.current().dense_dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )


def conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs):
  """`lax.conv_general_dilated` for nn.Conv, in the active table's form."""
  return ops.current().conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)


def dense(features: int, *, use_bias: bool, dtype: Dtype, name: str) -> nn.Dense:
  """Linear layer with the spec's init (truncated normal 0.02, zero bias, f32 params)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=KERNEL_INIT,
    bias_init=BIAS_INIT,
    dot_general=dense_dot_general,
    name=name,
  )


def conv(
  features: int, kernel: int, *, strides: int = 1, use_bias: bool, dtype: Dtype, name: str
) -> nn.Conv:
  """Dense 2-D conv, SAME padding, spec init."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(strides, strides),
    padding="SAME",
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=KERNEL_INIT,
    bias_init=BIAS_INIT,
    conv_general_dilated=conv_general_dilated,
    name=name,
  )


def batch_norm(*, train: bool, dtype: Dtype, name: str, scale_init: float = 1.0) -> nn.Module:
  """BatchNorm over every axis but channels (so over T·B·H·W on [T, B, H, W, C]), in the active
  table's form (nn.BatchNorm's parameters and batch_stats whatever the table).

  Args:
    train: batch statistics (and a running-average update) when True.
    dtype: compute dtype; statistics and params stay float32.
    name: module name.
    scale_init: initial γ; `model.spk.norm_init_scale` for norms right before an SPK.
  """
  return ops.current().batch_norm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPS,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=nn.initializers.constant(scale_init),
    name=name,
  )


def scaled_layer_norm(*, dtype: Dtype, name: str) -> Callable[..., jax.Array]:
  """f(x, shift=, gamma=) = γ ⊙ LayerNorm(x + shift) in the active table's form, the
  LayerNorm's parameters under `name` as `layer_norm` makes them."""
  return ops.current().scaled_layer_norm(
    epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name
  )


def layer_norm(*, dtype: Dtype, name: str, scale_init: float = 1.0) -> nn.Module:
  """LayerNorm, eps 1e-6 (timm maxxvit / ConvNeXt), in the active table's form (nn.LayerNorm's
  parameter names and shapes whatever the table)."""
  return ops.current().layer_norm(
    epsilon=LN_EPS,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=nn.initializers.constant(scale_init),
    name=name,
  )


class LayerScale(nn.Module):
  """y = γ ⊙ x with γ ∈ R^C initialised to 1e-6 (ConvNeXt / timm `init_values`)."""

  init_value: float = LAYER_SCALE_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param(
      "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32
    )
    return x * gamma.astype(x.dtype)


class DropPath(nn.Module):
  """Stochastic depth on a [T, B, ...] branch output: one mask per sample, shared over T.

  The mask has shape [1, B, 1, ...] (DESIGN.md §5) and uses the "dropout" rng; kept samples are
  scaled by 1/(1-rate). Identity when not training or rate == 0.

  `rate` given at call time overrides the attribute; it may be a traced scalar (blocks run
  under `nn.scan` take their per-block rate as a scanned input).
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, rate: Any = None) -> jax.Array:
    if rate is None:
      rate = self.rate
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path rate must be in [0, 1), got {rate}")
    if not train or (isinstance(rate, float | int) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep).astype(x.dtype), jnp.zeros_like(x))


def drop_path_rates(max_rate: float, depths: tuple[int, ...]) -> list[list[float]]:
  """Per-stage, per-block rates rising linearly from 0 to `max_rate` over all blocks (timm)."""
  total = sum(depths)
  flat = [max_rate * i / max(total - 1, 1) for i in range(total)]
  out, i = [], 0
  for d in depths:
    out.append(flat[i : i + d])
    i += d
  return out


def avg_pool_same(x: jax.Array) -> jax.Array:
  """2x2/2 average pool on [N, H, W, C] with ceil mode and count_include_pad=False.

  Odd maps (e.g. 7 -> 4 at 28 px) must match the stride-2 SAME depthwise conv of the branch;
  this is timm `Downsample2d` (avg_pool ceil_mode=True, count_include_pad=False).
  """
  n, h, w, c = x.shape
  ph, pw = h % 2, w % 2
  if ph or pw:
    pads = ((0, 0), (0, ph), (0, pw), (0, 0))
    s = jnp.pad(x, pads)
    ones = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), pads)
    pool = functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2))
    return pool(s) / pool(ones)
  return nn.avg_pool(x, (2, 2), strides=(2, 2))
