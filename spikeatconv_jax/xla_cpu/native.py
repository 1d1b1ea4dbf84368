"""Depthwise convolution on XLA:CPU as native custom calls (XLA FFI), built on first use.

XLA:CPU lowers grouped convolutions to a generic loop that runs at under 1 GFLOP/s. The kernels
in `csrc/dwconv_cpu.cc` (forward, input gradient, kernel gradient; float32, NHWC) vectorise over
the contiguous channel axis and use XLA's intra-op thread pool. `depthwise_conv2d_native` wraps
them in a `custom_vjp`; `xla_cpu.dwconv` dispatches to it when the library is available.
The same library holds `fusion_barrier`, a no-op custom call (see `xla_cpu.barriers`).
Each call carries an SPMD partitioning rule (`_partitioned`): under a jit sharded over several
CPU devices, each device convolves its own slice of the batch instead of gathering the batch.

The shared library is compiled once per source, jaxlib version and CPU (`g++ -O3
-march=native`) into `$SPIKEATCONV_CACHE_DIR` (default `~/.cache/spikeatconv_jax`, or a per-user
directory under the temp dir when the home directory is not writable), written to a
temporary name and renamed, so concurrent processes are safe. Without a C++ compiler, or if the
build fails, `available()` is False (with one warning naming the reason) and the "xla_cpu"
table keeps its XLA forms. `SPIKEATCONV_NATIVE_DWCONV=0` never builds or uses it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "dwconv_cpu.cc")
CACHE_ENV_VAR = "SPIKEATCONV_CACHE_DIR"
DISABLE_ENV_VAR = "SPIKEATCONV_NATIVE_DWCONV"  # "0": never build or use the native kernels
TARGETS = {
  "fwd": "SpikeAtConvDwconvFwd",
  "bwd_input": "SpikeAtConvDwconvBwdInput",
  "bwd_kernel": "SpikeAtConvDwconvBwdKernel",
  "barrier": "SpikeAtConvFusionBarrier",
}
_FFI_NAME = "spikeatconv_dwconv_{}"
# The custom-call targets of the three conv kernels in a compiled module (profiles count them).
KERNEL_TARGETS = tuple(_FFI_NAME.format(k) for k in ("fwd", "bwd_input", "bwd_kernel"))
_log = logging.getLogger(__name__)


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and feature flags (a shared cache directory
  on a heterogeneous cluster must not hand one CPU's build to another)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build_command(cxx: str, out: str) -> list[str]:
  return [
    cxx,
    "-O3",
    "-march=native",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-w",
    f"-I{jax.ffi.include_dir()}",
    SOURCE,
    "-o",
    out,
  ]


def library_path() -> str:
  """Where the built library for this source, jaxlib and CPU lives (it may not exist yet)."""
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read())
  key.update(jax.__version__.encode())
  key.update(_cpu_signature().encode())
  return os.path.join(_cache_dir(), f"libspikeatconv_dwconv_{key.hexdigest()[:16]}.so")


def _cache_dir() -> str:
  """$SPIKEATCONV_CACHE_DIR, else ~/.cache/spikeatconv_jax, else (home not writable) a per-user
  directory under the system temp dir."""
  if os.environ.get(CACHE_ENV_VAR):
    return os.environ[CACHE_ENV_VAR]
  home = os.path.join(os.path.expanduser("~"), ".cache", "spikeatconv_jax")
  try:
    os.makedirs(home, exist_ok=True)
    if os.access(home, os.W_OK):
      return home
  except OSError:
    pass
  return os.path.join(tempfile.gettempdir(), f"spikeatconv_jax-{os.getuid()}")


def _build(path: str) -> None:
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++ or $CXX) found")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = _build_command(cxx, tmp)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: another process sees the old state or the whole library
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.cache
def _load() -> str | None:
  """`load()` once per process (XLA custom-call targets are registered once)."""
  return load()


def load() -> str | None:
  """Builds (if needed), loads and registers the kernels; returns None, or why it failed."""
  if os.environ.get(DISABLE_ENV_VAR, "1") == "0":
    return f"disabled by {DISABLE_ENV_VAR}=0"
  try:
    path = library_path()
    if not os.path.exists(path):
      _log.info("building the native depthwise conv kernels: %s", path)
      _build(path)
    lib = ctypes.cdll.LoadLibrary(path)
    for kind, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(
        _FFI_NAME.format(kind), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
      )
  except Exception as e:  # noqa: BLE001 - any failure means "use the XLA forms"
    _log.warning("native depthwise conv unavailable, using the XLA forms: %s", e)
    return str(e)
  return None


def available() -> bool:
  """True when the native kernels are built and registered (builds them on the first call)."""
  return _load() is None


def unavailable_reason() -> str | None:
  return _load()


def _call(kind: str, operands, out_shapes, strides, pads):
  return jax.ffi.ffi_call(
    _FFI_NAME.format(kind),
    [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in out_shapes],
    vmap_method="sequential",
  )(
    *operands,
    sh=np.int64(strides[0]),
    sw=np.int64(strides[1]),
    pt=np.int64(pads[0][0]),
    pl=np.int64(pads[1][0]),
  )


def _barrier_call(x: jax.Array) -> jax.Array:
  return jax.ffi.ffi_call(
    _FFI_NAME.format("barrier"),
    jax.ShapeDtypeStruct(x.shape, x.dtype),
    input_output_aliases={0: 0},
    vmap_method="broadcast_all",
  )(x)


def fusion_barrier(x: jax.Array) -> jax.Array:
  """The identity, as a custom call that XLA cannot fuse through (not differentiable).

  Its result aliases its operand, so it copies nothing: it only makes XLA compute `x` once into
  a buffer. XLA:CPU otherwise recomputes a cheap elementwise value inside every fusion that
  reads it, e.g. a LIF's input gradient, summed over MBPL's four branches, inside each of the
  three BatchNorm-backward fusions that consume it (see `barriers.materialize_cotangent`). Under a
  sharded jit it keeps its operand's sharding (`_partitioned`).
  """
  _require()
  return _partitioned("barrier", x.ndim, ())(x) if x.ndim else _barrier_call(x)


def _geometry(x_shape, kernel_hw, strides):
  """SAME padding exactly as lax splits it, and the output size."""
  pads = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(kernel_hw), strides, "SAME")
  return pads, (-(-x_shape[1] // strides[0]), -(-x_shape[2] // strides[1]))


def _operands(xs, integer_inputs):
  """The branch operands the kernels read: float32, or int8 for integer-valued inputs."""
  return tuple(x.astype(jnp.int8) for x in xs) if integer_inputs else xs


# The kernels on per-device arrays; output shapes follow from the operands (and `in_hw`, the
# input's spatial size, for the input gradient of a strided conv).
def _raw_fwd(w, *ops, strides):
  n, _, _, c = ops[0].shape
  pads, (ho, wo) = _geometry(ops[0].shape, w.shape[1:3], strides)
  (y,) = _call("fwd", (w, *ops), [(n, ho, wo, c)], strides, pads)
  return y


def _raw_bwd_input(w, g, *, strides, in_hw, branches):
  shape = (g.shape[0], *in_hw, g.shape[3])
  pads, _ = _geometry(shape, w.shape[1:3], strides)
  return tuple(_call("bwd_input", (w, g), [shape] * branches, strides, pads))


def _raw_bwd_kernel(g, *ops, strides, kernel_hw):
  pads, _ = _geometry(ops[0].shape, kernel_hw, strides)
  (dw,) = _call("bwd_kernel", (g, *ops), [(len(ops), *kernel_hw, g.shape[3])], strides, pads)
  return dw


def _axes(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _plain(kind: str, arity: int, static: tuple):
  """(the custom call `kind` on per-device arrays, its Shardy sharding rule, the rule's factors
  that must be gathered). Arguments as for `_partitioned`."""
  if kind == "barrier":
    dims = " ".join(f"d{i}" for i in range(arity))
    return _barrier_call, f"{dims} -> {dims}", ()
  x4, y4, w4 = "n h w c", "n i j c", "k a b c"
  branches = ", ".join([x4] * arity)
  if kind == "fwd":
    raw, rule = functools.partial(_raw_fwd, strides=static[0]), f"{w4}, {branches} -> {y4}"
  elif kind == "bwd_input":
    strides, in_hw, n_out = static
    raw = functools.partial(_raw_bwd_input, strides=strides, in_hw=in_hw, branches=n_out)
    rule = f"{w4}, {y4} -> " + ", ".join([x4] * n_out)
  else:
    raw = functools.partial(_raw_bwd_kernel, strides=static[0], kernel_hw=static[1])
    rule = f"{y4}, {branches} -> {w4}"
  # In order of first appearance in the rule (Shardy wants the special factors sorted).
  order = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
  return raw, rule, tuple(f for f in order if f in {"k", "a", "b", "h", "w", "i", "j"})


@functools.cache
def _partitioned(kind: str, arity: int, static: tuple):
  """The custom call `kind` as a function XLA's SPMD partitioner can split.

  Without a sharding rule the partitioner gathers a custom call's operands onto every device
  and runs the whole batch on each. With this rule, the convolutions run on each device's slice
  of the batch and channels (a [N, H, W, C] operand's N and C may be sharded; H and W, the
  kernel taps and the branch axis are gathered), and the kernel gradient, which sums over N,
  adds up the devices' partial sums (psum over N's mesh axes). The fusion barrier keeps any
  sharding. On one device, or inside shard_map, the call is the plain custom call. Under vmap
  it is the plain custom call too (custom_partitioning has no batching rule).

  Args:
    kind: "fwd" (arity = branches), "bwd_input" (static: strides, in_hw, branches),
      "bwd_kernel" (arity = branches; static: strides, kernel_hw) or "barrier" (arity = rank).
  """
  from jax.experimental.custom_partitioning import custom_partitioning
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  raw, rule, replicated = _plain(kind, arity, static)

  def shardings(mesh, arg_shapes):
    """(operand shardings, result shardings, N's mesh axes) from the batch-like operand's."""
    ref = arg_shapes[0 if kind in ("barrier", "bwd_kernel") else 1]
    spec = tuple(ref.sharding.spec) + (None,) * (len(ref.shape) - len(ref.sharding.spec))
    if kind == "barrier":
      sh = NamedSharding(mesh, P(*spec))
      return (sh,), sh, ()
    b, c = spec[0], spec[3]
    xs = NamedSharding(mesh, P(b, None, None, c))
    ws = NamedSharding(mesh, P(None, None, None, c))
    if kind == "fwd":
      return (ws,) + (xs,) * arity, xs, ()
    if kind == "bwd_input":
      return (ws, xs), (xs,) * static[2], ()
    return (xs,) * (1 + arity), ws, _axes(b)

  def partition(mesh, arg_shapes, result_shape):
    arg_sh, out_sh, sum_axes = shardings(mesh, arg_shapes)

    def lower(*args):
      out = raw(*args)
      return lax.psum(out, sum_axes) if sum_axes else out

    return mesh, lower, out_sh, arg_sh

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes)[1]

  fn = custom_partitioning(lambda *args: raw(*args))
  fn.def_partition(
    partition,
    infer_sharding_from_operands=infer,
    sharding_rule=rule,
    reduction_factors=("n",) if kind == "bwd_kernel" else (),
    need_replication_factors=replicated,
  )

  @jax.custom_batching.custom_vmap
  def call(*args):
    return fn(*args)

  @call.def_vmap
  def _vmap(axis_size, in_batched, *args):
    out = jax.vmap(raw, in_axes=tuple(0 if b else None for b in in_batched))(*args)
    return out, jax.tree.map(lambda _: True, out)

  return call


def _forward(ops, w, strides):
  """The forward custom call on the branch operands `ops` (float32 or int8)."""
  return _partitioned("fwd", len(ops), (tuple(strides),))(w, *ops)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dwconv(xs, w, strides, integer_inputs):
  """Σ_k conv(xs[k], w[k]): xs a tuple of B f32 [N, H, W, C], w [B, kh, kw, C] f32 ->
  [N, H', W', C] f32. The B branches stay separate operands of one custom call (no stack).
  integer_inputs: the kernels read (and the backward keeps) the branches as int8."""
  return _forward(_operands(xs, integer_inputs), w, strides)


def _dwconv_fwd(xs, w, strides, integer_inputs):
  ops = _operands(xs, integer_inputs)  # cast once: the forward's operands are the residuals
  return _forward(ops, w, strides), (ops, w)


def _dwconv_bwd(strides, integer_inputs, res, g):
  ops, w = res
  g = g.astype(jnp.float32)
  strides = tuple(strides)
  dxs = _partitioned("bwd_input", 1, (strides, tuple(ops[0].shape[1:3]), len(ops)))(w, g)
  dw = _partitioned("bwd_kernel", len(ops), (strides, tuple(w.shape[1:3])))(g, *ops)
  return tuple(dxs), dw


_dwconv.defvjp(_dwconv_fwd, _dwconv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _repeat_channels(x: jax.Array, m: int) -> jax.Array:
  """jnp.repeat(x, m, axis=-1) (channel c -> c*m .. c*m+m-1), with the gradient written as the
  sum of the m strided slices. Autodiff's gradient, a reduce over a minor axis of size m, ran
  on XLA:CPU (YNNPACK) at a few GB/s.

  `x` is computed into its own buffer first (`fusion_barrier`): fused into the repeat, its
  producer (a stage's first MBPL output: BatchNorm, four LIF neurons, count + γ·LN(merge)) was
  evaluated once per output channel, in the broadcast's unvectorised index order, several times
  the cost of the repeat itself."""
  return jnp.repeat(fusion_barrier(x), m, axis=-1)


def _repeat_channels_fwd(x, m):
  return _repeat_channels(x, m), None


def _repeat_channels_bwd(m, _, g):
  g = g.reshape(g.shape[:-1] + (g.shape[-1] // m, m))
  return (functools.reduce(jnp.add, [g[..., i] for i in range(m)]),)


_repeat_channels.defvjp(_repeat_channels_fwd, _repeat_channels_bwd)


def _require() -> None:
  if not available():
    raise RuntimeError(f"native depthwise conv unavailable: {unavailable_reason()}")


def depthwise_conv2d_native(
  x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1)
) -> jax.Array:
  """Depthwise conv with a channel multiplier through the native kernels.

  x [N, H, W, C], kernel [kh, kw, C, M] -> [N, ceil(H/sh), ceil(W/sw), C*M] (channel c*M + m),
  SAME padding; equal to `layers.dwconv.depthwise_conv2d_lax` up to float rounding. Computes in
  float32 and returns the promoted input dtype. A multiplier M > 1 repeats each input channel M
  times first (the gradient of that repeat sums the M copies back).
  """
  _require()
  kh, kw, c, m = kernel.shape
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  xf = x.astype(jnp.float32)
  if m > 1:
    xf = _repeat_channels(xf, m)
  y = _dwconv((xf,), kernel.astype(jnp.float32).reshape(1, kh, kw, c * m), tuple(strides), False)
  return y.astype(dtype)


def depthwise_conv2d_native_sum(
  xs: Sequence[jax.Array],
  kernel: jax.Array,
  strides: Sequence[int] = (1, 1),
  *,
  integer_inputs: bool = False,
) -> jax.Array:
  """Σ_k depthwise conv of xs[k] [N, H, W, C] with kernel[:, :, k, :] ([kh, kw, K, C]) through
  the native kernels, each branch a separate operand: no [N, H, W, C, K] stack is written, the
  forward accumulates the K branches in one output, and the input gradient writes the K branch
  gradients from one pass over the cotangent. Computes in float32, returns the promoted dtype.

  integer_inputs: the caller guarantees every branch holds integers in [-128, 127] (spikes: 0/1).
  The kernels then read the branches as int8, and the backward keeps them as int8 residuals: a
  quarter of the float32 memory traffic and residual memory, with the same result. Other values
  would be truncated, so only pass it for spike-valued inputs."""
  _require()
  dtype = jnp.promote_types(jnp.result_type(*xs), kernel.dtype)
  w = jnp.moveaxis(kernel.astype(jnp.float32), 2, 0)  # [K, kh, kw, C]: tiny
  y = _dwconv(tuple(x.astype(jnp.float32) for x in xs), w, tuple(strides), integer_inputs)
  return y.astype(dtype)
