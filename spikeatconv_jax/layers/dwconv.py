"""Depthwise 2-D convolution, NHWC, with a channel multiplier, chosen per backend.

`depthwise_conv2d(x, kernel)` maps x [N, H, W, C] and kernel [kh, kw, C, M] to
[N, H', W', C*M] (output channel c*M + m, lax's grouped-conv order), SAME padding.

These implementations compute the same function:

- `depthwise_conv2d_lax`: `lax.conv_general_dilated` with `feature_group_count=C`, what TPUs run.
  XLA:CPU runs grouped convolutions at well under 1 GFLOP/s (50-100x below its dense matmul),
  which would dominate every ConvNeXt block of a CPU run.
- `depthwise_conv2d_lax_taps`: the same forward and input gradient, with the kernel gradient as
  kh*kw per-offset reductions instead of autodiff's batch-grouped convolution, which is slow on
  XLA:GPU (jax-ml/jax#13800). What GPUs run.
- `depthwise_conv2d_shift`: the sum over the kh*kw kernel offsets of (strided) slices of the padded
  input times per-channel weights. XLA fuses the whole sum into one vectorised loop. Its gradient is
  a `custom_vjp`: the input gradient is the same shift-sum with the flipped kernel over the padded
  cotangent (for stride > 1, split by input phase p mod s, each phase using every s-th kernel
  tap); the kernel gradient is one reduction over N, H', W' per kernel offset. Autodiff of the
  slices would instead build kh*kw padded copies of the cotangent. All products are accumulated
  in float32 and the result is cast back to the input dtype (so bfloat16 inputs lose no precision
  in the 49-term sums or the N*H*W reductions).

- `depthwise_conv2d_matmul`: for small maps, the conv as one batched matrix product per channel:
  a [H'W', HW] Toeplitz matrix per output channel, built from the taps by a matmul with a
  constant 0/1 selector, and XLA's batched dot (channel as the batch axis) does the rest. It
  costs HW/(kh*kw) times the conv's FLOPs (1.3x on an 8x8 map with a 7x7 kernel) but runs at
  matmul speed and compiles fast. Plain autodiff gives its gradient.

- `depthwise_conv2d_native` (`dwconv_native`): native XLA:CPU custom calls (XLA FFI) for the
  forward pass and both gradients, vectorised over channels and threaded; built with the
  system C++ compiler on first use. 9-17x faster fwd+bwd than the shift form on tiny's shapes,
  and opaque to XLA, so the compiled graph stays small.

`depthwise_conv2d_sum` is the grouped conv K*C -> C with groups=C (MBPL's merge) in the same
forms. On CPU, `auto` picks the native kernels when they build (the Toeplitz matmul for maps of
at most NATIVE_MATMUL_MAX_POSITIONS positions at large batches). Without them it picks the
Toeplitz matmul for small maps (below SHIFT_MIN_POSITIONS positions, and where `_matmul_pays`
for the batch) and the shift form otherwise. On TPU it picks lax's grouped convolution, on GPU
`lax_taps`.
Override with `set_implementation(...)`, `with using(...)`, or the env var
`SPIKEATCONV_DWCONV=auto|lax|lax_taps|shift|matmul|native` (the module setting wins). The choice
is made when a function is traced, so change it before `jax.jit` compiles the caller.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spikeatconv_jax.layers import dwconv_native

Dtype = Any

IMPLEMENTATIONS = ("auto", "lax", "lax_taps", "shift", "matmul", "native")
ENV_VAR = "SPIKEATCONV_DWCONV"
_override: str | None = None


def set_implementation(name: str | None) -> None:
  """Forces the implementation `depthwise_conv2d` uses (one of IMPLEMENTATIONS; None clears)."""
  global _override
  if name is not None and name not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown depthwise conv implementation {name!r}; use one of {IMPLEMENTATIONS}"
    )
  _override = name


@contextlib.contextmanager
def using(name: str | None):
  """`with using("lax"): ...` sets the implementation for the block, then restores the previous."""
  previous = _override
  set_implementation(name)
  try:
    yield
  finally:
    set_implementation(previous)


# How `_kernel_grad_taps` schedules its kh*kw reductions: "auto" (a loop on CPU, stacked
# elsewhere), "loop" or "stacked". Read when a function is traced.
TAPS_FORM = "auto"

# On CPU, `auto` uses the shift form for maps of at least this many positions and the Toeplitz
# matmul below it. Measured here (fwd+bwd, 7x7, 2 cores): on [128,16,16,128] matmul 298 ms,
# shift 989 ms, lax 3119 ms; on [8,28,28,128] matmul 1171 ms, shift 200 ms, lax 1055 ms.
SHIFT_MIN_POSITIONS = 400


def _matmul_pays(positions: int, batch: int) -> bool:
  """CPU cost model, Toeplitz matmul vs shift-sum, per channel, fwd+bwd.

  The matmul does 6·N·P² flops for the products plus 4·49·P² for building the Toeplitz matrices
  and their gradient, which no batch amortises. The shift form does 6·49·N·P at about 1/15 of
  matmul speed. Fitted to benchmarks/dwconv.py here: [8,14,14,256] shift 39 ms vs matmul 105 ms;
  [128,16,16,128] matmul 298 ms vs shift 989 ms.
  """
  return positions * (6 * batch + 196) < 15 * 294 * batch


# With the native kernels, `auto` still takes the Toeplitz matmul for maps of at most this many
# positions at a batch of at least NATIVE_MATMUL_MIN_BATCH, where it measured faster fwd+bwd
# (benchmarks/dwconv.py: [64,8,8,32] matmul 2.2 ms vs native 3.6 ms; [8,7,7,512] matmul 20.9
# ms vs native 2.6 ms).
NATIVE_MATMUL_MAX_POSITIONS = 64
NATIVE_MATMUL_MIN_BATCH = 32


def implementation(spatial: tuple[int, int] | None = None, batch: int | None = None) -> str:
  """The implementation `depthwise_conv2d` would use: "lax", "lax_taps", "shift", "matmul" or
  "native" (TPU: "lax"; GPU: "lax_taps"; CPU: below).

  Args:
    spatial: (H, W) of the input. With `auto` on CPU: the native kernels
      (`dwconv_native`) when they are built, except small maps at large batches (Toeplitz
      matmul); without them, maps smaller than SHIFT_MIN_POSITIONS positions use the Toeplitz
      matmul (when `batch` is given, only where the cost model says it pays). None: as for a
      large map.
    batch: the conv's batch size N (all leading axes folded).
  """
  name = _override if _override is not None else os.environ.get(ENV_VAR, "auto") or "auto"
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{ENV_VAR}={name!r} is not one of {IMPLEMENTATIONS}")
  if name == "auto":
    backend = jax.default_backend()
    if backend == "tpu":
      return "lax"
    if backend != "cpu":  # GPUs: no batch-grouped convolution in the backward
      return "lax_taps"
    if dwconv_native.available():
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
  return name


def _check(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> tuple[int, int]:
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
      "depthwise conv wants x [N, H, W, C] and kernel [kh, kw, C, M]; "
      f"got {x.shape}, {kernel.shape}"
    )
  if kernel.shape[2] != x.shape[3]:
    raise ValueError(
      f"kernel {kernel.shape} has {kernel.shape[2]} channels, x {x.shape} has {x.shape[3]}"
    )
  strides = tuple(int(s) for s in strides)
  if len(strides) != 2 or min(strides) < 1:
    raise ValueError(f"strides must be two positive ints, got {strides}")
  return strides


def depthwise_conv2d_lax(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Reference: lax.conv_general_dilated with feature_group_count=C."""
  strides = _check(x, kernel, strides)
  kh, kw, c, m = kernel.shape
  return lax.conv_general_dilated(
    x,
    kernel.reshape(kh, kw, 1, c * m),
    window_strides=strides,
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
  )


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


