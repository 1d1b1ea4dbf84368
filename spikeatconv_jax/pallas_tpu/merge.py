"""MBPL's merge conv, Σ_k DW7_k(S_k) over K spike trains, as Pallas TPU (Mosaic) kernels.

The portable form (`layers.dwconv.spike_merge_conv_int8`) is 4K XLA convolutions per site
(forward, input and kernel gradients of K depthwise convs) with float32 partial sums between
them. Here one kernel does the forward and one does both gradients. Each grid step holds one
image's [H, W, Cb] channel block in VMEM, so a pass reads every input once from HBM:

  forward   reads K int8 spike maps and the kernel, writes the merged map
  backward  reads the K int8 maps, the output cotangent and the kernel, writes the K input
            cotangents and one kernel-gradient partial per image (summed over images by XLA)

Inside a step, a zero-padded float32 copy of the map sits in a VMEM scratch and every tap is a
shifted window of it; rows go in chunks of at most 8, accumulated in float32.

Only the shapes `supported` accepts use the kernels (stride 1, an odd square kernel, channels a
multiple of 128 or a whole block, the VMEM estimate under `VMEM_BUDGET`); `spike_merge_conv`
takes the portable form for the others. `interpret=True` runs the same kernels in Pallas'
interpreter (any backend): the tests check values and gradients that way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from spikeatconv_jax.layers import dwconv

# Scoped VMEM a call may plan for (the compiler's default limit on v4/v5e/v5p/v6e is 16 MiB).
VMEM_BUDGET = 12 * 2**20
_ROWS = 8  # output rows accumulated per inner step (bounds the live float32 values)
_LANES = 128


def _row_chunk(h: int) -> int:
  return max(r for r in range(1, min(h, _ROWS) + 1) if h % r == 0)


def _channel_block(c: int) -> int:
  return _LANES if c % _LANES == 0 else c


def _tile_bytes(rows: int, cols: int, lanes: int, itemsize: int) -> int:
  """VMEM bytes of a [rows, cols, lanes] buffer in TPU tiles ((8, 128) for 32-bit, sublanes
  packed by 32 / bits for narrower types)."""
  sub = 8 * (4 // itemsize)
  return rows * -(-cols // sub) * sub * -(-lanes // _LANES) * _LANES * itemsize


def vmem_estimate(h: int, w: int, c: int, ksize: int, out_itemsize: int) -> int:
  """Bytes of VMEM the backward kernel (the larger) plans for: double-buffered blocks plus
  scratch."""
  cb, p = _channel_block(c), ksize // 2
  blocks = (
    _tile_bytes(h, w, cb, 1)  # one branch's int8 map
    + _tile_bytes(h, w, cb, out_itemsize)  # the output cotangent
    + _tile_bytes(h, w, cb, out_itemsize)  # the branch's input cotangent
    + 2 * _tile_bytes(1, ksize * ksize, cb, 4)  # the branch's kernel and its gradient
  )
  scratch = 2 * _tile_bytes(h + 2 * p, w + 2 * p, cb, 4) + _tile_bytes(ksize * ksize, w, cb, 4)
  return 2 * blocks + scratch


def supported(shape: Sequence[int], kernel_shape: Sequence[int], strides, dtype) -> str | None:
  """None when the kernels take a merge of K maps of `shape` [N, H, W, C] with a kernel
  [kh, kw, K, C] and `strides`; otherwise why not."""
  _, h, w, c = shape
  kh, kw, _, _ = kernel_shape
  if tuple(strides) != (1, 1):
    return f"stride {tuple(strides)}"
  if kh != kw or kh % 2 == 0:
    return f"kernel {kh}x{kw}"
  need = vmem_estimate(h, w, c, kh, jnp.dtype(dtype).itemsize)
  if need > VMEM_BUDGET:
    return f"{h}x{w}x{c} needs ~{need / 2**20:.1f} MiB of VMEM"
  return None


def _tap_kernel(kernel: jax.Array) -> jax.Array:
  """[kh, kw, K, C] -> [K, kh*kw, C], tap a*kw + b."""
  kh, kw, k, c = kernel.shape
  return kernel.transpose(2, 0, 1, 3).reshape(k, kh * kw, c)


def _forward_kernel(x_ref, w_ref, o_ref, pad_ref, acc_ref, *, ksize, h, w, rows):
  # Grid (image, channel block, branch); the branch axis is innermost and sequential, and
  # the output block stays in VMEM across it.
  kk = pl.program_id(2)
  p = ksize // 2

  @pl.when(kk == 0)
  def _():
    pad_ref[...] = jnp.zeros(pad_ref.shape, jnp.float32)  # the border stays zero
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  pad_ref[p : p + h, p : p + w, :] = x_ref[0, 0].astype(jnp.float32)

  def step(i, carry):
    h0 = pl.multiple_of(i * rows, rows)
    acc = acc_ref[pl.ds(h0, rows), :, :]
    for a in range(ksize):
      for b in range(ksize):
        t = a * ksize + b
        tap = w_ref[0, t : t + 1, :].astype(jnp.float32)
        acc = acc + pad_ref[pl.ds(h0 + a, rows), b : b + w, :] * tap
    acc_ref[pl.ds(h0, rows), :, :] = acc
    return carry

  jax.lax.fori_loop(0, h // rows, step, 0)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _():
    o_ref[0] = acc_ref[...].astype(o_ref.dtype)


def _backward_kernel(
  x_ref, g_ref, w_ref, dx_ref, dw_ref, gpad_ref, xpad_ref, dwacc_ref, *, ksize, h, w, rows
):
  kk = pl.program_id(2)
  p, taps = ksize // 2, ksize * ksize

  @pl.when(kk == 0)
  def _():
    gpad_ref[...] = jnp.zeros(gpad_ref.shape, jnp.float32)
    gpad_ref[p : p + h, p : p + w, :] = g_ref[0].astype(jnp.float32)
    xpad_ref[...] = jnp.zeros(xpad_ref.shape, jnp.float32)

  xpad_ref[p : p + h, p : p + w, :] = x_ref[0, 0].astype(jnp.float32)
  dwacc_ref[...] = jnp.zeros(dwacc_ref.shape, jnp.float32)

  def step(i, carry):
    h0 = pl.multiple_of(i * rows, rows)
    g = g_ref[0, pl.ds(h0, rows), :, :].astype(jnp.float32)
    dx = jnp.zeros(g.shape, jnp.float32)
    for a in range(ksize):
      for b in range(ksize):
        t = a * ksize + b
        tap = w_ref[0, t : t + 1, :].astype(jnp.float32)
        # y[i, j] = Σ_ab w[a, b] x[i + a - p, j + b - p], so dx[i, j] = Σ_ab w[a, b] g[i - a + p,
        # j - b + p] and dw[a, b] = Σ_ij g[i, j] x[i + a - p, j + b - p].
        dx = dx + gpad_ref[pl.ds(h0 + 2 * p - a, rows), 2 * p - b : 2 * p - b + w, :] * tap
        win = xpad_ref[pl.ds(h0 + a, rows), b : b + w, :]
        dwacc_ref[t] = dwacc_ref[t] + jnp.sum(g * win, axis=0)  # rows now, columns at the end
    dx_ref[0, 0, pl.ds(h0, rows), :, :] = dx.astype(dx_ref.dtype)
    return carry

  jax.lax.fori_loop(0, h // rows, step, 0)
  for t in range(taps):
    dw_ref[0, 0, t : t + 1, :] = jnp.sum(dwacc_ref[t], axis=0, keepdims=True)


def _call_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_call(x8: jax.Array, wt: jax.Array, *, interpret: bool = False):
  """Σ_k depthwise conv(x8[k], kernel k), SAME padding, stride 1, in wt.dtype, on one device.

  x8: the K int8 maps stacked, [K, N, H, W, C]; wt: the kernel as `_tap_kernel` lays it out,
  [K, ks*ks, C]."""
  k, n, h, w, c = x8.shape
  taps = wt.shape[1]
  ks = int(round(taps**0.5))
  cb, p = _channel_block(c), ks // 2
  elems = n * h * w * c
  cost = pl.CostEstimate(
    flops=2 * k * taps * elems,
    transcendentals=0,
    bytes_accessed=k * elems + elems * wt.dtype.itemsize + n * wt.size * wt.dtype.itemsize,
  )
  body = functools.partial(_forward_kernel, ksize=ks, h=h, w=w, rows=_row_chunk(h))
  return pl.pallas_call(
    body,
    grid=(n, c // cb, k),
    in_specs=[
      pl.BlockSpec((1, 1, h, w, cb), lambda i, j, kk: (kk, i, 0, 0, j)),
      pl.BlockSpec((1, taps, cb), lambda i, j, kk: (kk, 0, j)),
    ],
    out_specs=pl.BlockSpec((1, h, w, cb), lambda i, j, kk: (i, 0, 0, j)),
    out_shape=jax.ShapeDtypeStruct((n, h, w, c), wt.dtype),
    scratch_shapes=[
      pltpu.VMEM((h + 2 * p, w + 2 * p, cb), jnp.float32),
      pltpu.VMEM((h, w, cb), jnp.float32),
    ],
    compiler_params=_call_params(),
    cost_estimate=cost,
    interpret=interpret,
    name="spike_merge_fwd",
  )(x8, wt)


def _backward_call(x8: jax.Array, g: jax.Array, wt: jax.Array, *, interpret: bool = False):
  """The cotangents of `_forward_call`'s float inputs on one device: the maps' [K, N, H, W, C]
  in g.dtype, and per image the kernel's, [N, K, ks*ks, C] float32 (summed by the caller)."""
  k, n, h, w, c = x8.shape
  taps = wt.shape[1]
  ks = int(round(taps**0.5))
  cb, p = _channel_block(c), ks // 2
  elems, item = n * h * w * c, g.dtype.itemsize
  cost = pl.CostEstimate(
    flops=4 * k * taps * elems,
    transcendentals=0,
    bytes_accessed=k * elems + elems * item + k * elems * item
    + n * wt.size * (wt.dtype.itemsize + 4),
  )
  body = functools.partial(_backward_kernel, ksize=ks, h=h, w=w, rows=_row_chunk(h))
  return pl.pallas_call(
    body,
    grid=(n, c // cb, k),
    in_specs=[
      pl.BlockSpec((1, 1, h, w, cb), lambda i, j, kk: (kk, i, 0, 0, j)),
      pl.BlockSpec((1, h, w, cb), lambda i, j, kk: (i, 0, 0, j)),
      pl.BlockSpec((1, taps, cb), lambda i, j, kk: (kk, 0, j)),
    ],
    out_specs=[
      pl.BlockSpec((1, 1, h, w, cb), lambda i, j, kk: (kk, i, 0, 0, j)),
      pl.BlockSpec((1, 1, taps, cb), lambda i, j, kk: (i, kk, 0, j)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((k, n, h, w, c), g.dtype),
      jax.ShapeDtypeStruct((n, k, taps, c), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((h + 2 * p, w + 2 * p, cb), jnp.float32),
      pltpu.VMEM((h + 2 * p, w + 2 * p, cb), jnp.float32),
      pltpu.VMEM((taps, w, cb), jnp.float32),
    ],
    compiler_params=_call_params(),
    cost_estimate=cost,
    interpret=interpret,
    name="spike_merge_bwd",
  )(x8, g, wt)


def _per_device(fn, in_specs, out_specs):
  """`fn` on each device's slice of the images when a mesh is set (`jax.set_mesh`: the train
  and eval steps set theirs), else `fn`. XLA's partitioner cannot split a Pallas call: without
  this it would gather every operand onto each device and run the whole batch there.

  Every mesh axis splits the images (the project's meshes have only batch axes, "data" and
  "fsdp"); channels and the kernel are whole on every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  axes = tuple(mesh.axis_names)
  spec = lambda s: P(*(axes if a == "n" else None for a in s)) if s else P()  # noqa: E731
  return jax.shard_map(
    fn,
    in_specs=tuple(spec(s) for s in in_specs),
    out_specs=tuple(spec(s) for s in out_specs) if isinstance(out_specs, list) else spec(out_specs),
    check_vma=False,
  )


def merge_forward(x8: jax.Array, kernel: jax.Array, *, interpret: bool = False) -> jax.Array:
  """Σ_k depthwise conv(x8[k], kernel[:, :, k, :]), SAME padding, stride 1, in kernel.dtype.

  x8: the K int8 maps stacked, [K, N, H, W, C]; kernel: [ks, ks, K, C]."""
  fn = functools.partial(_forward_call, interpret=interpret)
  return _per_device(fn, ("kn", ""), "n")(x8, _tap_kernel(kernel))


def merge_backward(x8: jax.Array, kernel: jax.Array, g: jax.Array, *, interpret: bool = False):
  """The cotangents of `merge_forward`'s float inputs: the maps' [K, N, H, W, C] in g.dtype,
  and the kernel's [ks, ks, K, C] in float32."""
  ks, _, k, c = kernel.shape
  fn = functools.partial(_backward_call, interpret=interpret)
  dx, dwp = _per_device(fn, ("kn", "n", ""), ["kn", "n"])(x8, g, _tap_kernel(kernel))
  return dx, jnp.sum(dwp, axis=0).reshape(k, ks, ks, c).transpose(1, 2, 0, 3)


def _stack8(xs):
  return jnp.stack([x.astype(jnp.int8) for x in xs])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _merge(xs, kernel, interpret):
  return merge_forward(_stack8(xs), kernel, interpret=interpret)


def _merge_fwd(xs, kernel, interpret):
  # The maps hold integers in [-128, 127] (the hook's contract): int8 keeps them exactly.
  x8 = _stack8(xs)
  return merge_forward(x8, kernel, interpret=interpret), (x8, kernel)


def _merge_bwd(interpret, res, g):
  x8, kernel = res
  dx, dw = merge_backward(x8, kernel, g.astype(kernel.dtype), interpret=interpret)
  return list(dx), dw.astype(kernel.dtype)


_merge.defvjp(_merge_fwd, _merge_bwd)


def spike_merge_conv(
  xs: Sequence[jax.Array], kernel: jax.Array, strides=(1, 1), *, interpret: bool = False
):
  """The "pallas_tpu" table's `spike_merge_conv` (contract in `layers.ops`): the Pallas kernels
  where `supported` allows, else the portable form."""
  strides = dwconv.check_sum(xs, kernel, strides)
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  if supported(xs[0].shape, kernel.shape, strides, dtype) is not None:
    return dwconv.spike_merge_conv_int8(xs, kernel, strides)
  return _merge([x.astype(dtype) for x in xs], kernel.astype(dtype), interpret)
