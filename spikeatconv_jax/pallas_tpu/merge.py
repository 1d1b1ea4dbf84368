"""MBPL's merge conv, Σ_k DW7_k(S_k) over K spike trains, as Pallas TPU (Mosaic) kernels.

The portable form (`layers.dwconv.spike_merge_conv_int8`) is 4K XLA convolutions per site
(forward, input and kernel gradients of K depthwise convs) with float32 partial sums between
them. Here one kernel does the forward and one does both gradients:

  forward   reads K int8 spike maps and the kernel, writes the merged map
  backward  reads the K int8 maps, the output cotangent and the kernel, writes the K input
            cotangents and kernel-gradient partials (summed over images and bands by XLA)

The grid is (image, channel block, row band, branch), the branch innermost: the merged map (or
the cotangent) stays in VMEM while the K branches pass. A step holds a float32 copy of its
input rows with a zero border of ksize // 2 in a VMEM scratch, and every tap is a shifted
window of it; rows go in chunks of at most 8, accumulated in float32. When a whole map fits the
VMEM budget, a band is the whole map and the border is written in VMEM; larger maps (the stem's
112x112 at 224 pixels) go in bands of rows read as overlapping windows (`pl.Element`) of inputs
zero-padded by XLA.

At T = 1 the table's `lif_spike_merge` fuses the LIF before the merge into both kernels: they
read the LIF's input x instead of K spike maps and make each branch's spikes Θ(H(x) - V_th,k)
in VMEM; the backward applies the surrogate there too and writes one cotangent of x, summed over
the branches in VMEM, instead of K. Nothing between the LIF and the merge is stored. Banded
plans pad x with -inf, where no neuron fires.

XLA:TPU takes a Pallas call's flops and bytes from its `pl.CostEstimate`; the estimates here
count every block the pipeline moves (each input block once per grid step that changes it).

Only the shapes `plan` accepts use the kernels (stride 1, an odd square kernel, channels a
multiple of 128 or one block, a band that fits `VMEM_BUDGET`); `spike_merge_conv` takes the
portable form for the others. `interpret=True` runs the same kernels in Pallas' interpreter (any
backend): the tests check values and gradients that way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from spikeatconv_jax.layers import dwconv
from spikeatconv_jax.snn import lif as lif_lib
from spikeatconv_jax.snn.surrogate import surrogate_grad

# Scoped VMEM a call may plan for (the compiler's default limit on v4/v5e/v5p/v6e is 16 MiB).
VMEM_BUDGET = 14 * 2**20
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


def vmem_estimate(
  band: int, w: int, c: int, ksize: int, itemsize: int, banded: bool, lif: bool = False
) -> int:
  """Bytes of VMEM the backward kernel (the larger) plans for at `band` output rows per step:
  double-buffered blocks plus scratch. `lif`: the fused form, whose input map is the LIF input
  (in `itemsize`) and whose input cotangent accumulates over the branches in VMEM."""
  cb, p = _channel_block(c), ksize // 2
  rows_in, cols_in = (band + 2 * p, w + 2 * p) if banded else (band, w)
  blocks = (
    _tile_bytes(rows_in, cols_in, cb, itemsize if lif else 1)  # a branch's map / the LIF input
    + _tile_bytes(rows_in, cols_in, cb, itemsize)  # the output cotangent
    + _tile_bytes(band, w, cb, itemsize)  # the input cotangent
    + 2 * _tile_bytes(1, ksize * ksize, cb, 4)  # the branch's kernel and its gradient
  )
  pad = _tile_bytes(band + 2 * p, w + 2 * p, cb, 4)
  acc = _tile_bytes(band, w, cb, 4) if lif else 0
  return 2 * blocks + 2 * pad + acc + _tile_bytes(ksize * ksize, w, cb, 4)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the kernels split a map: `band` output rows per grid step; `banded`: the inputs are
  zero-padded by XLA and read as overlapping windows of band + ksize - 1 rows."""

  band: int
  banded: bool


