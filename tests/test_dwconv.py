"""Depthwise conv: the portable taps form and the XLA:CPU wing's forms (shift-sum, Toeplitz
matmul, native kernels) against lax's grouped convolution; the two hook tables' choices."""

import dataclasses
import re

import hlo_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from configs.common import model_config
from spikeatconv_jax import models
from spikeatconv_jax.layers import dwconv, ops
from spikeatconv_jax.xla_cpu import barriers, native
from spikeatconv_jax.xla_cpu import dwconv as cpu_dwconv

IMPLS = {
  "shift": cpu_dwconv.depthwise_conv2d_shift,
  "native": native.depthwise_conv2d_native,
  "lax_taps": dwconv.depthwise_conv2d_lax_taps,  # lax plus a tap kernel gradient
}


@pytest.fixture(autouse=True)
def _native_needs_a_compiler(request):
  """Tests of the native kernels skip only on a machine without a C++ compiler; with one, the
  kernels must build (a build failure fails the test instead of falling back silently)."""
  uses_native = "native" in request.node.name or "dispatch" in request.node.name
  if uses_native and native._compiler() is None:
    pytest.skip("no C++ compiler: the native depthwise conv kernels cannot be built here")


def _inputs(x_shape, k_shape, dtype=jnp.float32, seed=0):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  k = jax.random.normal(kk, k_shape).astype(dtype)
  return x, k, kg


def _value_and_grads(impl, strides):
  """(x, k, g) -> (y, dx, dk) for the cotangent g."""

  def f(x, k, g):
    y, vjp = jax.vjp(lambda x, k: impl(x, k, strides), x, k)
    return (y, *vjp(g))

  return f


def _compare(x, k, kg, strides, atol, rtol, impl="shift"):
  y_shape = jax.eval_shape(lambda: dwconv.depthwise_conv2d_lax(x, k, strides)).shape
  g = jax.random.normal(kg, y_shape).astype(x.dtype)
  both = lambda *a: tuple(
    _value_and_grads(fn, strides)(*a) for fn in (dwconv.depthwise_conv2d_lax, IMPLS[impl])
  )
  want, got = jax.jit(both)(x, k, g)  # one compile for both implementations
  for name, w, o in zip(("y", "dx", "dk"), want, got):
    assert o.shape == w.shape and o.dtype == w.dtype, name
    np.testing.assert_allclose(
      np.asarray(o, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol, err_msg=name
    )
  return want, got


# Each kernel size meets both strides and both multipliers; odd and even H and W both appear, so
# both SAME padding splits (and, at stride 2, both phase counts of the input gradient) are covered.
@pytest.mark.parametrize(
  "kernel,stride,m,hw",
  [
    (3, 1, 1, (9, 8)),
    (3, 2, 2, (8, 9)),
    (5, 1, 2, (8, 9)),
    (5, 2, 1, (9, 8)),
    (7, 1, 1, (8, 9)),
    (7, 2, 2, (9, 8)),
  ],
)
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_cpu_forms_match_lax_float32(impl, kernel, stride, m, hw):
  x, k, kg = _inputs((2, *hw, 3), (kernel, kernel, 3, m))
  (y, _, _), _ = _compare(x, k, kg, (stride, stride), atol=1e-4, rtol=1e-5, impl=impl)
  assert y.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 3 * m)


