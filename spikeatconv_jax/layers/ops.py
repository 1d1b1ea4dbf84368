"""The hook table: the few building blocks whose fastest form depends on the target platform.

Layers call `ops.current().<hook>(...)` (or the thin wrappers in `layers.common`) instead of a
fixed implementation. A table is a set of functions with the same contract and parameters, so
the model's parameter tree, and its values up to float rounding, do not depend on the table.

Tables, chosen by `config.model.kernels`:

  "xla"         portable forms (defined here and in `layers.dwconv`): what GPUs run.
  "xla_cpu"     the XLA:CPU wing (`spikeatconv_jax.xla_cpu`): native kernels, CPU-shaped VJPs,
                fusion barriers. Imported on first use, so importing `layers` builds nothing.
  "pallas_tpu"  the portable forms with MBPL's merge conv as Pallas TPU kernels
                (`spikeatconv_jax.pallas_tpu`); compiles for TPU only. Imported on first use.
  "auto"        resolved from the target platform by `resolve`: cpu -> "xla_cpu",
                tpu -> "pallas_tpu", else "xla".

`models.build` resolves "auto" from the platform of the mesh's devices and the model's top-level
`__call__` runs under `with ops.use(cfg.kernels)`, so a CPU host can trace exactly what a TPU
runs. The table is read while a function is traced; each hook's backward is fixed when its
forward is traced (custom VJPs never read the active table).

Outside any `use` block `current()` is the portable table.

Hooks (see `Ops`):
  dense_dot_general(lhs, rhs, dimension_numbers, precision=, preferred_element_type=)
      `lax.dot_general` as nn.Dense calls it.
  conv_general_dilated(lhs, rhs, window_strides, padding, ...)
      `lax.conv_general_dilated` as nn.Conv calls it.
  layer_norm(*, epsilon, dtype, param_dtype, scale_init, name) -> module
      a LayerNorm over the last axis with nn.LayerNorm's parameters ("scale", "bias").
  scaled_layer_norm(*, epsilon, dtype, param_dtype, name) -> f(x, *, shift, gamma)
      γ ⊙ LayerNorm(x + shift), the LayerNorm's parameters under `name`.
  depthwise_conv2d(x [N, H, W, C], kernel [kh, kw, C, M], strides) -> [N, H', W', C*M]
      SAME padding, output channel c*M + m.
  spike_merge_conv(spikes, kernel [kh, kw, K, C], strides) -> [N, H', W', C]
      Σ_k depthwise_conv2d(spikes[k], kernel[:, :, k, :]): the grouped conv K*C -> C with
      groups=C over K spike trains [N, H, W, C] (MBPL's merge). Contract: every input holds
      integers in [-128, 127] (spikes or spike counts), so a table may store them narrowly.
  materialize(x), materialize_cotangent(x)
      The identity (with the identity gradient). A point where the value (both: and its
      cotangent; the second: only its cotangent) should be computed once into its own buffer,
      e.g. an SPK output before attention's partition transposes, or a LIF's input whose
      gradient sums K branches. Portable: the identity; a backend may hold the value there.
  materialize_heads(x)
      The identity, on attention's q/k/v right after the partition (before the score
      products): where a backend may hold them (value and cotangent). Portable and XLA:CPU:
      the identity.
  sum_leading(x) -> jnp.sum(x, axis=0)
  repeat_time(x, t) -> x broadcast to [t, *x.shape]
  add_broadcast(x, b) -> x + b (b broadcast over x's leading axes, in x's dtype)
  batch_norm(*, use_running_average, momentum, epsilon, dtype, param_dtype, scale_init, name)
      -> module: a BatchNorm over every axis but the last with nn.BatchNorm's parameters
      ("scale", "bias") and running statistics ("batch_stats": "mean", "var"). Portable:
      `layers.norms.BatchNorm`; a table that does not set it uses nn.BatchNorm.
  lif_spike_merge(x [N, H, W, C], kernel [kh, kw, K, C], strides, lif) -> [N, H', W', C]
      spike_merge_conv of the K spike trains of one-step (T = 1) LIF neurons on x, one per
      threshold of `lif` (`snn.lif.LIFParams`), the gradient reaching x through the surrogate.
      None (the portable table): no such form; the SPK block composes the LIF and
      spike_merge_conv. A table may make the spikes where it consumes them (the TPU kernels
      never store them).
  lif_merge_norm(x [N, H, W, C], kernel [kh, kw, K, C], shift [C], scale [C], bias [C], lif,
                 epsilon) -> (y [N, H, W, C], rates [K, 1])
      MBPL's whole T = 1 output: y = Σ_k S_k + LN(Σ_k DW_k(S_k) + shift) ⊙ scale + bias (the
      merge LayerNorm over C, eps `epsilon`, its affine with γ folded in as
      `layers.norms.ScaledLayerNorm` folds it), S_k the one-step LIF spikes of x at threshold
      k (gradient through the surrogate); rates: each branch's mean spike, no gradient. None
      (the portable table): the SPK block composes the LIF, `lif_spike_merge` and
      `scaled_layer_norm`.
  recompute_spikes(fn) -> fn'
      fn(module, x, ...) computes spike trains from its input x and what consumes them (MBPL's
      LIFs and merge conv); fn' has the same values and gradients. Portable: a flax checkpoint
      that keeps only fn's inputs, so the backward recomputes the spikes from x (which the
      LIF keeps anyway) instead of keeping the stacked spikes between the passes. A table
      that does not set it returns fn itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

KERNELS = ("auto", "xla", "xla_cpu", "pallas_tpu")


def _identity(x: jax.Array) -> jax.Array:
  return x


@dataclasses.dataclass(frozen=True)
class Ops:
  """One table of hooks (see the module docstring for each contract)."""

  name: str
  dense_dot_general: Callable
  conv_general_dilated: Callable
  layer_norm: Callable[..., nn.Module]
  scaled_layer_norm: Callable[..., Callable]
  depthwise_conv2d: Callable
  spike_merge_conv: Callable
  materialize: Callable
  materialize_cotangent: Callable
  sum_leading: Callable
  repeat_time: Callable
  add_broadcast: Callable
  batch_norm: Callable[..., nn.Module] = nn.BatchNorm
  recompute_spikes: Callable[[Callable], Callable] = lambda fn: fn
  lif_spike_merge: Callable | None = None
  lif_merge_norm: Callable | None = None
  materialize_heads: Callable = _identity


def _recompute_spikes(fn: Callable) -> Callable:
  return nn.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def _sum_leading(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=0)


def _repeat_time(x: jax.Array, t: int) -> jax.Array:
  return jnp.broadcast_to(x[None], (t,) + x.shape)


def check_add_broadcast(x: jax.Array, b: jax.Array) -> None:
  if x.shape[x.ndim - b.ndim :] != b.shape:
    raise ValueError(f"add_broadcast: {b.shape} is not a trailing part of {x.shape}")


def _add_broadcast(x: jax.Array, b: jax.Array) -> jax.Array:
  check_add_broadcast(x, b)
  return x + b.astype(x.dtype)


def scaled_layer_norm_flax(*, epsilon, dtype, param_dtype, name):
  """γ ⊙ nn.LayerNorm(x + shift) as three flax/jnp ops (autodiff's backward): the reference
  the tables' `scaled_layer_norm` forms are tested against."""
  ln = nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)

  def f(x, *, shift, gamma):
    y = ln(x + shift.astype(x.dtype))
    return y * gamma.astype(y.dtype)

  return f