def plan(
  shape: Sequence[int], kernel_shape: Sequence[int], strides, dtype, lif: bool = False
) -> Plan | str:
  """The `Plan` for a merge of K maps of `shape` [N, H, W, C] with a kernel [kh, kw, K, C] and
  `strides` (`lif`: the fused form's), or why the kernels do not take it."""
  _, h, w, c = shape
  kh, kw, _, _ = kernel_shape
  if tuple(strides) != (1, 1):
    return f"stride {tuple(strides)}"
  if kh != kw or kh % 2 == 0:
    return f"kernel {kh}x{kw}"
  item = jnp.dtype(dtype).itemsize
  if vmem_estimate(h, w, c, kh, item, banded=False, lif=lif) <= VMEM_BUDGET:
    return Plan(h, False)
  for band in sorted((b for b in range(1, h) if h % b == 0), reverse=True):
    if vmem_estimate(band, w, c, kh, item, banded=True, lif=lif) <= VMEM_BUDGET:
      return Plan(band, True)
  return f"a {w}-column row of {c} channels needs more than {VMEM_BUDGET / 2**20:.0f} MiB of VMEM"


def _tap_kernel(kernel: jax.Array) -> jax.Array:
  """[kh, kw, K, C] -> [K, kh*kw, C], tap a*kw + b."""
  kh, kw, k, c = kernel.shape
  return kernel.transpose(2, 0, 1, 3).reshape(k, kh * kw, c)


def kernel_grad(dwp: jax.Array, kernel_shape) -> jax.Array:
  """The kernel's gradient [kh, kw, K, C] from the backward kernels' per-image (and per-band)
  partials [N, K, bands, kh*kw, C], laid out as `_tap_kernel` lays the kernel out."""
  kh, kw, k, c = kernel_shape
  return jnp.sum(dwp, axis=(0, 2)).reshape(k, kh, kw, c).transpose(1, 2, 0, 3)


def _fill(pad_ref, x_ref, *, p, h, w, banded, fn=None):
  """The step's input rows (through `fn`, e.g. the LIF's spikes) into the float32 scratch,
  bordered by p zeros."""
  fn = fn or (lambda v: v)
  if banded:  # the window already holds the border (XLA's padding, which fn maps to zero)
    pad_ref[...] = fn(x_ref[...].astype(jnp.float32))
  else:  # the border was zeroed at the first branch and is never written
    pad_ref[p : p + h, p : p + w, :] = fn(x_ref[(0,) * (x_ref.ndim - 3)].astype(jnp.float32))


def _lif_spikes(lif, th_ref):
  """x -> the branch's spikes Θ(H(x) - V_th) in float32 (V_th from the branch's th block)."""
  return lambda x: (lif_lib.first_potential(x, lif) - th_ref[0] >= 0).astype(jnp.float32)


def _zero(*refs):
  for ref in refs:
    ref[...] = jnp.zeros(ref.shape, ref.dtype)