@pytest.mark.parametrize(
  "x_shape,kernel,strides",
  [
    ((3, 1, 1, 5), 7, (1, 1)),  # 1x1 map (nano stage 3): every tap but the centre reads padding
    ((2, 2, 2, 4), 7, (2, 2)),  # nano stage-3 entry: 2x2 -> 1x1
    ((2, 7, 6, 3), 1, (2, 2)),  # kernel smaller than the stride: some inputs get no gradient
    ((1, 8, 9, 2), 3, (1, 2)),  # unequal strides
  ],
)
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_cpu_forms_match_lax_edge_shapes(impl, x_shape, kernel, strides):
  x, k, kg = _inputs(x_shape, (kernel, kernel, x_shape[-1], 2), seed=1)
  _, (y, dx, dk) = _compare(x, k, kg, strides, atol=1e-4, rtol=1e-5, impl=impl)  # == lax
  assert dx.shape == x.shape and dk.shape == k.shape and y.shape[-1] == 2 * x_shape[-1]


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_cpu_forms_bfloat16_close_to_float32(impl):
  """bf16 in, bf16 out; float32 accumulation keeps it within bf16 rounding of the f32 result."""
  x, k, kg = _inputs((2, 9, 8, 4), (7, 7, 4, 2), jnp.bfloat16)
  stride = 2
  want, got = _compare(x, k, kg, (stride, stride), atol=0.25, rtol=0.05, impl=impl)  # vs lax
  g = jax.random.normal(kg, want[0].shape).astype(jnp.bfloat16)
  f32 = _value_and_grads(dwconv.depthwise_conv2d_lax, (stride,) * 2)(
    x.astype(jnp.float32), k.astype(jnp.float32), g.astype(jnp.float32)
  )
  for name, o, r in zip(("y", "dx", "dk"), got, f32):
    assert o.dtype == jnp.bfloat16
    r = np.asarray(r)
    # One bf16 rounding of the result: relative 2^-8, plus slack for values near zero.
    np.testing.assert_allclose(
      np.asarray(o, np.float32), r, rtol=2**-7, atol=2**-7 * np.abs(r).max(), err_msg=name
    )


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_cpu_forms_numerical_gradients(impl):
  x, k, _ = _inputs((1, 5, 4, 2), (3, 3, 2, 2))
  for s in (2, 1):
    check_grads(lambda x, k, s=s: IMPLS[impl](x, k, (s, s)), (x, k), order=1, modes="rev")


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_cpu_forms_under_vmap_and_checkpoint(impl):
  x, k, _ = _inputs((3, 2, 7, 6, 4), (5, 5, 4, 1))  # leading axis mapped by vmap
  k2 = jax.random.normal(jax.random.PRNGKey(7), (3, 3, 4, 2))

  def loss(impl, x, k, k2):
    # Two uses of the conv inside one rematerialised function.
    @jax.checkpoint
    def body(x):
      y = jax.nn.gelu(impl(x, k, (1, 1)))
      return impl(y, k2, (2, 2))

    return jnp.sum(jnp.sin(jax.vmap(body)(x)))

  grad = lambda impl: jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2)))(x, k, k2)
  for w, o in zip(grad(dwconv.depthwise_conv2d_lax), grad(IMPLS[impl])):
    np.testing.assert_allclose(o, w, atol=1e-4, rtol=1e-4)