def _portable() -> Ops:
  from spikeatconv_jax.layers import dwconv, norms  # dwconv imports this module

  return Ops(
    name="xla",
    dense_dot_general=lax.dot_general,
    conv_general_dilated=lax.conv_general_dilated,
    layer_norm=norms.LayerNorm,
    scaled_layer_norm=norms.ScaledLayerNorm,
    depthwise_conv2d=dwconv.depthwise_conv2d_lax,
    spike_merge_conv=dwconv.spike_merge_conv_int8,
    materialize=_identity,
    materialize_cotangent=_identity,
    sum_leading=_sum_leading,
    repeat_time=_repeat_time,
    add_broadcast=_add_broadcast,
    batch_norm=norms.BatchNorm,
    recompute_spikes=_recompute_spikes,
  )


def _xla_cpu() -> Ops:
  return importlib.import_module("spikeatconv_jax.xla_cpu.table").TABLE


def _pallas_tpu() -> Ops:
  return importlib.import_module("spikeatconv_jax.pallas_tpu.table").TABLE


_LOADERS: dict[str, Callable[[], Ops]] = {
  "xla": _portable,
  "xla_cpu": _xla_cpu,
  "pallas_tpu": _pallas_tpu,
}
# The platforms a table's kernels compile for (absent: any).
PLATFORMS = {"xla_cpu": ("cpu",), "pallas_tpu": ("tpu",)}


