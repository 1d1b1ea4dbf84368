"""MBPL's whole T = 1 output as two Pallas TPU kernels: spikes, merge conv, LayerNorm and count.

  y = Σ_k S_k + LN(Σ_k DW7_k(S_k) + shift) ⊙ scale + bias,   S_k = Θ(H(x) - V_th,k)

(DESIGN.md §3; `scale` and `bias` are the merge LayerNorm's affine with γ folded in, as
`layers.norms.ScaledLayerNorm` folds it). `pallas_tpu.merge`'s fused kernels make the spikes
and the merge from the LIF input x; these also apply the LayerNorm over the channels and add the
count, so the SPK block's output comes out of one call and nothing of the block but x and the
LayerNorm's input u = Z + shift (in x's dtype, as the portable LayerNorm keeps it) is stored:

  forward   reads x, writes y and u, and each branch's spike sum (the firing rates)
  backward  reads x, u and y's cotangent g; at the first branch it takes the LayerNorm's
            backward into a float32 VMEM copy of Z's cotangent (and the partial sums of the
            shift's, scale's and bias's gradients), then per branch the merge's transposed
            taps as in `pallas_tpu.merge`; x's cotangent Σ_k (g + dS_k) ⊙ surrogate_k(x)
            accumulates in VMEM over the branches

A step holds the whole map of one image with all C channels (the LayerNorm reduces over C),
so only shapes whose map fits `merge.VMEM_BUDGET` that way take these kernels (`plan`); the
others (at 224 pixels the stem's 112x112 maps, and the 4C-wide ones of the first two stages)
get the parts composed. The firing rates carry
no gradient (the train step reports them; no loss uses them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from spikeatconv_jax.layers import norms
from spikeatconv_jax.pallas_tpu import hold, merge
from spikeatconv_jax.snn import lif as lif_lib

_F32 = jnp.float32


def vmem_estimate(h: int, w: int, c: int, ksize: int, itemsize: int) -> int:
  """VMEM bytes the backward kernel (the larger) plans for on an [h, w, c] map: x, u, g and
  x's cotangent double-buffered, the two bordered float32 scratch maps, the taps' partial sums
  and x's float32 cotangent."""
  p, tile = ksize // 2, merge._tile_bytes
  maps = 4 * tile(h, w, c, itemsize) + 2 * 2 * tile(1, ksize * ksize, c, 4)
  scratch = 2 * tile(h + 2 * p, w + 2 * p, c, 4) + tile(ksize * ksize, w, c, 4) + tile(h, w, c, 4)
  return 2 * maps + scratch


def plan(shape, kernel_shape, strides, dtype) -> merge.Plan | str:
  """`merge.Plan(H, False)` (the whole map in one step) for a site of `shape` [N, H, W, C], or
  why these kernels do not take it."""
  _, h, w, c = shape
  ks = kernel_shape[0]
  base = merge.plan(shape, kernel_shape, strides, dtype, lif=True)
  if isinstance(base, str):
    return base
  need = vmem_estimate(h, w, c, ks, jnp.dtype(dtype).itemsize)
  if need > merge.VMEM_BUDGET:
    return f"a whole {h}x{w}x{c} map needs {need / 2**20:.1f} MiB of VMEM"
  return merge.Plan(h, False)


def _layout(x, wt) -> merge._Layout:
  n, h, w, c = x.shape
  k, ks = wt.shape[0], math.isqrt(wt.shape[1])
  got = plan(x.shape, (ks, ks, k, c), (1, 1), x.dtype)
  if isinstance(got, str):
    raise ValueError(f"merge + LayerNorm kernels: {got}")
  return merge._Layout(k, n, h, w, c, ks, got, whole_channels=True, rows=_rows(h, w, c))


def _rows(h: int, w: int, c: int) -> int:
  """Output rows per inner step: a float32 chunk of all C channels no larger than the
  channel-blocked kernels' (8 rows of 56 columns of 128 lanes), which Mosaic keeps within the
  scoped VMEM limit."""
  row = merge._tile_bytes(1, w, c, 4)
  cap = max(1, merge._tile_bytes(merge._ROWS, 56, merge._LANES, 4) // row)
  return max(r for r in range(1, min(h, cap) + 1) if h % r == 0)


def _stats(u, eps):
  """Per-pixel mean and 1/std over the channels (last axis), float32, two-pass."""
  mu = jnp.mean(u, axis=-1, keepdims=True)
  d = u - mu
  return mu, jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + eps)


