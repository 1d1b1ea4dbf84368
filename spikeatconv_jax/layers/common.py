"""Shared model pieces: time folding, DropPath, LayerScale, norm and init defaults, exact GELU,
the dense/conv products nn.Dense and nn.Conv use (with faster gradient forms on CPU), LayerNorm
(with a faster backward on CPU), and a cotangent barrier for XLA:CPU.

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

from spikeatconv_jax.layers import dwconv_native

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
  """jnp.sum(x, axis=0) as pairwise halvings (x[:n] + x[n:2n], ...): elementwise adds that XLA
  fuses into one pass. XLA:CPU hands a reduce over the leading axis to YNNPACK, which ran it at
  under 1 GB/s for short leading axes: 18 ms for a [64, 16, 49, 49] sum that takes 0.3 ms this way
  (docs/RESULTS.md)."""
  while x.shape[0] > 1:
    n = x.shape[0] // 2
    head = x[:n] + x[n : 2 * n]
    x = jnp.concatenate([head, x[2 * n :]]) if x.shape[0] % 2 else head
  return x[0]


def add_broadcast(x: jax.Array, b: jax.Array) -> jax.Array:
  """x + b (in x's dtype) for b broadcast over x's leading axes (b.shape == x.shape[-b.ndim:]),
  e.g. attention's relative-position bias [h, N, N] added to the scores [G, h, N, N]. Its
  gradient for b sums over those axes with `sum_leading` (in float32) instead of XLA's reduce."""
  if x.shape[x.ndim - b.ndim :] != b.shape:
    raise ValueError(f"add_broadcast: {b.shape} is not a trailing part of {x.shape}")
  return _add_broadcast(x, b.astype(x.dtype), x.ndim - b.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_broadcast(x, b, lead: int):
  return x + b


def _add_broadcast_fwd(x, b, lead):
  return x + b, None


def _add_broadcast_bwd(lead, _, g):
  if not lead:
    return g, g
  gb = sum_leading(g.reshape((-1,) + g.shape[lead:]).astype(jnp.float32))  # summed in float32
  return g, gb.astype(g.dtype)


_add_broadcast.defvjp(_add_broadcast_fwd, _add_broadcast_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def repeat_time(x: jax.Array, t: int) -> jax.Array:
  """[B, ...] -> [T, B, ...], x repeated over T steps (direct encoding: what is computed once
  before the first SPK). The same as `jnp.broadcast_to(x[None], (t, *x.shape))`, whose gradient
  is a reduce over the T axis; XLA:CPU hands that reduce to YNNPACK, which ran it at ~2 GB/s:
  40 ms for the [2, 8, 112, 112, 64] stem cotangent of the tiny T=2 step. Here the gradient is
  `sum_leading` of the T slices, one elementwise pass."""
  return jnp.broadcast_to(x[None], (t,) + x.shape)


def _repeat_time_fwd(x, t):
  return repeat_time(x, t), None


def _repeat_time_bwd(t, _, g):
  return (sum_leading(g),)


repeat_time.defvjp(_repeat_time_fwd, _repeat_time_bwd)


@jax.custom_vjp
def cotangent_barrier(x: jax.Array) -> jax.Array:
  """The identity; its backward has XLA:CPU compute the cotangent of `x` once, into a buffer.

  XLA:CPU copies a cheap elementwise producer into every fusion that consumes it. A LIF's input
  gradient (summed over MBPL's K branches) feeds the three fusions of the BatchNorm backward
  before it, so each of them recomputed it from the K branch cotangents, after K more fusions
  had stored the surrogate derivatives. With the cotangent held by a native no-op custom call
  (`dwconv_native.fusion_barrier`) it is one fusion and one buffer (tiny spiking T=1 train
  step: 6,293 -> 4,518 MB of compiled temporaries; docs/RESULTS.md). On other backends, or
  without the native library, the backward is the identity too. On CPU the backward is not
  itself differentiable (no second-order gradients through it).
  """
  return x


def _cotangent_barrier_fwd(x):
  return x, None


def _cotangent_barrier_bwd(_, g):
  if jax.default_backend() == "cpu" and dwconv_native.available():
    g = dwconv_native.fusion_barrier(g)
  return (g,)


cotangent_barrier.defvjp(_cotangent_barrier_fwd, _cotangent_barrier_bwd)


@jax.custom_vjp
def value_barrier(x: jax.Array) -> jax.Array:
  """The identity; on XLA:CPU it has `x`, and in the backward its cotangent, computed once,
  each into a buffer in its own layout.

  The forward counterpart of `cotangent_barrier`, for a value that meets a transpose: XLA:CPU
  fuses a cheap elementwise producer into its consumer even when the consumer is a transpose,
  and then evaluates the producer in the transpose's strided order. An SPK output feeding
  attention's grid partition (count + γ·LN(merge), and at T > 1 the LIF steps before it)
  became such a fusion, e.g. 40 ms for one f32[256, 4, 32, 49] key map of the tiny T=2 train
  step. Behind the barrier the SPK output is one contiguous elementwise pass and the partition
  a plain copy. The backward is the mirror image: the partition's transposed cotangent was read
  in strided order, several times over, by the LIF backward of the SPK before it (the T=2
  concatenation fusions of the q/k sites took 18-21 ms each, the FFN sites of 4x their size
  14 ms); with the cotangent held by the same no-op call, the transpose is one copy. The
  identity elsewhere, both ways.
  """
  if jax.default_backend() == "cpu" and dwconv_native.available():
    return dwconv_native.fusion_barrier(x)
  return x


def _value_barrier_fwd(x):
  return value_barrier(x), None


def _value_barrier_bwd(_, g):
  return _cotangent_barrier_bwd(None, g)  # the same no-op call on the cotangent


value_barrier.defvjp(_value_barrier_fwd, _value_barrier_bwd)


_INV_SQRT2 = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x·Φ(x), written with erf rather than `jax.nn.gelu`'s erfc.

  The two agree to float32 rounding in absolute terms (the erf form loses relative accuracy
  only where |GELU(x)| < 1e-6, for x < -5). XLA:CPU's f32 erfc costs 3× its erf: the forward at
  [8, 56, 56, 256] took 6.1 ms with erfc, 2.0 ms with erf (docs/RESULTS.md).
  """
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))


@jax.custom_vjp
def _dense_product(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_product_fwd(x, w):
  return _dense_product(x, w), (x, w)


def _dense_product_bwd(res, g):
  x, w = res
  dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  # dW^T = g^T x with the cotangent as the left operand. Autodiff's x^T g makes XLA:CPU store
  # g transposed ([C_out, M]); it fuses that transpose into the producer of g (e.g. a BatchNorm
  # backward), whose strided writes then cost more than the dot (tiny spike-free step: about
  # 20 % of the time in such fusions).
  g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  dw = lax.dot_general(g2, x2, (((0,), (0,)), ((), ()))).T
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense: the same product, with the weight gradient computed as
  above when it is a plain [..., C_in] x [C_in, C_out] product on CPU."""
  (lc, rc), (lb, rb) = dimension_numbers
  plain = (
    jax.default_backend() == "cpu"
    and not lb
    and not rb
    and tuple(lc) == (lhs.ndim - 1,)
    and tuple(rc) == (0,)
    and rhs.ndim == 2
    and precision is None
    and preferred_element_type is None
  )
  if plain:
    return _dense_product(lhs, rhs)
  return lax.dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_patch_grad(x, w, strides, pads):
  return _conv_nhwc(x, w, strides, pads)


def _conv_patch_grad_fwd(x, w, strides, pads):
  return _conv_nhwc(x, w, strides, pads), (x, w)


def _conv_patch_grad_bwd(strides, pads, res, g):
  x, w = res
  (dx,) = jax.vjp(lambda x: _conv_nhwc(x, w, strides, pads), x)[1](g)
  # Kernel gradient as one matmul over im2col patches [M, kh·kw·C_in], cotangent on the left
  # (as in _dense_product_bwd). XLA:CPU's own kernel-gradient convolution runs at ~27 GFLOP/s
  # on the stem's 112x112 3x3 conv, about a third of this form.
  kh, kw, cin, cout = w.shape
  n, ho, wo, _ = g.shape
  (sh, sw), (pt_pb, pl_pr) = strides, pads
  xp = jnp.pad(x, ((0, 0), pt_pb, pl_pr, (0, 0)))
  taps = [
    lax.slice(
      xp, (0, a, b, 0), (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, cin), (1, sh, sw, 1)
    )
    for a in range(kh)
    for b in range(kw)
  ]
  patches = jnp.stack(taps, axis=3).reshape(n * ho * wo, kh * kw * cin)
  dw = lax.dot_general(g.reshape(-1, cout), patches, (((0,), (0,)), ((), ()))).T
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_conv_patch_grad.defvjp(_conv_patch_grad_fwd, _conv_patch_grad_bwd)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """`lax.conv_general_dilated` for nn.Conv: the same convolution; on CPU a plain NHWC conv
  (no dilation or groups, non-negative padding) takes its kernel gradient from im2col patches."""
  kw = dict(
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  plain = (
    jax.default_backend() == "cpu"
    and lhs.ndim == 4
    and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
    and feature_group_count == 1
    and batch_group_count == 1
    and precision is None
    and preferred_element_type is None
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if plain:
    strides = tuple(window_strides)
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
      pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if all(p >= 0 for pair in pads for p in pair):
      return _conv_patch_grad(lhs, rhs, strides, pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)


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


def batch_norm(*, train: bool, dtype: Dtype, name: str, scale_init: float = 1.0) -> nn.BatchNorm:
  """BatchNorm over every axis but channels (so over T·B·H·W on [T, B, H, W, C]).

  Args:
    train: batch statistics (and a running-average update) when True.
    dtype: compute dtype; statistics and params stay float32.
    name: module name.
    scale_init: initial γ; `model.spk.norm_init_scale` for norms right before an SPK.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPS,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=nn.initializers.constant(scale_init),
    name=name,
  )


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
  per-row statistics, and takes the input gradient's channel means as mat-vecs with the scale.
  One [8, 56, 56, 256] LayerNorm fwd+bwd: 30.9 -> 26.1 ms, temporaries 123 -> 74 MB
  (docs/RESULTS.md). Statistics are float32 whatever the input dtype; two-pass variance."""

  epsilon: float = LN_EPS
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
  γ product's cotangent map is never written. One [8, 56, 56, 256] site fwd+bwd: 16.8 -> 13.0 ms,
  temporaries 77 -> 52 MB (docs/RESULTS.md)."""

  @nn.compact
  def __call__(self, x: jax.Array, *, shift: jax.Array, gamma: jax.Array) -> jax.Array:
    scale, bias, dtype = self._params(x)
    return _scaled_layer_norm(x, shift, scale, bias, gamma, float(self.epsilon)).astype(dtype)


def scaled_layer_norm(*, dtype: Dtype, name: str) -> Callable[..., jax.Array]:
  """f(x, shift=, gamma=) = γ ⊙ LayerNorm(x + shift), the LayerNorm's parameters under `name`
  as `layer_norm` makes them: `CPUScaledLayerNorm` on CPU, else nn.LayerNorm with the shift and
  γ applied around it."""
  if jax.default_backend() == "cpu":
    return CPUScaledLayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)
  ln = layer_norm(dtype=dtype, name=name)

  def f(x, *, shift, gamma):
    y = ln(x + shift.astype(x.dtype))
    return y * gamma.astype(y.dtype)

  return f


def layer_norm(*, dtype: Dtype, name: str, scale_init: float = 1.0) -> nn.Module:
  """LayerNorm, eps 1e-6 (timm maxxvit / ConvNeXt): `CPULayerNorm` on CPU, else nn.LayerNorm
  (the same parameter names and shapes, so checkpoints move between backends)."""
  cls = CPULayerNorm if jax.default_backend() == "cpu" else nn.LayerNorm
  return cls(
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