def register(name: str, loader: Callable[[], Ops]) -> None:
  """Adds a table under `name`; `loader()` builds it on first use."""
  _LOADERS[name] = loader
  get.cache_clear()


@functools.cache
def get(name: str) -> Ops:
  """The table called `name` ("xla", "xla_cpu", or a registered one; not "auto")."""
  if name == "auto":
    raise ValueError("ops.get wants a table name; resolve 'auto' first (ops.resolve)")
  if name not in _LOADERS:
    raise ValueError(f"unknown model.kernels {name!r}; known: {', '.join(('auto', *_LOADERS))}")
  return _LOADERS[name]()


def platform_kernels(platform: str) -> str:
  """The table "auto" means for a device platform: "xla_cpu" on cpu, "pallas_tpu" on tpu,
  else "xla"."""
  return {"cpu": "xla_cpu", "tpu": "pallas_tpu"}.get(platform, "xla")


def resolve(kernels: str, platform: str | None = None) -> str:
  """`model.kernels` with "auto" replaced by the platform's table.

  Args:
    kernels: "auto", "xla", "xla_cpu", "pallas_tpu" (or a registered table name).
    platform: the target devices' platform ("cpu", "gpu", "tpu", ...); None means
      `jax.devices()[0].platform` for "auto" and no check for a named table.

  Raises:
    ValueError: an unknown name, or a table whose kernels do not compile for `platform`.
  """
  if kernels != "auto" and kernels not in _LOADERS:
    raise ValueError(f"unknown model.kernels {kernels!r}; known: {', '.join(('auto', *_LOADERS))}")
  if kernels != "auto":
    allowed = PLATFORMS.get(kernels)
    if platform is not None and allowed is not None and platform not in allowed:
      raise ValueError(f"model.kernels={kernels!r} runs on {'/'.join(allowed)}, not {platform}")
    return kernels
  return platform_kernels(platform if platform is not None else jax.devices()[0].platform)


_ACTIVE: contextvars.ContextVar[Ops | None] = contextvars.ContextVar("ops_table", default=None)


def current() -> Ops:
  """The active table: the innermost `use` block's, else the portable one."""
  table = _ACTIVE.get()
  return table if table is not None else get("xla")


@contextlib.contextmanager
def use(name: str) -> Iterator[Ops]:
  """`with ops.use("xla_cpu"): ...` activates a table while the block traces ("auto": the
  table for `jax.devices()[0].platform`)."""
  token = _ACTIVE.set(get(resolve(name)))
  try:
    yield _ACTIVE.get()
  finally:
    _ACTIVE.reset(token)


def uses_config_kernels(method: Callable) -> Callable:
  """Decorates a model's top-level `__call__` (under `@nn.compact`): the body traces under
  `use(self.cfg.kernels)` ("auto" when the config has no such field)."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with use(self.cfg.get("kernels", "auto")):
      return method(self, *args, **kwargs)

  return wrapper