def _count(x, th_all_ref, lif, k):
  """Σ_k Θ(H(x) - V_th,k), float32."""
  v = lif_lib.first_potential(x, lif)
  return sum((v - th_all_ref[j] >= 0).astype(_F32) for j in range(k))


def _forward_kernel(
  x_ref, w_ref, th_ref, th_all_ref, prm_ref, y_ref, u_ref, rate_ref, pad_ref, acc_ref,
  *, ksize, h, w, rows, banded, lif, eps, k,
):  # fmt: skip
  del banded  # always the whole map
  kk = pl.program_id(3)
  p = ksize // 2
  pl.when(kk == 0)(lambda: merge._zero(acc_ref, pad_ref))
  merge._fill(pad_ref, x_ref, p=p, h=h, w=w, banded=False, fn=merge._lif_spikes(lif, th_ref))
  rate_ref[0, 0] = jnp.sum(jnp.sum(pad_ref[...], axis=0), axis=0, keepdims=True)
  merge.accumulate_taps(acc_ref, pad_ref, w_ref, ksize=ksize, h=h, w=w, rows=rows)

  @pl.when(kk == pl.num_programs(3) - 1)
  def _():
    dt = y_ref.dtype
    shift, scale, bias = prm_ref[0], prm_ref[1], prm_ref[2]

    def norm(i, carry):
      h0 = pl.multiple_of(i * rows, rows)
      # As the composed block rounds them: Z, Z + shift and the LayerNorm in the map's dtype.
      z = acc_ref[pl.ds(h0, rows), :, :].astype(dt).astype(_F32)
      u = (z + shift).astype(dt)
      uf = u.astype(_F32)
      mu, r = _stats(uf, eps)
      ln = ((uf - mu) * (r * scale) + bias).astype(dt).astype(_F32)
      cnt = _count(x_ref[0, pl.ds(h0, rows), :, :].astype(_F32), th_all_ref, lif, k)
      u_ref[0, pl.ds(h0, rows), :, :] = u
      y_ref[0, pl.ds(h0, rows), :, :] = (cnt + ln).astype(dt)
      return carry

    jax.lax.fori_loop(0, h // rows, norm, 0)


def _backward_kernel(
  x_ref, g_ref, u_ref, w_ref, th_ref, prm_ref, dx_ref, dw_ref, dp_ref,
  gpad_ref, xpad_ref, dwacc_ref, dxacc_ref, *, ksize, h, w, rows, banded, lif, eps,
):  # fmt: skip
  del banded
  p = ksize // 2

  @pl.when(pl.program_id(3) == 0)
  def _():
    # The LayerNorm's backward (`layers.norms.normalize`) into gpad: Z's cotangent, float32.
    merge._zero(dxacc_ref, gpad_ref, xpad_ref)
    scale = prm_ref[1]

    def norm(i, sums):
      h0 = pl.multiple_of(i * rows, rows)
      gy = g_ref[0, pl.ds(h0, rows), :, :].astype(_F32)
      uf = u_ref[0, pl.ds(h0, rows), :, :].astype(_F32)
      mu, r = _stats(uf, eps)
      xh = (uf - mu) * r
      dyg = gy * scale
      m1 = jnp.mean(dyg, axis=-1, keepdims=True)
      m2 = jnp.mean(dyg * xh, axis=-1, keepdims=True)
      gz = r * (dyg - m1 - xh * m2)
      gpad_ref[pl.ds(h0 + p, rows), p : p + w, :] = gz
      return tuple(
        s + jnp.sum(jnp.sum(v, axis=0), axis=0, keepdims=True)
        for s, v in zip(sums, (gz, gy * xh, gy), strict=True)
      )

    zero = jnp.zeros((1, dp_ref.shape[-1]), _F32)
    sums = jax.lax.fori_loop(0, h // rows, norm, (zero, zero, zero))
    for j, s in enumerate(sums):  # the shift's, scale's and bias's gradients (partial)
      dp_ref[0, j : j + 1, :] = s

  merge._fill(xpad_ref, x_ref, p=p, h=h, w=w, banded=False, fn=merge._lif_spikes(lif, th_ref))
  rows_of = lambda ref: lambda h0: ref[0, pl.ds(h0, rows), :, :].astype(_F32)  # noqa: E731
  merge.lif_branch_backward(
    rows_of(x_ref), gpad_ref, xpad_ref, w_ref, th_ref, dwacc_ref, dxacc_ref, dw_ref, dx_ref,
    ksize=ksize, h=h, w=w, rows=rows, lif=lif,
    extra_rows=rows_of(g_ref),  # the count's share of dS_k: y's cotangent itself
  )  # fmt: skip


def _full(shape):
  """A block of the whole (small) array at every grid step."""
  return pl.BlockSpec(shape, lambda i, j, r, kk: (0,) * len(shape))


def _forward_call(x, wt, th, prm, *, lif, eps, interpret=False):
  """(y, u, per-image spike sums [N, K, 1, C]) on one device; x [N, H, W, C]; wt [K, ks*ks,
  C]; th [K, 1, C]; prm [3, 1, C] float32: shift (rounded to x's dtype), scale, bias."""
  lay = _layout(x, wt)
  n, h, w, c, item = lay.n, lay.h, lay.w, lay.c, x.dtype.itemsize
  cost = pl.CostEstimate(
    flops=2 * lay.k * lay.taps * n * h * w * c + 12 * n * h * w * c,
    transcendentals=n * h * w,
    bytes_accessed=n * h * w * c * 3 * item + lay.steps() * (lay.taps + 1) * c * item,
  )
  return pl.pallas_call(
    lay.bind(_forward_kernel, lif=lif, eps=eps, k=lay.k),
    grid=lay.grid,
    in_specs=[
      lay.map_spec(False),
      lay.tap_spec(),
      lay.threshold_spec(),
      _full((lay.k, 1, c)),
      _full((3, 1, c)),
    ],
    out_specs=[
      lay.out_spec(False),
      lay.out_spec(False),
      pl.BlockSpec((1, 1, 1, c), lambda i, j, r, kk: (i, kk, 0, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((n, h, w, c), x.dtype),
      jax.ShapeDtypeStruct((n, h, w, c), x.dtype),
      jax.ShapeDtypeStruct((n, lay.k, 1, c), _F32),
    ],
    scratch_shapes=lay.scratch(1) + [pltpu.VMEM((h, w, c), _F32)],
    compiler_params=lay.params(),
    cost_estimate=cost,
    interpret=interpret,
    name="lif_merge_norm_fwd",
  )(x, wt, th, th, prm)


def _backward_call(x, u, g, wt, th, prm, *, lif, eps, interpret=False):
  """The cotangents on one device: x's [N, H, W, C] in x.dtype, the kernel's per image
  [N, K, 1, ks*ks, C] and (shift, scale, bias)'s per image [N, 3, C], float32."""
  lay = _layout(x, wt)
  n, h, w, c, item = lay.n, lay.h, lay.w, lay.c, x.dtype.itemsize
  cost = pl.CostEstimate(
    flops=(4 * lay.taps + 10) * lay.k * n * h * w * c + 16 * n * h * w * c,
    transcendentals=n * h * w,
    bytes_accessed=n * h * w * c * 4 * item + lay.steps() * lay.taps * c * (item + 4),
  )
  return pl.pallas_call(
    lay.bind(_backward_kernel, lif=lif, eps=eps),
    grid=lay.grid,
    in_specs=[
      lay.map_spec(False),
      lay.map_spec(False),
      lay.map_spec(False),
      lay.tap_spec(),
      lay.threshold_spec(),
      _full((3, 1, c)),
    ],
    out_specs=[
      lay.out_spec(False),
      pl.BlockSpec((1, 1, 1, lay.taps, c), lambda i, j, r, kk: (i, kk, 0, 0, 0)),
      pl.BlockSpec((1, 3, c), lambda i, j, r, kk: (i, 0, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((n, h, w, c), x.dtype),
      jax.ShapeDtypeStruct((n, lay.k, 1, lay.taps, c), _F32),
      jax.ShapeDtypeStruct((n, 3, c), _F32),
    ],
    scratch_shapes=lay.scratch(2)
    + [pltpu.VMEM((lay.taps, w, c), _F32), pltpu.VMEM((h, w, c), _F32)],
    compiler_params=lay.params(),
    cost_estimate=cost,
    interpret=interpret,
    name="lif_merge_norm_bwd",
  )(x, g, u, wt, th, prm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _block(x, kernel, prm, lif, eps, interpret):
  return _block_fwd(x, kernel, prm, lif, eps, interpret)[0]


def _block_fwd(x, kernel, prm, lif, eps, interpret):
  k, c = kernel.shape[2:]
  fn = functools.partial(_forward_call, lif=lif, eps=eps, interpret=interpret)
  th = merge._thresholds(lif, k, c)
  y, u, spikes = merge._per_device(fn, ("n", "", "", ""), ["n", "n", "n"])(
    x, merge._tap_kernel(kernel), th, prm
  )
  return (y, spikes), (x, u, kernel, prm)


def _block_bwd(lif, eps, interpret, res, cts):
  x, u, kernel, prm = res
  g = cts[0].astype(x.dtype)  # the spike sums' cotangent is dropped (see the module docstring)
  k, c = kernel.shape[2:]
  fn = functools.partial(_backward_call, lif=lif, eps=eps, interpret=interpret)
  dx, dwp, dpp = merge._per_device(fn, ("n", "n", "n", "", "", ""), ["n", "n", "n"])(
    x, u, g, merge._tap_kernel(kernel), merge._thresholds(lif, k, c), prm
  )
  dw = merge.kernel_grad(dwp, kernel.shape).astype(kernel.dtype)
  return dx, dw, jnp.sum(dpp, axis=0)[:, None, :]


_block.defvjp(_block_fwd, _block_bwd)


def lif_merge_norm(
  x, kernel, shift, scale, bias, lif: lif_lib.LIFParams, epsilon: float, *, interpret=False
):
  """The "pallas_tpu" table's `lif_merge_norm` (contract in `layers.ops`): (y, rates [K, 1]);
  where `plan` takes no plan for x's shape, the LIF, `merge.lif_spike_merge` and the
  LayerNorm composed."""
  k = kernel.shape[2]
  if k != len(lif.v_thresholds):
    n = len(lif.v_thresholds)
    raise ValueError(f"lif_merge_norm: a kernel of {k} branches for {n} thresholds")
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  if isinstance(plan(x.shape, kernel.shape, (1, 1), dtype), str):
    return _composed(
      x.astype(dtype), kernel.astype(dtype), shift, scale, bias, lif, epsilon, interpret
    )
  prm = jnp.stack([shift.astype(dtype).astype(_F32), scale.astype(_F32), bias.astype(_F32)])[
    :, None, :
  ]
  y, spikes = _block(x.astype(dtype), kernel.astype(dtype), prm, lif, float(epsilon), interpret)
  rates = jnp.sum(jax.lax.stop_gradient(spikes), axis=(0, 2, 3)) / math.prod(x.shape)
  return y, rates[:, None]


def _composed(x, kernel, shift, scale, bias, lif, eps, interpret):
  """`lif_merge_norm` from its parts, as the SPK block composes them: the spikes and the merge
  recomputed in the backward from x, the LayerNorm keeping its input and row statistics."""

  def spikes_and_merge(x, kernel):
    spikes = lif_lib.lif_multithreshold(hold.materialize_cotangent(x)[None], **lif._asdict())
    rates = jnp.stack([jnp.mean(s.astype(_F32), axis=(1, 2, 3, 4)) for s in spikes])
    count = sum(spikes[1:], spikes[0])[0]
    return rates, count, merge.lif_spike_merge(x, kernel, (1, 1), lif, interpret=interpret)

  fn = jax.checkpoint(spikes_and_merge, policy=jax.checkpoint_policies.nothing_saveable)
  rates, count, z = fn(x, kernel)
  u = z + shift.astype(z.dtype)
  y = norms.normalize(u, scale, bias, (x.ndim - 1,), float(eps), x.dtype)[0]
  return (count + y).astype(x.dtype), jax.lax.stop_gradient(rates)