def test_module_params_and_dispatch(monkeypatch):
  module = dwconv.DepthwiseConv(kernel_size=7, multiplier=2, strides=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = module.init(jax.random.PRNGKey(1), x)
  params = variables["params"]
  assert set(params) == {"kernel", "bias"}
  assert params["kernel"].shape == (7, 7, 3, 2) and params["bias"].shape == (6,)
  params = {"kernel": params["kernel"], "bias": jnp.arange(6.0)}
  want = dwconv.depthwise_conv2d_lax(x, params["kernel"], (2, 2)) + jnp.arange(6.0)

  # The portable table (also outside any `ops.use` block) runs lax's grouped conv (autodiff).
  assert ops.current().name == "xla"
  assert ops.get("xla").depthwise_conv2d is dwconv.depthwise_conv2d_lax
  assert ops.get("xla").spike_merge_conv is dwconv.spike_merge_conv_int8
  assert native.available()
  outs = {"xla": module.apply({"params": params}, x)}
  try:
    for name in ("lax", "lax_taps", "shift", "native"):
      cpu_dwconv.set_implementation(name)
      assert cpu_dwconv.implementation() == name
      with ops.use("xla_cpu"):
        outs[name] = module.apply({"params": params}, x)
    cpu_dwconv.set_implementation(None)
    monkeypatch.setenv(cpu_dwconv.ENV_VAR, "auto")
    # With the native kernels built: native, except small maps at large batches.
    assert cpu_dwconv.implementation() == "native"
    assert cpu_dwconv.implementation((28, 28), 128) == "native"
    assert cpu_dwconv.implementation((7, 7), 8) == "native"
    assert cpu_dwconv.implementation((8, 8), 64) == "matmul"
    # Without them (no compiler): the shift form, and the Toeplitz matmul for small maps.
    monkeypatch.setattr(native, "available", lambda: False)
    assert cpu_dwconv.implementation() == "shift"  # the CPU default for large maps
    assert cpu_dwconv.implementation((28, 28)) == "shift"
    assert cpu_dwconv.implementation((16, 16)) == "matmul"
    assert cpu_dwconv.implementation((8, 8)) == "matmul"  # small maps: Toeplitz matmul
    # With the batch: building the Toeplitz matrices only pays off over enough images.
    assert cpu_dwconv.implementation((14, 14), 8) == "shift"
    assert cpu_dwconv.implementation((14, 14), 128) == "matmul"
    assert cpu_dwconv.implementation((7, 7), 8) == "matmul"
    assert cpu_dwconv.implementation((28, 28), 128) == "shift"
    monkeypatch.setenv(cpu_dwconv.ENV_VAR, "lax")
    assert cpu_dwconv.implementation() == "lax"
    monkeypatch.setenv(cpu_dwconv.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="SPIKEATCONV_DWCONV"):
      cpu_dwconv.implementation()
    with pytest.raises(ValueError, match="unknown depthwise conv implementation"):
      cpu_dwconv.set_implementation("fft")
  finally:
    cpu_dwconv.set_implementation(None)
  for out in outs.values():
    assert out.shape == (2, 4, 4, 6)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  assert not np.allclose(outs["shift"], 0.0)


@pytest.mark.parametrize(
  "c,stride,w",
  [
    (115, 1, 8),
    (115, 2, 8),
    (48, 2, 8),
    (256, 1, 8),
    (256, 2, 20),
    (512, 1, 117),
    (259, 1, 117),
    (259, 2, 117),
  ],
)
def test_native_vector_paths_match_lax(c, stride, w):
  """The native loops run 64-, 32- and 16-channel register blocks and a scalar tail:
  115 = 64 + 32 + 16 + 3 takes every path; 256 runs several 64-blocks. A 117-wide row has
  interior and edge blocks (the last one partial), and there the forward splits the 256 vector
  channels into two chunks (160 + 96) before the 3-channel tail. 256 and 512 float channels
  (pixels a multiple of 1 KiB apart) take the packed forward: 9 rows are two bands of output
  rows, and at 117 wide the 512 channels are split into 80-channel chunks (the last 32)."""
  x, k, kg = _inputs((2, 9, w, c), (7, 7, c, 1), seed=3)
  _, (y, dx, dk) = _compare(x, k, kg, (stride, stride), atol=1e-4, rtol=1e-5, impl="native")
  assert y.shape == (2, -(-9 // stride), -(-w // stride), c)
  assert dx.shape == x.shape and dk.shape == k.shape


def test_native_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
  """No working compiler: `load` returns the reason (auto then keeps the XLA forms)."""
  monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  reason = native.load()
  assert reason is not None and "no-such-compiler" in reason
  assert not list(tmp_path.iterdir())  # no partial library left behind
  monkeypatch.setenv(native.DISABLE_ENV_VAR, "0")
  assert "disabled" in native.load()


def test_native_library_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
  monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
  path = native.library_path()
  assert path.startswith(str(tmp_path)) and path.endswith(".so")
  monkeypatch.setattr(native, "_cpu_signature", lambda: "another cpu")
  assert native.library_path() != path


def test_bad_inputs_raise():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match="3 channels"):
    cpu_dwconv.depthwise_conv2d_shift(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 3, 1)))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    dwconv.depthwise_conv2d(x[0], jnp.zeros((3, 3, 3, 1)))
  with pytest.raises(ValueError, match="strides"):
    cpu_dwconv.depthwise_conv2d_shift(x, jnp.zeros((3, 3, 3, 1)), (0, 1))


