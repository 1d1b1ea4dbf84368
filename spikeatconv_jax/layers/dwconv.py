"""Depthwise 2-D convolution, NHWC, with a channel multiplier, and its K-branch sum (MBPL's merge).

`depthwise_conv2d(x, kernel)` maps x [N, H, W, C] and kernel [kh, kw, C, M] to
[N, H', W', C*M] (output channel c*M + m, lax's grouped-conv order), SAME padding. It runs the
active hook table's form (`layers.ops`); the portable forms are here:

- `depthwise_conv2d_lax` (the portable table's form): `lax.conv_general_dilated` with
  `feature_group_count=C`, autodiff's gradients.
- `depthwise_conv2d_lax_taps`: the same forward and input gradient;
  the kernel gradient as kh*kw per-offset reductions instead of autodiff's batch-grouped
  convolution, which JAX's tracker reports as slow as a dense conv on CUDA (jax-ml/jax#13800).

`branch_sum_conv2d_lax` / `branch_sum_conv2d_lax_taps`: Σ_k of the depthwise convs of K
branches [N, H, W, C] with kernel[:, :, k, :] ([kh, kw, K, C]): the grouped convolution K*C -> C
with groups=C of MBPL's merge (DESIGN.md §3), in the same two forms. The branches are stacked on
a minor axis (channel c*K + k), so lax's groups (K consecutive channels per output channel) are
a free reshape, with no transpose.

`spike_merge_conv_int8` (the portable table's `spike_merge_conv`): the same sum for integer-valued
branches (spikes, spike counts), whose backward keeps them as int8; its forward is K depthwise
convs ("depthwise") or the grouped conv ("grouped"), its gradients autodiff's.

The portable table runs `depthwise_conv2d_lax` (autodiff): on XLA:TPU its kernel gradient, a
convolution with batch_group_count, moved about a twelfth of the bytes of the per-offset
reductions of `depthwise_conv2d_lax_taps` (which keeps the CUDA-tracker workaround).

The XLA:CPU forms (native kernels, shift-sum, Toeplitz matmul) live in `spikeatconv_jax.xla_cpu`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from spikeatconv_jax.layers import ops

Dtype = Any

_NHWC = ("NHWC", "HWIO", "NHWC")


def check(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> tuple[int, int]:
  """Checks a depthwise conv's operands; returns the strides as two ints."""
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


def check_sum(xs: Sequence[jax.Array], kernel: jax.Array, strides: Sequence[int]):
  """Checks a branch-summed conv's operands; returns the strides as two ints."""
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
  return check(xs[0], kernel[:, :, 0, :, None], strides)


