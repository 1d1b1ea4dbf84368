"""Depthwise convolution and MBPL's branch-summed merge in the forms XLA:CPU runs fast.

XLA:CPU runs grouped convolutions at well under 1 GFLOP/s (50-100x below its dense matmul),
which would dominate every ConvNeXt block of a CPU run. The forms here compute the same
function as `layers.dwconv.depthwise_conv2d_lax`:

- `depthwise_conv2d_shift`: the sum over the kh*kw kernel offsets of (strided) slices of the
  padded input times per-channel weights; XLA fuses the whole sum into one vectorised loop. Its
  `custom_vjp` input gradient is the same shift-sum with the flipped kernel over the padded
  cotangent (for stride > 1 split by input phase, each phase using every s-th tap); the kernel
  gradient is one reduction per kernel offset, run as a loop (`kernel_grad_taps_loop`).
  Autodiff of the slices would instead build kh*kw padded copies of the cotangent. Products
  are accumulated in float32 and cast back to the input dtype.
- `depthwise_conv2d_matmul`: for small maps, one batched matrix product per channel: a
  [H'W', HW] Toeplitz matrix per channel, built from the taps by a matmul with a constant 0/1
  selector. It costs HW/(kh*kw) times the conv's FLOPs but runs at matmul speed.
- `native.depthwise_conv2d_native`: native custom calls (XLA FFI), vectorised over channels and
  threaded; opaque to XLA, so the compiled graph stays small.

`implementation(spatial, batch)` picks one: the native kernels when they build (the Toeplitz
matmul for small maps at large batches); without them, the Toeplitz matmul for small maps where
`_matmul_pays`, else the shift form. For benchmarks, `set_implementation(...)`,
`with using(...)` or `SPIKEATCONV_DWCONV=auto|lax|lax_taps|shift|matmul|native` force a form
(the module setting wins); they only affect the "xla_cpu" table, and are read at trace time.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spikeatconv_jax.layers import dwconv as portable
from spikeatconv_jax.xla_cpu import native

IMPLEMENTATIONS = ("auto", "lax", "lax_taps", "shift", "matmul", "native")
ENV_VAR = "SPIKEATCONV_DWCONV"
_override: str | None = None


def set_implementation(name: str | None) -> None:
  """Forces the form the "xla_cpu" table uses (one of IMPLEMENTATIONS; None clears)."""
  global _override
  if name is not None and name not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown depthwise conv implementation {name!r}; use one of {IMPLEMENTATIONS}"
    )
  _override = name


@contextlib.contextmanager
def using(name: str | None):
  """`with using("shift"): ...` sets the form for the block, then restores the previous."""
  previous = _override
  set_implementation(name)
  try:
    yield
  finally:
    set_implementation(previous)


# Without the native kernels, `auto` uses the shift form for maps of at least this many
# positions and the Toeplitz matmul below it (fwd+bwd, 7x7: the matmul wins on 16x16 maps at
# batch 128, the shift form on 28x28 maps at batch 8).
SHIFT_MIN_POSITIONS = 400


def _matmul_pays(positions: int, batch: int) -> bool:
  """Cost model, Toeplitz matmul vs shift-sum, per channel, fwd+bwd.

  The matmul does 6·N·P² flops for the products plus 4·49·P² for building the Toeplitz matrices
  and their gradient, which no batch amortises. The shift form does 6·49·N·P at about 1/15 of
  matmul speed (fitted to benchmarks/dwconv.py on a 2-core CPU).
  """
  return positions * (6 * batch + 196) < 15 * 294 * batch


# With the native kernels, `auto` still takes the Toeplitz matmul for maps of at most this many
# positions at a batch of at least NATIVE_MATMUL_MIN_BATCH: there the matmul's fixed cost is
# amortised and it beats the native loops (benchmarks/dwconv.py, nano's 8x8 maps at batch 64).
NATIVE_MATMUL_MAX_POSITIONS = 64
NATIVE_MATMUL_MIN_BATCH = 32


def implementation(spatial: tuple[int, int] | None = None, batch: int | None = None) -> str:
  """The form the "xla_cpu" table's depthwise conv uses: "native", "matmul" or "shift" (or an
  override: "lax", "lax_taps").

  Args:
    spatial: (H, W) of the input; None: as for a large map.
    batch: the conv's batch size N (all leading axes folded).
  """
  name = _override if _override is not None else os.environ.get(ENV_VAR, "auto") or "auto"
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{ENV_VAR}={name!r} is not one of {IMPLEMENTATIONS}")
  if name != "auto":
    return name
  if native.available():
    small = spatial is not None and spatial[0] * spatial[1] <= NATIVE_MATMUL_MAX_POSITIONS
    big_batch = batch is not None and batch >= NATIVE_MATMUL_MIN_BATCH
    return "matmul" if small and big_batch else "native"
  if spatial is None:
    return "shift"
  positions = spatial[0] * spatial[1]
  small = positions < SHIFT_MIN_POSITIONS
  if small and batch is not None:
    small = _matmul_pays(positions, batch)
  return "matmul" if small else "shift"


def _shift_sum(xp: jax.Array, kernel: jax.Array, out_hw: tuple[int, int], strides) -> jax.Array:
  """sum_{a,b} xp[:, a::sh, b::sw, :, None] * kernel[a, b] in float32 -> [N, Ho, Wo, C*M].

  xp [N, Hp, Wp, C] is already padded; kernel [kh, kw, C, M].
  """
  n, _, _, c = xp.shape
  kh, kw, _, m = kernel.shape
  (ho, wo), (sh, sw) = out_hw, strides
  k32 = kernel.astype(jnp.float32)
  acc = None
  for a in range(kh):
    for b in range(kw):
      window = lax.slice(
        xp, (0, a, b, 0), (n, a + (ho - 1) * sh + 1, b + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
      )  # [N, Ho, Wo, C]
      term = window.astype(jnp.float32)[..., None] * k32[a, b]  # [N, Ho, Wo, C, M]
      acc = term if acc is None else acc + term
  return acc.reshape(n, ho, wo, c * m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dwconv_shift(x, kernel, strides):
  pads, out_hw = portable.geometry(x.shape, kernel.shape, strides)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  dtype = jnp.result_type(x, kernel)
  return _shift_sum(xp, kernel, out_hw, strides).astype(dtype)


def _dwconv_shift_fwd(x, kernel, strides):
  return _dwconv_shift(x, kernel, strides), (x, kernel)


def _phase_taps(k: int, s: int, lo: int, r: int) -> tuple[int, int, int]:
  """Input rows p = s*u + r get kernel taps a0, a0 + s, ...: returns (a0, taps, q).

  dx[s*u + r] = sum_t g[u + q - t] * kernel[a0 + s*t] (a stride-1 correlation per phase r).
  """
  a0 = (r + lo) % s
  taps = max(0, -(-(k - a0) // s))
  return a0, taps, (r + lo - a0) // s


def _input_grad(g: jax.Array, kernel: jax.Array, x_hw, pads, strides) -> jax.Array:
  """Transpose of the strided depthwise conv, computed per output phase without zero-dilation.

  g [N, Ho, Wo, C*M], kernel [kh, kw, C, M] -> dx [N, H, W, C] in float32. For stride s the
  input rows split into s phases (p mod s); each phase sees only every s-th kernel tap, so the
  phase is a stride-1 shift-sum of the padded cotangent with that flipped sub-kernel. Dilating
  the cotangent with zeros instead would spend (1 - 1/s^2) of the work on zeros.
  """
  n, ho, wo, _ = g.shape
  kh, kw, c, m = kernel.shape
  (h, w), (sh, sw) = x_hw, strides
  # [M, N, Ho, Wo, C]: one copy so that every (a, b, m) term below reads a contiguous slice.
  gm = g.reshape(n, ho, wo, c, m).transpose(4, 0, 1, 2, 3) if m > 1 else g[None]
  phases = []
  for rh in range(sh):
    a0, th, qh = _phase_taps(kh, sh, pads[0][0], rh)
    row = []
    for rw in range(sw):
      b0, tw, qw = _phase_taps(kw, sw, pads[1][0], rw)
      if th == 0 or tw == 0:  # kernel smaller than the stride: these inputs are never read
        row.append(jnp.zeros((n, ho, wo, c), jnp.float32))
        continue
      gp = lax.pad(
        gm,
        jnp.zeros((), gm.dtype),
        ((0, 0, 0), (0, 0, 0), (th - 1 - qh, qh, 0), (tw - 1 - qw, qw, 0), (0, 0, 0)),
      )  # [M, N, Ho + th - 1, Wo + tw - 1, C]
      k_sub = kernel[a0::sh, b0::sw][::-1, ::-1].astype(jnp.float32)  # [th, tw, C, M]
      acc = None
      for a in range(th):
        for b in range(tw):
          for j in range(m):
            term = gp[j, :, a : a + ho, b : b + wo].astype(jnp.float32) * k_sub[a, b, :, j]
            acc = term if acc is None else acc + term
      row.append(acc)  # [N, Ho, Wo, C]
    phases.append(jnp.stack(row, axis=3) if sw > 1 else row[0][:, :, :, None])
  dx = jnp.stack(phases, axis=2) if sh > 1 else phases[0][:, :, None]  # [N, Ho, sh, Wo, sw, C]
  return dx.reshape(n, ho * sh, wo * sw, c)[:, :h, :w]


def _dwconv_shift_bwd(strides, res, g):
  x, kernel = res
  pads, _ = portable.geometry(x.shape, kernel.shape, strides)
  dx = _input_grad(g, kernel, x.shape[1:3], pads, strides)
  dk = kernel_grad_taps_loop(x, g, kernel.shape[:2], 1, strides).reshape(kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_dwconv_shift.defvjp(_dwconv_shift_fwd, _dwconv_shift_bwd)


def kernel_grad_taps_loop(x, g, kernel_hw, in_per_group: int, strides) -> jax.Array:
  """`layers.dwconv.kernel_grad_taps` (same arguments and sums) with one kernel offset per
  iteration of a loop. Unrolled, XLA:CPU materialised all kh*kw products at once (a temporary of
  ~49x the activation)."""
  n, _, _, gi = x.shape
  _, ho, wo, go = g.shape
  kh, kw = kernel_hw
  groups = gi // in_per_group
  pads, _ = portable.geometry(x.shape, (kh, kw), strides)
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  g5 = g.astype(jnp.float32).reshape(n, ho, wo, groups, 1, go // groups)
  span = ((ho - 1) * sh + 1, (wo - 1) * sw + 1)

  def tap(t):
    a, b = t // kw, t % kw
    win = lax.dynamic_slice(xp, (0, a, b, 0), (n, *span, gi))[:, ::sh, ::sw]
    win = win.astype(jnp.float32).reshape(n, ho, wo, groups, in_per_group, 1)
    dk = jnp.sum(win * g5, axis=(0, 1, 2))  # [G, I, O]
    return dk.transpose(1, 0, 2).reshape(in_per_group, go)

  return lax.map(tap, jnp.arange(kh * kw)).reshape(kh, kw, in_per_group, go)


def depthwise_conv2d_shift(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Depthwise conv as a fused sum of shifted slices, with a custom VJP.

  Args:
    x: [N, H, W, C] input.
    kernel: [kh, kw, C, M] per-channel filters, M the channel multiplier.
    strides: (sh, sw).

  Returns:
    [N, ceil(H/sh), ceil(W/sw), C*M], channel c*M + m; equal to `depthwise_conv2d_lax` up to
    float rounding (accumulated in float32, returned in the promoted input dtype).
  """
  strides = portable.check(x, kernel, strides)
  return _dwconv_shift(x, kernel, strides)