def accumulate_taps(acc_ref, pad_ref, w_ref, *, ksize, h, w, rows):
  """acc_ref [h, w, C] += the branch's depthwise conv of the bordered scratch pad_ref (every tap
  a shifted window times its weight, w_ref[0, tap]), `rows` output rows at a time."""

  def step(i, carry):
    h0 = pl.multiple_of(i * rows, rows)
    acc = acc_ref[pl.ds(h0, rows), :, :]
    for a in range(ksize):
      for b in range(ksize):
        tap = w_ref[0, a * ksize + b : a * ksize + b + 1, :].astype(jnp.float32)
        acc = acc + pad_ref[pl.ds(h0 + a, rows), b : b + w, :] * tap
    acc_ref[pl.ds(h0, rows), :, :] = acc
    return carry

  jax.lax.fori_loop(0, h // rows, step, 0)


def _forward_kernel(x_ref, w_ref, *refs, ksize, h, w, rows, banded, lif=None):
  # lif: x is the LIF input and refs start with the branch's threshold block.
  th_ref, (o_ref, pad_ref, acc_ref) = (refs[0], refs[1:]) if lif else (None, refs)
  kk = pl.program_id(3)
  p = ksize // 2
  # At the first branch: the accumulator, and the scratch border when XLA did not pad.
  pl.when(kk == 0)(lambda: _zero(acc_ref, *(() if banded else (pad_ref,))))
  fn = _lif_spikes(lif, th_ref) if lif else None
  _fill(pad_ref, x_ref, p=p, h=h, w=w, banded=banded, fn=fn)
  accumulate_taps(acc_ref, pad_ref, w_ref, ksize=ksize, h=h, w=w, rows=rows)

  @pl.when(kk == pl.num_programs(3) - 1)
  def _():
    o_ref[0] = acc_ref[...].astype(o_ref.dtype)


def _transposed_taps(gpad_ref, xpad_ref, w_ref, dwacc_ref, h0, *, rows, w, ksize):
  """For `rows` output rows from h0: the branch's input cotangent (returned, float32), and each
  tap's kernel-gradient partial added to dwacc_ref (summed over rows; columns at the end).

  y[i, j] = Σ_ab w[a, b] x[i + a - p, j + b - p], so dx[i, j] = Σ_ab w[a, b] g[i - a + p,
  j - b + p] and dw[a, b] = Σ_ij g[i, j] x[i + a - p, j + b - p] (scratch row r holds input
  row r - p of the band)."""
  p = ksize // 2
  g = gpad_ref[pl.ds(h0 + p, rows), p : p + w, :]
  dx = jnp.zeros(g.shape, jnp.float32)
  for a in range(ksize):
    for b in range(ksize):
      t = a * ksize + b
      tap = w_ref[0, t : t + 1, :].astype(jnp.float32)
      dx = dx + gpad_ref[pl.ds(h0 + 2 * p - a, rows), 2 * p - b : 2 * p - b + w, :] * tap
      win = xpad_ref[pl.ds(h0 + a, rows), b : b + w, :]
      dwacc_ref[t] = dwacc_ref[t] + jnp.sum(g * win, axis=0)
  return dx


def _backward_kernel(
  x_ref, g_ref, w_ref, dx_ref, dw_ref, gpad_ref, xpad_ref, dwacc_ref, *, ksize, h, w, rows, banded
):
  kk = pl.program_id(3)
  p, taps = ksize // 2, ksize * ksize

  @pl.when(kk == 0)
  def _():
    _zero(*(() if banded else (gpad_ref, xpad_ref)))
    _fill(gpad_ref, g_ref, p=p, h=h, w=w, banded=banded)

  _fill(xpad_ref, x_ref, p=p, h=h, w=w, banded=banded)
  _zero(dwacc_ref)

  def step(i, carry):
    h0 = pl.multiple_of(i * rows, rows)
    dx = _transposed_taps(gpad_ref, xpad_ref, w_ref, dwacc_ref, h0, rows=rows, w=w, ksize=ksize)
    dx_ref[0, 0, pl.ds(h0, rows), :, :] = dx.astype(dx_ref.dtype)
    return carry

  jax.lax.fori_loop(0, h // rows, step, 0)
  for t in range(taps):
    dw_ref[0, 0, 0, t : t + 1, :] = jnp.sum(dwacc_ref[t], axis=0, keepdims=True)


def _backward_lif_kernel(
  x_ref, g_ref, w_ref, th_ref, dx_ref, dw_ref, gpad_ref, xpad_ref, dwacc_ref, dxacc_ref,
  *, ksize, h, w, rows, banded, lif,
):  # fmt: skip
  """`_backward_kernel` for the fused form: the branch's spikes come from the LIF input x, and
  its input cotangent, through the surrogate, accumulates into one x cotangent over branches."""
  p = ksize // 2

  @pl.when(pl.program_id(3) == 0)
  def _():
    _zero(dxacc_ref, *(() if banded else (gpad_ref, xpad_ref)))
    _fill(gpad_ref, g_ref, p=p, h=h, w=w, banded=banded)

  _fill(xpad_ref, x_ref, p=p, h=h, w=w, banded=banded, fn=_lif_spikes(lif, th_ref))

  def x_rows(h0):
    if banded:
      return x_ref[pl.ds(h0 + p, rows), p : p + w, :]
    return x_ref[0, pl.ds(h0, rows), :, :]

  lif_branch_backward(
    x_rows, gpad_ref, xpad_ref, w_ref, th_ref, dwacc_ref, dxacc_ref, dw_ref, dx_ref,
    ksize=ksize, h=h, w=w, rows=rows, lif=lif,
  )  # fmt: skip


def lif_branch_backward(
  x_rows, gpad_ref, xpad_ref, w_ref, th_ref, dwacc_ref, dxacc_ref, dw_ref, dx_ref,
  *, ksize, h, w, rows, lif, extra_rows=None,
):  # fmt: skip
  """One branch's step of a fused backward, its spikes already in xpad_ref: the transposed taps
  (the branch's kernel-gradient partials into dw_ref), and x's cotangent accumulating
  (dS_k + extra) ⊙ surrogate_k(x) in dxacc_ref, written to dx_ref after the last branch.
  x_rows(h0) / extra_rows(h0): x's (and an extra share of dS_k's) `rows` rows from h0."""
  dh_dx = lif_lib.potential_gain(lif)
  _zero(dwacc_ref)

  def step(i, carry):
    h0 = pl.multiple_of(i * rows, rows)
    ds = _transposed_taps(gpad_ref, xpad_ref, w_ref, dwacc_ref, h0, rows=rows, w=w, ksize=ksize)
    if extra_rows is not None:
      ds = ds + extra_rows(h0)
    u = lif_lib.first_potential(x_rows(h0).astype(jnp.float32), lif) - th_ref[0]
    dxacc_ref[pl.ds(h0, rows), :, :] += ds * (surrogate_grad(u, lif.surrogate, lif.alpha) * dh_dx)
    return carry

  jax.lax.fori_loop(0, h // rows, step, 0)
  for t in range(ksize * ksize):
    dw_ref[0, 0, 0, t : t + 1, :] = jnp.sum(dwacc_ref[t], axis=0, keepdims=True)

  @pl.when(pl.program_id(3) == pl.num_programs(3) - 1)
  def _():
    dx_ref[0] = dxacc_ref[...].astype(dx_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Shapes and block specs shared by the two calls."""

  k: int
  n: int
  h: int
  w: int
  c: int
  ksize: int
  plan: Plan
  whole_channels: bool = False  # one channel block of all C (kernels that reduce over C)
  rows: int | None = None  # output rows per inner step (None: `_row_chunk` of the band)

  @property
  def cb(self):
    return self.c if self.whole_channels else _channel_block(self.c)

  @property
  def p(self):
    return self.ksize // 2

  @property
  def taps(self):
    return self.ksize * self.ksize

  @property
  def grid(self):
    return (self.n, self.c // self.cb, self.h // self.plan.band, self.k)

  def steps(self, *, per_branch: bool = True) -> int:
    g = self.grid
    return math.prod(g) if per_branch else math.prod(g[:3])

  def map_spec(self, branch_axis: bool) -> pl.BlockSpec:
    """An input map, [K, N, H, W, C] (branch_axis) or [N, H, W, C], as the step's rows: its
    output rows (`out_spec`), or for banded plans a window with the border rows."""
    if not self.plan.banded:
      return self.out_spec(branch_axis)
    band, cb, p = self.plan.band, self.cb, self.p
    win = (pl.Element(band + 2 * p), pl.Element(self.w + 2 * p), pl.Element(cb))
    # Element offsets; Mosaic must see the channel offset as a multiple of the lane tiling.
    lanes = (lambda j: j * _LANES) if cb == _LANES else (lambda j: 0)
    if branch_axis:
      return pl.BlockSpec((None, None) + win, lambda i, j, r, kk: (kk, i, r * band, 0, lanes(j)))
    return pl.BlockSpec((None,) + win, lambda i, j, r, kk: (i, r * band, 0, lanes(j)))

  def out_spec(self, branch_axis: bool) -> pl.BlockSpec:
    """A map's block of the step's output rows, [K, N, H, W, C] (branch_axis) or [N, H, W, C]."""
    band, cb = self.plan.band, self.cb
    if branch_axis:
      return pl.BlockSpec((1, 1, band, self.w, cb), lambda i, j, r, kk: (kk, i, r, 0, j))
    return pl.BlockSpec((1, band, self.w, cb), lambda i, j, r, kk: (i, r, 0, j))

  def tap_spec(self) -> pl.BlockSpec:
    return pl.BlockSpec((1, self.taps, self.cb), lambda i, j, r, kk: (kk, 0, j))

  def threshold_spec(self) -> pl.BlockSpec:
    """The branch's threshold, [K, 1, C] (the same for every channel)."""
    return pl.BlockSpec((1, 1, self.cb), lambda i, j, r, kk: (kk, 0, j))

  def pad(self, x: jax.Array, value: float = 0.0) -> jax.Array:
    """x [..., H, W, C] padded with `value` on H and W for banded plans, else x."""
    if not self.plan.banded:
      return x
    p = self.p
    return jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(p, p), (p, p), (0, 0)], constant_values=value)

  def in_block_bytes(self, itemsize: int) -> int:
    band, p = self.plan.band, self.p
    rows, cols = (band + 2 * p, self.w + 2 * p) if self.plan.banded else (band, self.w)
    return rows * cols * self.cb * itemsize

  def scratch(self, n: int):
    pad = pltpu.VMEM((self.plan.band + 2 * self.p, self.w + 2 * self.p, self.cb), jnp.float32)
    return [pad] * n

  def bind(self, kernel_fn, **static):
    """`kernel_fn` with this layout's static arguments (and `static`)."""
    band = self.plan.band
    return functools.partial(
      kernel_fn,
      ksize=self.ksize,
      h=band,
      w=self.w,
      rows=self.rows or _row_chunk(band),
      banded=self.plan.banded,
      **static,
    )

  def params(self):
    return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _layout(x8: jax.Array, wt: jax.Array, dtype, lif: bool = False) -> _Layout:
  """x8: the K maps [K, N, H, W, C], or with `lif` the LIF input [N, H, W, C]."""
  k = wt.shape[0]
  n, h, w, c = x8.shape[-4:]
  ks = math.isqrt(wt.shape[1])
  got = plan((n, h, w, c), (ks, ks, k, c), (1, 1), dtype, lif=lif)
  if isinstance(got, str):
    raise ValueError(f"spike merge kernels: {got}")
  return _Layout(k, n, h, w, c, ks, got)


def _forward_call(x8: jax.Array, wt: jax.Array, *, interpret: bool = False):
  """Σ_k depthwise conv(x8[k], kernel k), SAME padding, stride 1, in wt.dtype, on one device.

  x8: the K int8 maps stacked, [K, N, H, W, C]; wt: the kernel as `_tap_kernel` lays it out,
  [K, ks*ks, C]."""
  lay = _layout(x8, wt, wt.dtype)
  n, h, w, c, item = lay.n, lay.h, lay.w, lay.c, wt.dtype.itemsize
  cost = pl.CostEstimate(
    flops=2 * lay.k * lay.taps * n * h * w * c,
    transcendentals=0,
    bytes_accessed=lay.steps() * (lay.in_block_bytes(1) + lay.taps * lay.cb * item)
    + n * h * w * c * item,
  )
  call = _forward_pallas(lay, [lay.map_spec(True), lay.tap_spec()], wt.dtype, cost, interpret,
                         "spike_merge_fwd")  # fmt: skip
  return call(lay.pad(x8), wt)


def _forward_pallas(lay, in_specs, dtype, cost, interpret, name, **static):
  """The forward kernel's pallas_call on `lay` (static: `_forward_kernel`'s keywords)."""
  return pl.pallas_call(
    lay.bind(_forward_kernel, **static),
    grid=lay.grid,
    in_specs=in_specs,
    out_specs=lay.out_spec(False),
    out_shape=jax.ShapeDtypeStruct((lay.n, lay.h, lay.w, lay.c), dtype),
    scratch_shapes=lay.scratch(1) + [pltpu.VMEM((lay.plan.band, lay.w, lay.cb), jnp.float32)],
    compiler_params=lay.params(),
    cost_estimate=cost,
    interpret=interpret,
    name=name,
  )


def _backward_call(x8: jax.Array, g: jax.Array, wt: jax.Array, *, interpret: bool = False):
  """The cotangents of `_forward_call`'s float inputs on one device: the maps' [K, N, H, W, C]
  in g.dtype, and the kernel's per image and row band, [N, K, bands, ks*ks, C] float32 (summed
  by the caller)."""
  lay = _layout(x8, wt, g.dtype)
  n, h, w, c, item = lay.n, lay.h, lay.w, lay.c, g.dtype.itemsize
  bands = h // lay.plan.band
  cost = pl.CostEstimate(
    flops=4 * lay.k * lay.taps * n * h * w * c,
    transcendentals=0,
    bytes_accessed=lay.steps() * (lay.in_block_bytes(1) + lay.taps * lay.cb * (item + 4))
    + lay.steps(per_branch=False) * lay.in_block_bytes(item)
    + lay.k * n * h * w * c * item,
  )
  return pl.pallas_call(
    lay.bind(_backward_kernel),
    grid=lay.grid,
    in_specs=[lay.map_spec(True), lay.map_spec(False), lay.tap_spec()],
    out_specs=[
      lay.out_spec(True),
      pl.BlockSpec((1, 1, 1, lay.taps, lay.cb), lambda i, j, r, kk: (i, kk, r, 0, j)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((lay.k, n, h, w, c), g.dtype),
      jax.ShapeDtypeStruct((n, lay.k, bands, lay.taps, c), jnp.float32),
    ],
    scratch_shapes=lay.scratch(2) + [pltpu.VMEM((lay.taps, w, lay.cb), jnp.float32)],
    compiler_params=lay.params(),
    cost_estimate=cost,
    interpret=interpret,
    name="spike_merge_bwd",
  )(lay.pad(x8), lay.pad(g), wt)


@functools.cache
def _jitted(func, keywords: tuple) -> Callable:
  return jax.jit(functools.partial(func, **dict(keywords)))


def _per_device(fn, in_specs, out_specs):
  """`fn` on each device's slice of the images when a mesh is set (`jax.set_mesh`: the train
  and eval steps set theirs), else `fn`. XLA's partitioner cannot split a Pallas call: without
  this it would gather every operand onto each device and run the whole batch there.

  Every mesh axis splits the images (the project's meshes have only batch axes, "data" and
  "fsdp"); channels and the kernel are whole on every device.

  `fn` is a `functools.partial` of a kernel caller with keyword arguments only; it runs as one
  jitted function per (caller, keywords), so each kernel is traced once per shape and not once
  per site (tiny's train step: 168 kernel calls, 32 distinct kernels)."""
  fn = _jitted(fn.func, tuple(sorted(fn.keywords.items())))
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
  fn = functools.partial(_backward_call, interpret=interpret)
  dx, dwp = _per_device(fn, ("kn", "n", ""), ["kn", "n"])(x8, g, _tap_kernel(kernel))
  return dx, kernel_grad(dwp, kernel.shape)


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
  where `plan` finds a plan, else the portable form."""
  strides = dwconv.check_sum(xs, kernel, strides)
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  if isinstance(plan(xs[0].shape, kernel.shape, strides, dtype), str):
    return dwconv.spike_merge_conv_int8(xs, kernel, strides)
  return _merge([x.astype(dtype) for x in xs], kernel.astype(dtype), interpret)


# ---------------------------------------------------------------------------------------------
# The fused form: the LIF's spikes made inside the kernels from its input.


# Banded plans pad the LIF input with this: no neuron fires there, as outside the map.
_NEVER_FIRES = -jnp.inf


def _thresholds(lif, k: int, c: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(lif.v_thresholds, jnp.float32)[:, None, None], (k, 1, c))


def _lif_forward_call(x, wt, th, *, lif, interpret=False):
  """Σ_k depthwise conv(Θ(H(x) - V_th,k), kernel k) on one device, in wt.dtype; x [N, H, W, C]."""
  lay = _layout(x, wt, wt.dtype, lif=True)
  n, h, w, c, item = lay.n, lay.h, lay.w, lay.c, wt.dtype.itemsize
  cost = pl.CostEstimate(
    flops=2 * lay.k * lay.taps * n * h * w * c,
    transcendentals=0,
    # x's block changes with (image, channel block, band), not with the branch.
    bytes_accessed=lay.steps(per_branch=False) * lay.in_block_bytes(x.dtype.itemsize)
    + lay.steps() * (lay.taps + 1) * lay.cb * item
    + n * h * w * c * item,
  )
  specs = [lay.map_spec(False), lay.tap_spec(), lay.threshold_spec()]
  call = _forward_pallas(lay, specs, wt.dtype, cost, interpret, "lif_merge_fwd", lif=lif)
  return call(lay.pad(x, _NEVER_FIRES), wt, th)


def _lif_backward_call(x, g, wt, th, *, lif, interpret=False):
  """The cotangents of `_lif_forward_call`'s inputs on one device: x's [N, H, W, C] in x.dtype,
  and the kernel's per image and row band, [N, K, bands, ks*ks, C] float32."""
  lay = _layout(x, wt, g.dtype, lif=True)
  n, h, w, c = lay.n, lay.h, lay.w, lay.c
  bands = h // lay.plan.band
  cost = pl.CostEstimate(
    flops=(4 * lay.taps + 8) * lay.k * n * h * w * c,
    transcendentals=0,
    bytes_accessed=lay.steps(per_branch=False)
    * (lay.in_block_bytes(x.dtype.itemsize) + lay.in_block_bytes(g.dtype.itemsize))
    + lay.steps() * (lay.taps * lay.cb * (wt.dtype.itemsize + 4) + lay.cb * 4)
    + n * h * w * c * x.dtype.itemsize,
  )
  return pl.pallas_call(
    lay.bind(_backward_lif_kernel, lif=lif),
    grid=lay.grid,
    in_specs=[lay.map_spec(False), lay.map_spec(False), lay.tap_spec(), lay.threshold_spec()],
    out_specs=[
      lay.out_spec(False),
      pl.BlockSpec((1, 1, 1, lay.taps, lay.cb), lambda i, j, r, kk: (i, kk, r, 0, j)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((n, h, w, c), x.dtype),
      jax.ShapeDtypeStruct((n, lay.k, bands, lay.taps, c), jnp.float32),
    ],
    scratch_shapes=lay.scratch(2)
    + [
      pltpu.VMEM((lay.taps, w, lay.cb), jnp.float32),
      pltpu.VMEM((lay.plan.band, w, lay.cb), jnp.float32),
    ],
    compiler_params=lay.params(),
    cost_estimate=cost,
    interpret=interpret,
    name="lif_merge_bwd",
  )(lay.pad(x, _NEVER_FIRES), lay.pad(g), wt, th)


def lif_merge_forward(x, kernel, lif, *, interpret: bool = False) -> jax.Array:
  """Σ_k depthwise conv(S_k, kernel[:, :, k, :]) of the one-step LIF spikes S_k of x [N, H, W,
  C] (threshold lif.v_thresholds[k]), SAME padding, stride 1, in kernel.dtype."""
  k, c = kernel.shape[2:]
  fn = functools.partial(_lif_forward_call, lif=lif, interpret=interpret)
  return _per_device(fn, ("n", "", ""), "n")(x, _tap_kernel(kernel), _thresholds(lif, k, c))


def lif_merge_backward(x, kernel, g, lif, *, interpret: bool = False):
  """The cotangents of `lif_merge_forward`'s inputs: x's (through the surrogate) in x.dtype,
  and the kernel's [ks, ks, K, C] in float32."""
  k, c = kernel.shape[2:]
  fn = functools.partial(_lif_backward_call, lif=lif, interpret=interpret)
  dx, dwp = _per_device(fn, ("n", "n", "", ""), ["n", "n"])(
    x, g, _tap_kernel(kernel), _thresholds(lif, k, c)
  )
  return dx, kernel_grad(dwp, kernel.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lif_merge(x, kernel, lif, interpret):
  return lif_merge_forward(x, kernel, lif, interpret=interpret)


def _lif_merge_fwd(x, kernel, lif, interpret):
  return lif_merge_forward(x, kernel, lif, interpret=interpret), (x, kernel)


def _lif_merge_bwd(lif, interpret, res, g):
  x, kernel = res
  dx, dw = lif_merge_backward(x, kernel, g.astype(kernel.dtype), lif, interpret=interpret)
  return dx, dw.astype(kernel.dtype)


_lif_merge.defvjp(_lif_merge_fwd, _lif_merge_bwd)


def lif_spike_merge(
  x: jax.Array, kernel: jax.Array, strides, lif: lif_lib.LIFParams, *, interpret: bool = False
) -> jax.Array:
  """The "pallas_tpu" table's `lif_spike_merge` (contract in `layers.ops`): the fused kernels
  where `plan` finds a plan (the input is never stored as spikes: both kernels make them from
  x in VMEM), else the LIF and `spike_merge_conv` composed."""
  strides = dwconv.check(x, kernel[:, :, 0, :, None], strides)
  if kernel.shape[2] != len(lif.v_thresholds):
    raise ValueError(
      f"lif_spike_merge: a kernel of {kernel.shape[2]} branches for "
      f"{len(lif.v_thresholds)} thresholds"
    )
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  if isinstance(plan(x.shape, kernel.shape, strides, dtype, lif=True), str):
    spikes = lif_lib.lif_multithreshold(x[None], **lif._asdict())
    return spike_merge_conv([s[0] for s in spikes], kernel, strides)
  return _lif_merge(x.astype(dtype), kernel.astype(dtype), lif, interpret)