def geometry(x_shape, kernel_shape, strides):
  """SAME padding exactly as lax splits it, and the output size."""
  (h, w), (kh, kw) = x_shape[1:3], kernel_shape[:2]
  pads = lax.padtype_to_pads((h, w), (kh, kw), strides, "SAME")
  out_hw = (-(-h // strides[0]), -(-w // strides[1]))
  return pads, out_hw


def depthwise_conv2d_lax(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Reference: lax.conv_general_dilated with feature_group_count=C."""
  strides = check(x, kernel, strides)
  kh, kw, c, m = kernel.shape
  return lax.conv_general_dilated(
    x,
    kernel.reshape(kh, kw, 1, c * m),
    window_strides=strides,
    padding="SAME",
    dimension_numbers=_NHWC,
    feature_group_count=c,
  )


def depthwise_conv2d_per_multiplier(
  x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)
) -> jax.Array:
  """`depthwise_conv2d_lax` as M depthwise convs (one output per input channel each), their
  outputs interleaved into channel c*M + m. For M = 1 it is `depthwise_conv2d_lax`.

  XLA:TPU lowers a grouped conv with M = 2 outputs per group (the stage-entry depthwise conv
  that doubles the width) far above its nominal cost, in the kernel gradient above all; M pure
  depthwise convs run near it (notes/2026-12-05-tpu-parts.md).
  """
  strides = check(x, kernel, strides)
  m = kernel.shape[3]
  if m == 1:
    return depthwise_conv2d_lax(x, kernel, strides)
  ys = [depthwise_conv2d_lax(x, kernel[..., i : i + 1], strides) for i in range(m)]
  n, h, w, c = ys[0].shape
  return jnp.stack(ys, axis=-1).reshape(n, h, w, c * m)


def kernel_grad_taps(x, g, kernel_hw, in_per_group: int, strides) -> jax.Array:
  """Kernel gradient of the SAME grouped conv x [N, H, W, G*I] -> g [N, H', W', G*O] (groups G,
  I = in_per_group), as one reduction per kernel offset, in float32: [kh, kw, I, G*O], the
  HWIO layout of the grouped conv's kernel.

  dk[a, b, i, q*O + o] = sum_{n,y,z} xp[n, y*sh + a, z*sw + b, q*I + i] * g[n, y, z, q*O + o].
  No batch-grouped convolution, which is what autodiff of lax's grouped conv produces. The
  kh*kw shifted windows are stacked on a leading axis and reduced together, so an accelerator
  can run them as one reduction whose input fusion reads the windows in place, instead of a
  loop of kh*kw small kernels.
  """
  n, _, _, gi = x.shape
  _, ho, wo, go = g.shape
  kh, kw = kernel_hw
  groups = gi // in_per_group
  pads, _ = geometry(x.shape, (kh, kw), strides)
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  g5 = g.astype(jnp.float32).reshape(n, ho, wo, groups, 1, go // groups)
  span = ((ho - 1) * sh + 1, (wo - 1) * sw + 1)

  def window(a, b):  # [N, H', W', G, I, 1]: the inputs that kernel offset (a, b) multiplies
    win = lax.dynamic_slice(xp, (0, a, b, 0), (n, *span, gi))[:, ::sh, ::sw]
    return win.astype(jnp.float32).reshape(n, ho, wo, groups, in_per_group, 1)

  wins = jnp.stack([window(t // kw, t % kw) for t in range(kh * kw)])  # [kh*kw, N, ...]
  dk = jnp.sum(wins * g5[None], axis=(1, 2, 3))  # [kh*kw, G, I, O]
  return dk.transpose(0, 2, 1, 3).reshape(kh, kw, in_per_group, go)


def grouped_conv(x, kernel, strides, groups, accumulate_f32):
  """The SAME grouped conv x [N, H, W, G*I], kernel [kh, kw, I, G*O] in the promoted dtype."""
  y = lax.conv_general_dilated(
    x,
    kernel,
    window_strides=strides,
    padding="SAME",
    dimension_numbers=_NHWC,
    feature_group_count=groups,
    preferred_element_type=jnp.float32 if accumulate_f32 else None,
  )
  return y.astype(jnp.result_type(x, kernel))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv_taps(x, kernel, strides, groups, accumulate_f32):
  """`grouped_conv` whose kernel gradient is `kernel_grad_taps`."""
  return grouped_conv(x, kernel, strides, groups, accumulate_f32)


def _grouped_conv_taps_fwd(x, kernel, strides, groups, accumulate_f32):
  return grouped_conv(x, kernel, strides, groups, accumulate_f32), (x, kernel)


def _grouped_conv_taps_bwd(strides, groups, accumulate_f32, res, g):
  x, kernel = res
  # Input gradient: autodiff's own transpose (a feature-grouped convolution, as the forward).
  _, vjp_x = jax.vjp(lambda x_: grouped_conv(x_, kernel, strides, groups, accumulate_f32), x)
  (dx,) = vjp_x(g)
  dk = kernel_grad_taps(x, g, kernel.shape[:2], kernel.shape[2], strides)
  return dx, dk.astype(kernel.dtype)


grouped_conv_taps.defvjp(_grouped_conv_taps_fwd, _grouped_conv_taps_bwd)


def depthwise_conv2d_lax_taps(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """lax's grouped conv forward and input gradient; the kernel gradient as kh*kw reductions.

  Autodiff of a grouped convolution writes its kernel gradient as a convolution with
  batch_group_count = groups, reported as slow as a dense conv's on CUDA (jax-ml/jax#13800).
  Here the kernel gradient is one reduction over N, H', W' per kernel offset instead:
  memory-bound, kh*kw reads of x and the cotangent. Same arguments, result and gradients as
  `depthwise_conv2d_lax`.
  """
  strides = check(x, kernel, strides)
  kh, kw, c, m = kernel.shape
  return grouped_conv_taps(x, kernel.reshape(kh, kw, 1, c * m), strides, c, False)


def _stacked(xs, kernel):
  """The K branches on a minor axis, [N, H, W, C*K] (channel c*K + k), and the dtype."""
  n, h, w, c = xs[0].shape
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  x = jnp.stack([x.astype(dtype) for x in xs], axis=-1)  # [N, H, W, C, K]
  return x.reshape(n, h, w, c * len(xs)), dtype


def branch_sum_conv2d_lax(xs: Sequence[jax.Array], kernel: jax.Array, strides=(1, 1)):
  """Σ_k depthwise_conv2d(xs[k], kernel[:, :, k, :]) as one lax grouped conv (autodiff)."""
  strides = check_sum(xs, kernel, strides)
  x, dtype = _stacked(xs, kernel)
  return grouped_conv(x, kernel.astype(dtype), strides, xs[0].shape[3], True)


def branch_sum_conv2d_lax_taps(xs: Sequence[jax.Array], kernel: jax.Array, strides=(1, 1)):
  """`branch_sum_conv2d_lax` with the kernel gradient as per-offset reductions (the portable
  table's MBPL merge)."""
  strides = check_sum(xs, kernel, strides)
  x, dtype = _stacked(xs, kernel)
  return grouped_conv_taps(x, kernel.astype(dtype), strides, xs[0].shape[3], True)


MERGE_FORMS = ("grouped", "depthwise")


def _merge_forward(xs, kernel, strides, form):
  """Σ_k depthwise conv(xs[k], kernel[:, :, k, :]) in xs' dtype, accumulated in float32.

  "grouped": one grouped conv K*C -> C (groups=C, the K branches of a channel in one group).
  "depthwise": K depthwise convs (groups=C, one input channel per group), summed.
  """
  c = xs[0].shape[3]
  if form == "grouped":
    n, h, w, _ = xs[0].shape
    x = jnp.stack(xs, axis=-1).reshape(n, h, w, c * len(xs))
    return grouped_conv(x, kernel, strides, c, True)
  acc = None
  for k, x in enumerate(xs):
    y = lax.conv_general_dilated(
      x,
      kernel[:, :, k : k + 1, :],
      window_strides=strides,
      padding="SAME",
      dimension_numbers=_NHWC,
      feature_group_count=c,
      preferred_element_type=jnp.float32,
    )
    acc = y if acc is None else acc + y
  return acc.astype(xs[0].dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _spike_merge(xs, kernel, strides, form):
  return _merge_forward(xs, kernel, strides, form)


def _spike_merge_fwd(xs, kernel, strides, form):
  # The branches hold integers in [-128, 127] (the hook's contract): int8 keeps them exactly.
  return _merge_forward(xs, kernel, strides, form), (jnp.stack(xs, -1).astype(jnp.int8), kernel)


def _spike_merge_bwd(strides, form, res, g):
  x8, kernel = res
  x = x8.astype(kernel.dtype)  # [N, H, W, C, K]
  nb = x.shape[-1]
  xs = tuple(x[..., k] for k in range(nb))
  # Autodiff's gradients of the forward convs: the transposed convs for the input, convs with
  # batch_group_count for the kernel (XLA:TPU runs these near their nominal flops; the
  # per-offset reductions of `kernel_grad_taps` moved several times the bytes there).
  _, vjp = jax.vjp(lambda xs_, k_: _merge_forward(xs_, k_, strides, form), xs, kernel)
  return vjp(g)


_spike_merge.defvjp(_spike_merge_fwd, _spike_merge_bwd)


def spike_merge_conv_int8(
  xs: Sequence[jax.Array], kernel: jax.Array, strides=(1, 1), form: str = "depthwise"
):
  """The portable table's MBPL merge: `branch_sum_conv2d_lax`'s value and gradients, whose
  backward keeps the K integer-valued branches as one int8 stack (a quarter of the float32
  stack, half of bf16's) instead of the float stack, and otherwise takes autodiff's gradients.
  `form` picks the convs, see `MERGE_FORMS`: "depthwise" (K depthwise convs, which XLA:TPU
  lowers near their nominal flops) or "grouped" (one grouped conv with K input channels per
  group, which XLA:TPU lowered at about 20x its nominal flops)."""
  if form not in MERGE_FORMS:
    raise ValueError(f"unknown merge form {form!r}; known: {', '.join(MERGE_FORMS)}")
  strides = check_sum(xs, kernel, strides)
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  xs = tuple(x.astype(dtype) for x in xs)
  return _spike_merge(xs, kernel.astype(dtype), strides, form)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Depthwise conv in the active table's form (`ops.current().depthwise_conv2d`)."""
  return ops.current().depthwise_conv2d(x, kernel, check(x, kernel, strides))


def spike_merge_conv(xs: Sequence[jax.Array], kernel: jax.Array, strides: Sequence[int] = (1, 1)):
  """Σ_k depthwise conv of K integer-valued branches (spike trains) in the active table's form
  (`ops.current().spike_merge_conv`)."""
  return ops.current().spike_merge_conv(list(xs), kernel, check_sum(xs, kernel, strides))


class DepthwiseConv(nn.Module):
  """Depthwise conv [N, H, W, C] -> [N, H', W', C*multiplier], SAME padding, optional bias; or,
  with sum_branches=K, the branch-summed conv of K spike trains [N, H, W, C] -> [N, H', W', C]
  (`spike_merge_conv`: the inputs must hold integers in [-128, 127])."""

  kernel_size: int = 7
  multiplier: int = 1
  strides: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.truncated_normal(0.02)
  # > 1: the input is a sequence of this many branches [N, H, W, C] and the output sums their
  # convs: the grouped conv K*C -> C with groups=C. The kernel has the [kh, kw, K*C, 1] shape of
  # that grouped conv, indexed k*C + c (branch-major).
  sum_branches: int = 1

  @nn.compact
  def __call__(self, x, lif=None):
    """`lif` (sum_branches=K only): x is one map [N, H, W, C], the input of K one-step LIF
    neurons (`snn.lif.LIFParams`, K thresholds) whose spikes are the branches; the table's
    `lif_spike_merge` (which it must have) computes the merge from x."""
    nb = self.sum_branches
    ks = self.kernel_size
    strides = (self.strides,) * 2
    if nb == 1 and lif is None:
      c = x.shape[-1]
      k = self.param("kernel", self.kernel_init, (ks, ks, c, self.multiplier), self.param_dtype)
      y = depthwise_conv2d(x.astype(self.dtype), k.astype(self.dtype), strides)
    else:
      from_input = ops.current().lif_spike_merge
      if lif is not None and (nb == 1 or from_input is None or len(lif.v_thresholds) != nb):
        raise ValueError(
          f"a merge from the LIF input needs sum_branches={len(lif.v_thresholds)} and a table "
          f"with lif_spike_merge; got sum_branches={nb}, table {ops.current().name!r}"
        )
      if lif is None and (isinstance(x, jax.Array) or len(x) != nb or self.multiplier != 1):
        raise ValueError(
          f"sum_branches={nb} wants a sequence of {nb} branches [N, H, W, C] and multiplier 1; "
          f"got {type(x).__name__} of length {len(x)}, multiplier {self.multiplier}"
        )
      c = (x if lif is not None else x[0]).shape[-1]
      k = self.param("kernel", self.kernel_init, (ks, ks, nb * c, 1), self.param_dtype)
      kb = k.reshape(ks, ks, nb, c).astype(self.dtype)
      if lif is not None:
        y = from_input(x.astype(self.dtype), kb, strides, lif)
      else:
        y = spike_merge_conv([b.astype(self.dtype) for b in x], kb, strides)
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (y.shape[-1],), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y