@pytest.mark.parametrize(
  "h,w,k,s,m",
  [
    (8, 8, 7, 1, 1),
    (8, 8, 7, 2, 2),
    (7, 5, 3, 2, 1),
    (4, 4, 7, 1, 1),
    (1, 1, 7, 2, 2),
    (9, 6, 5, 1, 2),
  ],
)
def test_matmul_form_equals_lax(h, w, k, s, m):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, h, w, 4))
  kern = jax.random.normal(jax.random.PRNGKey(1), (k, k, 4, m))
  want = dwconv.depthwise_conv2d_lax(x, kern, (s, s))
  got = cpu_dwconv.depthwise_conv2d_matmul(x, kern, (s, s))
  np.testing.assert_allclose(got, want, atol=1e-4)
  g = jax.random.normal(jax.random.PRNGKey(2), want.shape)
  grads = [
    jax.grad(lambda a, b, f=f: jnp.sum(f(a, b, (s, s)) * g), (0, 1))(x, kern)
    for f in (dwconv.depthwise_conv2d_lax, cpu_dwconv.depthwise_conv2d_matmul)
  ]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, atol=1e-4)


def _branch_sum_reference(xs, kern, strides):
  """Σ_k of K separate lax depthwise convs: the grouped conv K*C -> C written the long way."""
  return sum(
    dwconv.depthwise_conv2d_lax(x, kern[:, :, k, :, None], strides) for k, x in enumerate(xs)
  )


@pytest.mark.parametrize("impl", ["lax", "lax_taps", "shift", "matmul", "native"])
@pytest.mark.parametrize(
  "h,w,c,k,s",
  [(8, 8, 5, 7, 1), (5, 6, 5, 7, 2), (1, 1, 5, 7, 1), (9, 7, 5, 3, 1), (9, 21, 40, 7, 1)],
)
def test_branch_sum_equals_separate_convs(impl, h, w, c, k, s):
  # (9, 21, 40): the native kernels' register-blocked rows (two 16-channel slices and a tail).
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  xs = tuple(jax.random.normal(key, (2, h, w, c)) for key in keys)  # K=3 branches
  kern = jax.random.normal(jax.random.PRNGKey(1), (k, k, 3, c))  # [kh, kw, K, C]
  want = _branch_sum_reference(xs, kern, (s, s))
  f = lambda a, b: cpu_dwconv.depthwise_conv2d_sum(a, b, (s, s), impl=impl)
  got = f(xs, kern)
  assert got.shape == want.shape == (2, -(-h // s), -(-w // s), c)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  g = jax.random.normal(jax.random.PRNGKey(2), want.shape)
  grads = [
    jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b) * g), (0, 1))(xs, kern)
    for fn in (lambda a, b: _branch_sum_reference(a, b, (s, s)), f)
  ]
  want_dx, want_dk = grads[0]
  got_dx, got_dk = grads[1]
  for i, (a, b) in enumerate(zip(want_dx, got_dx, strict=True)):
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-5, err_msg=f"dx[{i}]")
  np.testing.assert_allclose(got_dk, want_dk, atol=1e-4, rtol=1e-5, err_msg="dk")


