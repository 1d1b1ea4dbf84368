"""The "xla_cpu" table's products and reductions: the same values as lax's and jnp's, with
backward passes shaped for XLA:CPU.

- `dense_dot_general`: nn.Dense's product; its weight gradient takes the cotangent as the left
  operand (see `_dense_product_bwd`).
- `conv_general_dilated`: nn.Conv's convolution; its kernel gradient is one matmul over im2col
  patches, about three times the speed of XLA:CPU's own kernel-gradient convolution on the
  stem's 3x3 convs.
- `sum_leading`, `repeat_time`, `add_broadcast`: their reductions over a short leading axis
  are written as elementwise adds. XLA:CPU hands a reduce over a leading axis to YNNPACK, which
  ran such reduces at a few GB/s or less; the pairwise adds fuse into one pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from spikeatconv_jax.layers import ops


def sum_leading(x: jax.Array) -> jax.Array:
  """jnp.sum(x, axis=0) as pairwise halvings (x[:n] + x[n:2n], ...): elementwise adds that XLA
  fuses into one pass instead of a reduce over the leading axis."""
  while x.shape[0] > 1:
    n = x.shape[0] // 2
    head = x[:n] + x[n : 2 * n]
    x = jnp.concatenate([head, x[2 * n :]]) if x.shape[0] % 2 else head
  return x[0]


def add_broadcast(x: jax.Array, b: jax.Array) -> jax.Array:
  """x + b (in x's dtype) for b broadcast over x's leading axes (b.shape == x.shape[-b.ndim:]),
  e.g. attention's relative-position bias [h, N, N] added to the scores [G, h, N, N]. Its
  gradient for b sums over those axes with `sum_leading` (in float32) instead of XLA's reduce."""
  ops.check_add_broadcast(x, b)
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
  """[B, ...] -> [T, B, ...], x repeated over T steps; the gradient is `sum_leading` of the T
  slices (one elementwise pass) instead of autodiff's reduce over the T axis."""
  return jnp.broadcast_to(x[None], (t,) + x.shape)


def _repeat_time_fwd(x, t):
  return repeat_time(x, t), None


def _repeat_time_bwd(t, _, g):
  return (sum_leading(g),)


repeat_time.defvjp(_repeat_time_fwd, _repeat_time_bwd)


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
  # backward), whose strided writes then cost more than the dot.
  g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
  dw = lax.dot_general(g2, x2, (((0,), (0,)), ((), ()))).T
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense: the same product, with the weight gradient computed as
  above when it is a plain [..., C_in] x [C_in, C_out] product."""
  (lc, rc), (lb, rb) = dimension_numbers
  plain = (
    not lb
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
  # (as in _dense_product_bwd).
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
  """`lax.conv_general_dilated` for nn.Conv: the same convolution; a plain NHWC conv (no
  dilation or groups, non-negative padding) takes its kernel gradient from im2col patches."""
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
    lhs.ndim == 4
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