def _geometry(x_shape, kernel_shape, strides):
  """SAME padding exactly as lax splits it, and the output size."""
  (h, w), (kh, kw) = x_shape[1:3], kernel_shape[:2]
  pads = lax.padtype_to_pads((h, w), (kh, kw), strides, "SAME")
  out_hw = (-(-h // strides[0]), -(-w // strides[1]))
  return pads, out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dwconv_shift(x, kernel, strides):
  pads, out_hw = _geometry(x.shape, kernel.shape, strides)
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
  pads, _ = _geometry(x.shape, kernel.shape, strides)
  dx = _input_grad(g, kernel, x.shape[1:3], pads, strides)
  dk = _kernel_grad_taps(x, g, kernel.shape[:2], 1, strides).reshape(kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _kernel_grad_taps(x, g, kernel_hw, in_per_group: int, strides) -> jax.Array:
  """Kernel gradient of the SAME grouped conv x [N, H, W, G*I] -> g [N, H', W', G*O] (groups G,
  I = in_per_group), as one reduction per kernel offset, in float32: [kh, kw, I, G*O], the
  HWIO layout of the grouped conv's kernel.

  dk[a, b, i, q*O + o] = sum_{n,y,z} xp[n, y*sh + a, z*sw + b, q*I + i] * g[n, y, z, q*O + o].
  No batch-grouped convolution, which is what autodiff of lax's grouped conv produces (see
  `depthwise_conv2d_lax_taps`). Two schedules of the same sums (`TAPS_FORM`):

  - "loop" (XLA:CPU): one offset per iteration of a loop. Unrolled, XLA:CPU materialised all
    kh*kw products at once (a temp of ~49x the activation: 98 GB for the spiking tiny train step
    at batch 8).
  - "stacked" (other backends): the kh*kw shifted windows stacked on a leading axis and reduced
    together, so a GPU can run them as one reduction kernel whose input fusion reads the
    windows in place, instead of a loop of kh*kw small kernels. Not yet timed on a GPU.
  """
  n, h, w, gi = x.shape
  _, ho, wo, go = g.shape
  kh, kw = kernel_hw
  groups = gi // in_per_group
  out_per_group = go // groups
  pads, _ = _geometry(x.shape, (kh, kw), strides)
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  g5 = g.astype(jnp.float32).reshape(n, ho, wo, groups, 1, out_per_group)
  span = ((ho - 1) * sh + 1, (wo - 1) * sw + 1)

  form = (
    TAPS_FORM if TAPS_FORM != "auto" else "loop" if jax.default_backend() == "cpu" else "stacked"
  )
  if form not in ("loop", "stacked"):
    raise ValueError(f"dwconv.TAPS_FORM must be 'auto', 'loop' or 'stacked', got {TAPS_FORM!r}")

  def window(a, b):  # [N, H', W', G, I, 1]: the inputs that kernel offset (a, b) multiplies
    win = lax.dynamic_slice(xp, (0, a, b, 0), (n, *span, gi))[:, ::sh, ::sw]
    return win.astype(jnp.float32).reshape(n, ho, wo, groups, in_per_group, 1)

  if form == "stacked":
    wins = jnp.stack([window(t // kw, t % kw) for t in range(kh * kw)])  # [kh*kw, N, ...]
    dk = jnp.sum(wins * g5[None], axis=(1, 2, 3))  # [kh*kw, G, I, O]
    return dk.transpose(0, 2, 1, 3).reshape(kh, kw, in_per_group, go)

  def tap(t):
    dk = jnp.sum(window(t // kw, t % kw) * g5, axis=(0, 1, 2))  # [G, I, O]
    return dk.transpose(1, 0, 2).reshape(in_per_group, go)

  return lax.map(tap, jnp.arange(kh * kw)).reshape(kh, kw, in_per_group, go)


_dwconv_shift.defvjp(_dwconv_shift_fwd, _dwconv_shift_bwd)


def depthwise_conv2d_shift(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Depthwise conv as a fused sum of shifted slices (fast on XLA:CPU), with a custom VJP.

  Args:
    x: [N, H, W, C] input.
    kernel: [kh, kw, C, M] per-channel filters, M the channel multiplier.
    strides: (sh, sw).

  Returns:
    [N, ceil(H/sh), ceil(W/sw), C*M], channel c*M + m; equal to `depthwise_conv2d_lax` up to
    float rounding (accumulated in float32, returned in the promoted input dtype).
  """
  strides = _check(x, kernel, strides)
  return _dwconv_shift(x, kernel, strides)


def _grouped_conv(x, kernel, strides, groups, accumulate_f32):
  y = lax.conv_general_dilated(
    x,
    kernel,
    window_strides=strides,
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    preferred_element_type=jnp.float32 if accumulate_f32 else None,
  )
  return y.astype(jnp.result_type(x, kernel))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv_taps(x, kernel, strides, groups, accumulate_f32):
  return _grouped_conv(x, kernel, strides, groups, accumulate_f32)


def _grouped_conv_taps_fwd(x, kernel, strides, groups, accumulate_f32):
  return _grouped_conv(x, kernel, strides, groups, accumulate_f32), (x, kernel)


def _grouped_conv_taps_bwd(strides, groups, accumulate_f32, res, g):
  x, kernel = res
  # Input gradient: autodiff's own transpose (a feature-grouped convolution, as the forward).
  _, vjp_x = jax.vjp(lambda x_: _grouped_conv(x_, kernel, strides, groups, accumulate_f32), x)
  (dx,) = vjp_x(g)
  dk = _kernel_grad_taps(x, g, kernel.shape[:2], kernel.shape[2], strides)
  return dx, dk.astype(kernel.dtype)


_grouped_conv_taps.defvjp(_grouped_conv_taps_fwd, _grouped_conv_taps_bwd)


def depthwise_conv2d_lax_taps(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """lax's grouped conv forward and input gradient; the kernel gradient as kh*kw reductions.

  Autodiff of a grouped convolution writes its kernel gradient as a convolution with
  batch_group_count = groups. JAX's tracker reports the backward of grouped convs on CUDA as
  slow as a dense conv's (jax-ml/jax#13800), and the first H200 run of the base train step with
  plain lax reached 0.15 % MFU (docs/RESULTS.md; not profiled, so not proven to be this). Here
  the kernel gradient is one reduction over N, H', W' per kernel offset instead: memory-bound,
  kh*kw reads of x and the cotangent. `auto` picks this form on GPUs. Same arguments, result
  and gradients as `depthwise_conv2d_lax`.
  """
  strides = _check(x, kernel, strides)
  kh, kw, c, m = kernel.shape
  return _grouped_conv_taps(x, kernel.reshape(kh, kw, 1, c * m), strides, c, False)


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
  strides = _check(x, kernel, strides)
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
  """Depthwise conv in the form `implementation` picks for this backend and shape."""
  impl = implementation(x.shape[1:3], x.shape[0])
  if impl == "native":
    return dwconv_native.depthwise_conv2d_native(x, kernel, _check(x, kernel, strides))
  if impl == "shift":
    return depthwise_conv2d_shift(x, kernel, strides)
  if impl == "matmul":
    return depthwise_conv2d_matmul(x, kernel, strides)
  if impl == "lax_taps":
    return depthwise_conv2d_lax_taps(x, kernel, strides)
  return depthwise_conv2d_lax(x, kernel, strides)


def _check_sum(xs: Sequence[jax.Array], kernel: jax.Array) -> None:
  shapes = {tuple(x.shape) for x in xs}
  if (
    not xs
    or len(shapes) != 1
    or xs[0].ndim != 4
    or kernel.ndim != 4
    or kernel.shape[2:] != (len(xs), xs[0].shape[3])
  ):
    raise ValueError(
      "branch-summed depthwise conv wants K same-shaped branches [N, H, W, C] and a kernel "
      f"[kh, kw, K, C]; got branches {sorted(shapes)} and kernel {kernel.shape}"
    )


def depthwise_conv2d_sum(
  xs: Sequence[jax.Array],
  kernel: jax.Array,
  strides: Sequence[int] = (1, 1),
  impl: str | None = None,
  integer_inputs: bool = False,
) -> jax.Array:
  """Σ_k depthwise_conv2d(xs[k], kernel[:, :, k, :]): K branches [N, H, W, C] -> [N, H', W', C].

  The grouped convolution from K*C to C channels with groups=C (MBPL's merge, DESIGN.md §3),
  chosen per backend like `depthwise_conv2d` (or by `impl`): the native kernels with the K
  branches as separate operands (nothing stacked; the K-branch sum happens in the output
  registers), lax's grouped conv, the shift form over the C*K stacked channels then a sum over
  K, or the Toeplitz product with the K branches inside its contraction (small maps on CPU).
  The XLA forms stack the branches on a minor axis (channel c*K + k), so lax's groups (K
  consecutive channels per output channel) are a free reshape, with no transpose.

  integer_inputs: the branches are known to hold integers in [-128, 127] (MBPL's 0/1 spikes);
  the native kernels then read and keep them as int8 (`depthwise_conv2d_native_sum`). The XLA
  forms compute the same result either way.
  """
  _check_sum(xs, kernel)
  n, h, w, c = xs[0].shape
  k = len(xs)
  kh, kw = kernel.shape[:2]
  strides = _check(xs[0], kernel[:, :, 0, :, None], strides)
  impl = impl or implementation((h, w), n)
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  if impl == "native":
    return dwconv_native.depthwise_conv2d_native_sum(
      xs, kernel, strides, integer_inputs=integer_inputs
    )
  x = jnp.stack([x.astype(dtype) for x in xs], axis=-1)  # [N, H, W, C, K]
  if impl == "matmul":
    ho, wo = -(-h // strides[0]), -(-w // strides[1])
    taps = kernel.astype(dtype).reshape(kh * kw, k, c)
    y = _toeplitz_matmul(x.reshape(n, h * w, c, k), taps, (h, w), (kh, kw), strides)
    return y.reshape(n, ho, wo, c).astype(dtype)
  if impl == "shift":
    # The plain depthwise conv over the C*K stacked channels, then the sum over K.
    kern = jnp.swapaxes(kernel, 2, 3).reshape(kh, kw, c * k, 1)  # channel c*K + k, like x
    y = depthwise_conv2d_shift(x.reshape(n, h, w, c * k), kern, strides)
    return y.reshape(n, *y.shape[1:3], c, k).sum(axis=4, dtype=jnp.float32).astype(dtype)
  # lax: groups of K consecutive input channels (c, k) feed output channel c.
  conv = _grouped_conv_taps if impl == "lax_taps" else _grouped_conv
  return conv(x.reshape(n, h, w, c * k), kernel.astype(dtype), strides, c, True)


class DepthwiseConv(nn.Module):
  """Depthwise conv [N, H, W, C] -> [N, H', W', C*multiplier], SAME padding, optional bias; or,
  with sum_branches=K, the branch-summed conv of K inputs [N, H, W, C] -> [N, H', W', C]."""

  kernel_size: int = 7
  multiplier: int = 1
  strides: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.truncated_normal(0.02)
  # > 1: the input is a sequence of this many branches [N, H, W, C] and the output sums their
  # convs: the grouped conv K*C -> C with groups=C (`depthwise_conv2d_sum`). The kernel has the
  # [kh, kw, K*C, 1] shape of that grouped conv, indexed k*C + c (branch-major).
  sum_branches: int = 1
  # The branches hold integers in [-128, 127], e.g. spikes (`depthwise_conv2d_sum`).
  integer_inputs: bool = False

  @nn.compact
  def __call__(self, x):
    nb = self.sum_branches
    ks = self.kernel_size
    strides = (self.strides,) * 2
    if nb == 1:
      c = x.shape[-1]
      k = self.param("kernel", self.kernel_init, (ks, ks, c, self.multiplier), self.param_dtype)
      y = depthwise_conv2d(x.astype(self.dtype), k.astype(self.dtype), strides)
    else:
      if isinstance(x, jax.Array) or len(x) != nb or self.multiplier != 1:
        raise ValueError(
          f"sum_branches={nb} wants a sequence of {nb} branches [N, H, W, C] and multiplier 1; "
          f"got {type(x).__name__} of length {len(x)}, multiplier {self.multiplier}"
        )
      c = x[0].shape[-1]
      k = self.param("kernel", self.kernel_init, (ks, ks, nb * c, 1), self.param_dtype)
      kb = k.reshape(ks, ks, nb, c).astype(self.dtype)
      y = depthwise_conv2d_sum(
        [b.astype(self.dtype) for b in x], kb, strides, integer_inputs=self.integer_inputs
      )
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (y.shape[-1],), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y