@pytest.mark.parametrize(
  "h,w,c,s", [(8, 9, 5, 1), (9, 21, 40, 1), (9, 21, 40, 2), (10, 9, 1024, 1), (10, 9, 1024, 2)]
)
@pytest.mark.parametrize("values", ["spikes", "sparse", "signed"])
def test_native_branch_sum_of_integer_inputs_reads_them_as_int8(h, w, c, s, values):
  # MBPL's 0/1 spikes, and signed integers up to int8's range: the native kernels read (and the
  # backward keeps) them as int8 and give the float32 result exactly (integers are exact either
  # way, and the float path runs the same FMA order). "sparse": MBPL's upper thresholds at
  # initialisation: rare spikes, and one silent branch. 1024 int8 channels take the packed
  # forward (float32 at 1024 channels too: the float and int8 results are still equal).
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  if values in ("spikes", "sparse"):
    rates = (0.3, 0.3, 0.3, 0.3) if values == "spikes" else (0.3, 0.02, 0.002, 0.0)
    xs = tuple(
      (jax.random.uniform(key, (2, h, w, c)) < r).astype(jnp.float32) for key, r in zip(keys, rates)
    )
  else:
    xs = tuple(jax.random.randint(key, (2, h, w, c), -128, 128).astype(jnp.float32) for key in keys)
  kern = jax.random.normal(jax.random.PRNGKey(1), (7, 7, 4, c))
  g = jax.random.normal(jax.random.PRNGKey(2), (2, -(-h // s), -(-w // s), c))

  def value_and_grads(integer_inputs):
    f = lambda a, b: cpu_dwconv.depthwise_conv2d_sum(
      a, b, (s, s), impl="native", integer_inputs=integer_inputs
    )
    y, vjp = jax.vjp(f, xs, kern)
    return y, *vjp(g)

  want = value_and_grads(False)
  got = value_and_grads(True)
  np.testing.assert_allclose(got[0], _branch_sum_reference(xs, kern, (s, s)), atol=1e-3, rtol=1e-5)
  names = ("y", "dx0", "dx1", "dx2", "dx3", "dk")
  for name, a, b in zip(names, jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(b, a, err_msg=name)
  # The branches reach both custom calls (forward, kernel gradient) as int8 operands.
  f = lambda a, b: cpu_dwconv.depthwise_conv2d_sum(a, b, (s, s), impl="native", integer_inputs=True)
  hlo = jax.jit(lambda a, b: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, a, b))).lower(xs, kern)
  calls = [ln for ln in hlo.as_text().splitlines() if "spikeatconv_dwconv_" in ln]
  assert any("_fwd" in ln and "xi8>" in ln for ln in calls), calls
  assert any("_bwd_kernel" in ln and "xi8>" in ln for ln in calls), calls


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize(
  "spec", [P(("data", "fsdp")), P("data", None, None, "fsdp"), P(None, None, None, "data")]
)
def test_native_calls_run_on_each_devices_slice_of_a_sharded_batch(spec, s):
  # Without a partitioning rule XLA gathers a custom call's operands onto every device and runs
  # the whole batch on each. With `native._partitioned` each device convolves its slice
  # of the batch (and of the channels), and the kernel gradient's partial sums are added up.
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  xs = [(jax.random.uniform(keys[i], (8, 14, 14, 32)) > 0.7).astype(jnp.float32) for i in range(4)]
  kern = 0.1 * jax.random.normal(keys[4], (7, 7, 4, 32))

  def loss(xs, kern):
    y = cpu_dwconv.depthwise_conv2d_sum(xs, kern, (s, s), impl="native", integer_inputs=True)
    return jnp.sum(jnp.sin(barriers.materialize(y)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want = step(xs, kern)  # one device
  sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]
  hlo = step.lower(sharded, kern).compile().as_text()
  got = step(sharded, kern)
  assert "all-gather" not in hlo
  assert hlo.count("spikeatconv_dwconv_") >= 4  # forward, both gradients, the barrier
  assert got[1][0][0].sharding.spec == spec  # the input gradient keeps the batch's sharding
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_branch_sum_module_keeps_the_grouped_kernel():
  # MBPL's merge: K=4 branches of C=6 channels; the kernel is the grouped conv's
  # [7, 7, K*C, 1], indexed k*C + c.
  module = dwconv.DepthwiseConv(kernel_size=7, sum_branches=4, use_bias=True)
  xs = [jax.random.normal(jax.random.PRNGKey(i), (2, 8, 8, 6)) for i in range(4)]
  params = module.init(jax.random.PRNGKey(1), xs)["params"]
  assert params["kernel"].shape == (7, 7, 24, 1) and params["bias"].shape == (6,)
  params = {"kernel": params["kernel"], "bias": jnp.arange(6.0)}
  y = module.apply({"params": params}, xs)
  x_kc = jnp.concatenate(xs, axis=-1)  # channel k*C + c
  per_branch = dwconv.depthwise_conv2d_lax(x_kc, params["kernel"]).reshape(2, 8, 8, 4, 6).sum(3)
  np.testing.assert_allclose(y, per_branch + jnp.arange(6.0), atol=1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match="sequence of 4 branches"):
    dwconv.DepthwiseConv(sum_branches=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 6)))
  with pytest.raises(ValueError, match="sequence of 4 branches"):
    dwconv.DepthwiseConv(sum_branches=4).init(jax.random.PRNGKey(0), xs[:3])
  with pytest.raises(ValueError, match=r"kernel \[kh, kw, K, C\]"):
    dwconv.spike_merge_conv(xs, jnp.zeros((7, 7, 3, 6)))
  with pytest.raises(ValueError, match="same-shaped"):
    dwconv.spike_merge_conv([xs[0], xs[1][:, :4]], jnp.zeros((7, 7, 2, 6)))


def _conv_group_counts(jaxpr) -> list[tuple[int, int]]:
  """(feature_group_count, batch_group_count) of every convolution in a jaxpr, sub-jaxprs too."""
  return [
    (eqn.params["feature_group_count"], eqn.params["batch_group_count"])
    for eqn in hlo_utils.equations(jaxpr)
    if eqn.primitive.name == "conv_general_dilated"
  ]


@pytest.mark.parametrize("form", ["xla", "taps"])
def test_portable_train_step_kernel_gradients_are_batch_grouped_convolutions(monkeypatch, form):
  """What the portable table traces (for any platform; nothing is compiled here): the depthwise
  convs and MBPL's merge keep lax's grouped forward and input gradient, and their kernel
  gradients are autodiff's batch-grouped convolutions (XLA:TPU ran them at about a twelfth of
  the bytes of per-offset reductions). The taps forms in the table (form="taps") show that the
  check tells the two apart."""
  if form == "taps":
    taps = dataclasses.replace(
      ops.get("xla"),
      depthwise_conv2d=dwconv.depthwise_conv2d_lax_taps,
      spike_merge_conv=dwconv.branch_sum_conv2d_lax_taps,
    )
    monkeypatch.setitem(ops._LOADERS, "xla", lambda: taps)
  ops.get.cache_clear()
  try:
    cfg = model_config(variant="nano", spk="mbpl", attention="sisa", num_classes=10)
    cfg.attention.partition = 4
    m = models.build(cfg, platform="gpu")
    assert m.cfg.kernels == "xla"
    loss, variables = hlo_utils.train_mode_loss(m)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"])
  finally:
    monkeypatch.undo()
    ops.get.cache_clear()
  counts = _conv_group_counts(jaxpr.jaxpr)
  grouped = [f for f, b in counts if f > 1]
  batch_grouped = [b for f, b in counts if b > 1]
  assert len(grouped) >= 8, counts  # forwards and input gradients: lax's grouped conv
  if form == "xla":
    assert batch_grouped, counts
  else:
    assert not batch_grouped, counts


@pytest.mark.parametrize("groups_in,mult,stride", [(1, 2, 2), (1, 1, 1), (3, 1, 1)])
def test_tap_kernel_gradient_forms_agree(groups_in, mult, stride):
  """The stacked (portable) and loop (XLA:CPU) schedules of the per-offset kernel gradient: same
  sums. groups_in=3: MBPL's merge (K=3 inputs per group); mult=2: a stage entry's multiplier."""
  c = 5
  x, _, kg = _inputs((2, 9, 8, c * groups_in), (7, 7, 1, 1), seed=3)
  ho, wo = -(-9 // stride), -(-8 // stride)
  g = jax.random.normal(kg, (2, ho, wo, c * mult))
  stacked = dwconv.kernel_grad_taps(x, g, (7, 7), groups_in, (stride, stride))
  loop = cpu_dwconv.kernel_grad_taps_loop(x, g, (7, 7), groups_in, (stride, stride))
  assert loop.shape == (7, 7, groups_in, c * mult)
  np.testing.assert_allclose(stacked, loop, atol=1e-5, rtol=1e-5)
  # And both are lax's own kernel gradient of that grouped conv.
  kern = jnp.zeros((7, 7, groups_in, c * mult))
  conv = lambda k: dwconv.grouped_conv(x, k, (stride, stride), c, False)
  (want,) = jax.vjp(conv, kern)[1](g)
  np.testing.assert_allclose(loop, want, atol=1e-4, rtol=1e-5)


def _nano_value_and_grad(kernels, spk="none", attention="softmax"):
  """Loss and parameter gradients of a nano train-mode forward built with `kernels`."""
  cfg = model_config(variant="nano", spk=spk, attention=attention, num_classes=10)
  cfg.attention.partition = 4
  cfg.kernels = kernels
  m = models.build(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (2, 10))
  variables = m.init(jax.random.PRNGKey(2), x, train=False)

  def loss(params):
    out, _ = m.apply(
      {"params": params, "batch_stats": variables.get("batch_stats", {})},
      x,
      train=True,
      rngs={"dropout": jax.random.PRNGKey(3)},
      mutable=["batch_stats", "spikes"],
    )
    return jnp.sum(out * w)

  return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_portable_forms_compute_what_the_cpu_forms_compute():
  """The whole nano train-mode forward and its gradients with the portable table (lax's
  depthwise convs, layers.norms, autodiff's dense and conv gradients) equal the XLA:CPU
  table's (native kernels, CPULayerNorm, patch gradients), with the same parameter tree.
  Spike-free, so no threshold crossing can flip between the two summation orders."""
  cpu_loss, cpu_grads = _nano_value_and_grad("xla_cpu")
  xla_loss, xla_grads = _nano_value_and_grad("xla")
  np.testing.assert_allclose(xla_loss, cpu_loss, rtol=1e-5, atol=1e-5)
  flat_cpu = jax.tree_util.tree_flatten_with_path(cpu_grads)[0]
  flat_xla = jax.tree_util.tree_flatten_with_path(xla_grads)[0]
  assert [p for p, _ in flat_cpu] == [p for p, _ in flat_xla]
  # Absolute slack from the largest gradient: some are zero up to rounding (biases before
  # BatchNorm), where a relative bound means nothing.
  scale = max(float(np.abs(g).max()) for _, g in flat_cpu)
  for (path, want), (_, got) in zip(flat_cpu, flat_xla, strict=True):
    np.testing.assert_allclose(
      got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)
    )


def test_native_multiplier_gradient_sums_the_copies_without_a_reduce():
  # The channel multiplier repeats each input channel m times before the kernels; the gradient
  # of that repeat is written as a sum of strided slices (autodiff's reduce over the size-m
  # axis ran at ~4 GB/s on XLA:CPU).
  x, k, _ = _inputs((2, 9, 8, 3), (7, 7, 3, 2))
  loss = lambda x: jnp.sum(jnp.sin(native.depthwise_conv2d_native(x, k, (2, 2))))
  hlo = jax.jit(jax.grad(loss)).lower(x).as_text()
  assert "stablehlo.reduce" not in hlo
  want = jax.grad(lambda x: jnp.sum(jnp.sin(dwconv.depthwise_conv2d_lax(x, k, (2, 2)))))(x)
  np.testing.assert_allclose(jax.grad(loss)(x), want, atol=1e-4, rtol=1e-5)


def _fusions_computing(compiled, op: str, out_channels: int) -> list[str]:
  """Fused computations with a [..., out_channels] float32 result whose body contains `op`."""
  result = re.compile(r"-> f32\[[\d,]*," + str(out_channels) + r"\] $")
  return [
    name
    for name, signature, body in hlo_utils.computations(compiled)
    if result.search(signature) and f" {op}(" in body
  ]


def test_native_multiplier_computes_its_input_once_before_the_repeat(monkeypatch):
  # Fused into the repeat, the producer of x was evaluated once per output channel in the
  # broadcast's unvectorised order (8.4 ms for a 1.1 ms repeat in the tiny step); behind the
  # fusion barrier the repeat only copies.
  x, k, _ = _inputs((2, 9, 8, 16), (7, 7, 16, 2))
  spikes_plus = lambda x: (x > 0.5).astype(jnp.float32) + 0.25 * x  # cheap: XLA fuses it
  f = lambda x: native.depthwise_conv2d_native(spikes_plus(x), k)
  compile_ = lambda: jax.jit(lambda x: f(x)).lower(x).compile()  # a new function: no cache
  assert _fusions_computing(compile_(), "compare", 32) == []
  np.testing.assert_allclose(
    compile_()(x), dwconv.depthwise_conv2d_lax(spikes_plus(x), k), atol=1e-4, rtol=1e-5
  )
  monkeypatch.setattr(native, "fusion_barrier", lambda x: x)
  assert _fusions_computing(compile_(), "compare", 32) != []  # the check can fail