@functools.lru_cache(maxsize=256)
def _toeplitz_index(h, w, kh, kw, sh, sw) -> np.ndarray:
  """[H'W', HW] int32: flat kernel tap linking output p to input q, or kh*kw (a zero) if none."""
  (pt, _), (pl, _) = lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), "SAME")
  ho, wo = -(-h // sh), -(-w // sw)
  idx = np.full((ho, wo, h, w), kh * kw, np.int32)
  oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
  for dy in range(kh):
    for dx in range(kw):
      iy, ix = oy * sh + dy - pt, ox * sw + dx - pl
      ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
      idx[oy[ok], ox[ok], iy[ok], ix[ok]] = dy * kw + dx
  return idx.reshape(ho * wo, h * w)


@functools.lru_cache(maxsize=256)
def _toeplitz_selector(h, w, kh, kw, sh, sw) -> np.ndarray:
  """[kh*kw, H'W', HW] float32 0/1: entry (t, q, p) is 1 when kernel tap t links input p to
  output q. Contracting it with the taps builds the Toeplitz matrices with a dense matmul, whose
  transpose (the kernel gradient) is a dense matmul too; indexing the taps would need a
  scatter-add in the backward pass, which XLA:CPU runs serially."""
  idx = _toeplitz_index(h, w, kh, kw, sh, sw)
  q, p = np.nonzero(idx < kh * kw)
  sel = np.zeros((kh * kw,) + idx.shape, np.float32)
  sel[idx[q, p], q, p] = 1.0
  return sel


def _toeplitz_matmul(x: jax.Array, taps: jax.Array, hw, kernel_hw, strides) -> jax.Array:
  """y[n, q, c] = Σ_{p, k} x[n, p, k, c] · T_c[q, (p, k)], one matrix product per channel.

  x [N, HW, C, K]; taps [kh*kw, K, C]; returns [N, H'W', C] in float32. The channel is the
  leading (batch) axis of the product and the K branches share its contraction with the input
  positions, so the product reads [C, N, HW*K] x [C, HW*K, H'W'] at once.
  """
  n, npos, c, k = x.shape
  sel = jnp.asarray(_toeplitz_selector(*hw, *kernel_hw, *strides), x.dtype)
  mat = jnp.einsum("tqp,tkc->cpkq", sel, taps.astype(x.dtype))  # [C, HW, K, H'W']
  mat = mat.reshape(c, npos * k, -1)
  xs = jnp.transpose(x, (2, 0, 1, 3)).reshape(c, n, npos * k)  # [C, N, HW*K]
  y = lax.dot_general(
    xs, mat, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
  )  # [C, N, H'W']
  return jnp.transpose(y, (1, 2, 0))


def depthwise_conv2d_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Depthwise conv as a per-channel [H'W', HW] Toeplitz matrix product (for small maps)."""
  strides = portable.check(x, kernel, strides)
  n, h, w, c = x.shape
  kh, kw, _, m = kernel.shape
  ho, wo = -(-h // strides[0]), -(-w // strides[1])
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  xf = x.astype(dtype).reshape(n, h * w, c, 1)
  if m > 1:
    xf = jnp.repeat(xf, m, axis=2)  # input channel c feeds outputs c*M .. c*M + M-1
  taps = kernel.astype(dtype).reshape(kh * kw, 1, c * m)
  y = _toeplitz_matmul(xf, taps, (h, w), (kh, kw), strides)
  return y.reshape(n, ho, wo, c * m).astype(dtype)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Depthwise conv in the form `implementation` picks for this shape."""
  strides = portable.check(x, kernel, strides)
  impl = implementation(x.shape[1:3], x.shape[0])
  if impl == "native":
    return native.depthwise_conv2d_native(x, kernel, strides)
  if impl == "shift":
    return depthwise_conv2d_shift(x, kernel, strides)
  if impl == "matmul":
    return depthwise_conv2d_matmul(x, kernel, strides)
  if impl == "lax_taps":
    return portable.depthwise_conv2d_lax_taps(x, kernel, strides)
  return portable.depthwise_conv2d_lax(x, kernel, strides)


def depthwise_conv2d_sum(
  xs: Sequence[jax.Array],
  kernel: jax.Array,
  strides: Sequence[int] = (1, 1),
  impl: str | None = None,
  integer_inputs: bool = False,
) -> jax.Array:
  """Σ_k depthwise_conv2d(xs[k], kernel[:, :, k, :]): K branches [N, H, W, C] -> [N, H', W', C].

  In the form `implementation` picks (or `impl`): the native kernels with the K branches as
  separate operands (nothing stacked; the K-branch sum happens in the output registers), the
  Toeplitz product with the K branches inside its contraction, the shift form over the C*K
  stacked channels then a sum over K, or lax's grouped conv.

  integer_inputs: the branches hold integers in [-128, 127] (spikes); the native kernels then
  read and keep them as int8 (`native.depthwise_conv2d_native_sum`). The other forms compute
  the same result either way.
  """
  strides = portable.check_sum(xs, kernel, strides)
  n, h, w, c = xs[0].shape
  k = len(xs)
  kh, kw = kernel.shape[:2]
  impl = impl or implementation((h, w), n)
  if impl == "native":
    return native.depthwise_conv2d_native_sum(xs, kernel, strides, integer_inputs=integer_inputs)
  if impl == "lax":
    return portable.branch_sum_conv2d_lax(xs, kernel, strides)
  if impl == "lax_taps":
    return portable.branch_sum_conv2d_lax_taps(xs, kernel, strides)
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  x = jnp.stack([x.astype(dtype) for x in xs], axis=-1)  # [N, H, W, C, K]
  if impl == "matmul":
    ho, wo = -(-h // strides[0]), -(-w // strides[1])
    taps = kernel.astype(dtype).reshape(kh * kw, k, c)
    y = _toeplitz_matmul(x.reshape(n, h * w, c, k), taps, (h, w), (kh, kw), strides)
    return y.reshape(n, ho, wo, c).astype(dtype)
  # shift: the plain depthwise conv over the C*K stacked channels, then the sum over K.
  kern = jnp.swapaxes(kernel, 2, 3).reshape(kh, kw, c * k, 1)  # channel c*K + k, like x
  y = depthwise_conv2d_shift(x.reshape(n, h, w, c * k), kern, strides)
  return y.reshape(n, *y.shape[1:3], c, k).sum(axis=4, dtype=jnp.float32).astype(dtype)


def spike_merge_conv(xs: Sequence[jax.Array], kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """The "xla_cpu" table's `spike_merge_conv`: its inputs are integer-valued by contract, so the
  native kernels read and keep them as int8."""
  return depthwise_conv2d_sum(xs, kernel, strides, integer_inputs=True)
