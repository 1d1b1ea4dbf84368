"""The XLA:CPU table's products, norms, reductions and barriers (`xla_cpu.products`, `.norms`,
`.barriers`) give the portable forms' values and gradients; `layers.common` uses the active
table's."""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.layers import common, ops
from spikeatconv_jax.layers import norms as portable_norms
from spikeatconv_jax.xla_cpu import native, norms, products


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_dense_matches_nn_dense(dtype, tol):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 5, 12))  # [T, B, H, W, C]
  ours = common.dense(7, use_bias=True, dtype=dtype, name="fc")  # applied under "xla_cpu" below
  ref = nn.Dense(7, dtype=dtype, param_dtype=jnp.float32, name="fc")
  v = ours.init(jax.random.PRNGKey(1), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # a non-zero bias

  def loss(m):
    return lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x).astype(jnp.float32)))

  for f in (jax.jit, lambda f: f):  # compiled and eager
    y0, g0 = f(jax.value_and_grad(loss(ref), argnums=(0, 1)))(v["params"], x)
    with ops.use("xla_cpu"):
      y1, g1 = f(jax.value_and_grad(loss(ours), argnums=(0, 1)))(v["params"], x)
    np.testing.assert_allclose(float(y1), float(y0), rtol=tol, atol=tol)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol,
                                 atol=tol)  # fmt: skip


def test_dense_dot_general_falls_back_for_other_products():
  a = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5))
  b = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 6))
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched product: plain lax.dot_general
  np.testing.assert_allclose(
    np.asarray(products.dense_dot_general(a, b, dims)),
    np.asarray(jax.lax.dot_general(a, b, dims)),
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  "shape,k,stride,padding",
  [
    ((2, 9, 11, 5), 3, 1, "SAME"),
    ((2, 9, 11, 5), 3, 2, "SAME"),
    ((2, 8, 8, 4), 1, 2, "SAME"),  # the stage-entry shortcut
    ((1, 7, 6, 3), 3, 1, "VALID"),
    ((1, 7, 6, 3), 3, 2, ((1, 0), (2, 1))),
  ],
)
def test_conv_matches_lax(shape, k, stride, padding):
  """The XLA:CPU convolution (im2col kernel gradient) against lax's, values and both gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], 6))
  dims = ("NHWC", "HWIO", "NHWC")

  def loss(conv):
    return lambda x, w: jnp.sum(
      jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dims))
    )

  y0, g0 = jax.value_and_grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
  y1, g1 = jax.jit(jax.value_and_grad(loss(products.conv_general_dilated), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(float(y1), float(y0), rtol=1e-5)
  for a, b in zip(g0, g1, strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_conv_and_dense_modules_use_the_active_table():
  m = common.conv(4, 3, strides=2, use_bias=False, dtype=jnp.float32, name="c")
  assert m.conv_general_dilated is common.conv_general_dilated
  assert common.dense(4, use_bias=False, dtype=jnp.float32, name="d").dot_general is (
    common.dense_dot_general
  )
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 4))
  for name in ("xla", "xla_cpu"):
    with ops.use(name):
      jaxpr = str(jax.make_jaxpr(lambda x: common.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x))  # fmt: skip
    # The XLA:CPU form is a custom VJP (its im2col kernel gradient); the portable one is lax's.
    assert ("custom_vjp_call" in jaxpr) == (name == "xla_cpu"), (name, jaxpr)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_gelu_is_the_exact_gelu(dtype, tol):
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jnp.array([0.0, -1e-30, 1e30])])
  x = x.astype(dtype)
  ref = jax.nn.gelu(x, approximate=False)
  y = common.gelu(x)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=tol,
                             atol=tol)  # fmt: skip
  # Not the tanh approximation: at x = -3 they differ by ~4e-4.
  assert (
    abs(float(common.gelu(jnp.float32(-3.0))) - float(jax.nn.gelu(-3.0, approximate=True))) > 3e-4
  )
  # Gradient: Φ(x) + x·φ(x).
  g = jax.vmap(jax.grad(lambda v: common.gelu(v).astype(jnp.float32)))(x[:4001])
  g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False).astype(jnp.float32)))(
    x[:4001]
  )
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol,
                             atol=tol)  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("table", ["xla", "xla_cpu"])
@pytest.mark.parametrize("barrier", ["materialize_cotangent", "materialize"])
def test_barriers_are_the_identity(dtype, barrier, table):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5)).astype(dtype)
  barrier = getattr(ops.get(table), barrier)

  def f(barrier):
    return lambda x: jnp.sum(jnp.sin(barrier(x) * 3).astype(jnp.float32))

  for wrap in (jax.jit, lambda f: f):
    y0, g0 = wrap(jax.value_and_grad(f(lambda x: x)))(x)
    y1, g1 = wrap(jax.value_and_grad(f(barrier)))(x)
    assert g1.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(g1, np.float32), np.asarray(g0, np.float32))
  g = jax.vmap(jax.grad(lambda v: jnp.sum(barrier(v) ** 2)))(x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(x, np.float32), rtol=1e-6)


class _MBPLSite(nn.Module):
  """fc -> BN -> MBPL SPK -> fc: the LIF's input gradient feeds the BN backward."""

  @nn.compact
  def __call__(self, x):
    from spikeatconv_jax.snn.spk import SPK

    y = common.dense(4 * x.shape[-1], use_bias=True, dtype=jnp.float32, name="fc1")(x)
    y = common.batch_norm(train=True, dtype=jnp.float32, name="bn")(y)
    y = SPK(kind="mbpl", thresholds=(0.25, 0.5, 1.0, 2.0), name="spk")(y)
    return common.dense(x.shape[-1], use_bias=True, dtype=jnp.float32, name="fc2")(y)


def test_materialize_cotangent_stores_the_lif_gradient_once(monkeypatch):
  if not native.available():
    pytest.skip(f"needs the native CPU library: {native.unavailable_reason()}")
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 16, 16, 16))
  m = _MBPLSite()
  v = m.init(jax.random.PRNGKey(1), x)

  def grad_fn():
    def loss(p, x):
      y, _ = m.apply({**v, "params": p}, x, mutable=["batch_stats", "spikes"])
      return jnp.sum(y**2)

    with ops.use("xla_cpu"):
      return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(v["params"], x).compile()

  with_barrier = grad_fn()
  monkeypatch.setattr(common, "materialize_cotangent", lambda x: x)
  without = grad_fn()
  assert "spikeatconv_dwconv_barrier" in with_barrier.as_text()
  assert "spikeatconv_dwconv_barrier" not in without.as_text()
  # Same gradients; fewer temporaries: the four surrogate derivatives are no longer stored.
  for a, b in zip(
    jax.tree_util.tree_leaves(with_barrier(v["params"], x)),
    jax.tree_util.tree_leaves(without(v["params"], x)),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  mem = lambda c: c.memory_analysis().temp_size_in_bytes
  assert mem(with_barrier) < 0.9 * mem(without), (mem(with_barrier), mem(without))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_cpu_layer_norm_matches_nn_layer_norm(dtype, tol):
  # Same parameters (names, shapes, init), values and gradients as nn.LayerNorm, on an input
  # with a per-row offset (the two-pass variance and the mat-vec channel means both matter).
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 4, 24)) * 3.0 + 5.0
  x = x.astype(dtype)
  kw = dict(epsilon=common.LN_EPS, dtype=dtype, param_dtype=jnp.float32, name="ln")
  ours = norms.CPULayerNorm(scale_init=nn.initializers.constant(0.5), **kw)
  ref = nn.LayerNorm(scale_init=nn.initializers.constant(0.5), **kw)
  v = ours.init(jax.random.PRNGKey(1), x)
  v_ref = ref.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v_ref)
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v_ref), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  v = jax.tree_util.tree_map(lambda a: a + jnp.linspace(0.1, 0.9, a.shape[-1]), v)
  r = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(m):
    return lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x).astype(jnp.float32)) * r)

  y0, g0 = jax.jit(jax.value_and_grad(loss(ref), argnums=(0, 1)))(v["params"], x)
  y1, g1 = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1)))(v["params"], x)
  out = ours.apply(v, x)
  assert out.dtype == ref.apply(v, x).dtype
  np.testing.assert_allclose(float(y1), float(y0), rtol=tol, atol=tol)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = float(np.max(np.abs(np.asarray(a, np.float32))))
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol,
                               atol=tol * scale)  # fmt: skip


class _MergeTail(nn.Module):
  """MBPL's merge tail as three ops (shift, LayerNorm, layer scale) or as scaled_layer_norm."""

  fused: bool
  dtype: Any

  @nn.compact
  def __call__(self, z):
    c = z.shape[-1]
    shift = self.param("shift", nn.initializers.normal(1.0), (c,), jnp.float32)
    gamma = self.param("gamma", nn.initializers.normal(1.0), (c,), jnp.float32)
    if self.fused:
      return norms.CPUScaledLayerNorm(dtype=self.dtype, name="ln")(z, shift=shift, gamma=gamma)
    y = norms.CPULayerNorm(dtype=self.dtype, name="ln")(z + shift.astype(z.dtype))
    return y * gamma.astype(y.dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
def test_scaled_layer_norm_matches_shift_layer_norm_and_scale(dtype, tol):
  # Same parameter tree (the LayerNorm's under its name), output dtype, values and gradients as
  # the three ops in float32. (In bfloat16 it rounds once, at the output: its gradients were
  # 0.3-2 % off the float32 ones here, the three ops' 0.7-8 %.) Two per-channel sums give the
  # three parameter gradients: the compiled gradient has 3 per-channel reductions over the map
  # (A, B, the shift's) against the three ops' 4.
  z32 = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4, 24)) * 3.0 + 2.0
  z = z32.astype(dtype)
  r = jax.random.normal(jax.random.PRNGKey(2), z.shape)
  ref, ours = _MergeTail(False, jnp.float32), _MergeTail(True, dtype)
  v = ref.init(jax.random.PRNGKey(1), z32)
  assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(1), z)) == (
    jax.tree_util.tree_structure(v)
  )
  v = jax.tree_util.tree_map(lambda a: a + jnp.linspace(0.1, 0.9, a.shape[-1]), v)

  def loss(m):
    return lambda p, z: jnp.sum(jnp.sin(m.apply({"params": p}, z).astype(jnp.float32)) * r)

  y0, g0 = jax.jit(jax.value_and_grad(loss(ref), argnums=(0, 1)))(v["params"], z32)
  y1, g1 = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1)))(v["params"], z)
  assert ours.apply(v, z).dtype == _MergeTail(False, dtype).apply(v, z).dtype
  np.testing.assert_allclose(float(y1), float(y0), rtol=tol, atol=tol)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
    assert a.shape == b.shape
    scale = float(np.max(np.abs(np.asarray(a, np.float32))))
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol,
                               atol=tol * scale)  # fmt: skip
  assert g1[1].dtype == dtype

  def channel_sums(m, x):  # per-channel reductions in the compiled gradient
    hlo = jax.jit(jax.grad(loss(m), argnums=(0, 1))).lower(v["params"], x).compile().as_text()
    return len(re.findall(r"= f32\[24\]\{0\} reduce\(", hlo))

  assert (channel_sums(ours, z), channel_sums(_MergeTail(False, dtype), z)) == (3, 4)


def test_layer_norms_follow_the_active_table():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 24)) + 3.0
  z, shift, gamma = x, jnp.linspace(-1.0, 1.0, 24), jnp.linspace(0.5, 2.0, 24)
  outs = {}
  for name, cls in (("xla", portable_norms.LayerNorm), ("xla_cpu", norms.CPULayerNorm)):
    with ops.use(name):
      assert type(common.layer_norm(dtype=jnp.float32, name="ln")) is cls
      m = common.layer_norm(dtype=jnp.float32, name="ln", scale_init=0.5)
      v = m.init(jax.random.PRNGKey(1), x)
      assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {"scale": (24,), "bias": (24,)}}
      outs[name] = m.apply(v, x)

      class Scaled(nn.Module):
        @nn.compact
        def __call__(self, z):
          return common.scaled_layer_norm(dtype=jnp.float32, name="merge_ln")(
            z, shift=shift, gamma=gamma
          )

      vs = Scaled().init(jax.random.PRNGKey(1), z)
      assert jax.tree_util.tree_map(jnp.shape, vs) == {
        "params": {"merge_ln": {"scale": (24,), "bias": (24,)}}
      }
      outs[name + "_scaled"] = Scaled().apply(vs, z)
  np.testing.assert_allclose(outs["xla_cpu"], outs["xla"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs["xla_cpu_scaled"], outs["xla_scaled"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_repeat_time_is_a_broadcast_whose_gradient_sums_the_steps(t):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (t, 2, 5, 4, 3))
  y = products.repeat_time(x, t)
  np.testing.assert_array_equal(y, jnp.broadcast_to(x[None], (t,) + x.shape))
  f = lambda rep: jax.grad(lambda x: jnp.sum(jnp.sin(rep(x)) * w))(x)
  want = f(lambda x: ops.get("xla").repeat_time(x, t))
  np.testing.assert_allclose(f(lambda x: products.repeat_time(x, t)), want, rtol=1e-6, atol=1e-6)
  # The backward sums the T slices elementwise: no reduce over the T axis in the graph.
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(products.repeat_time(x, t) * w))).lower(x).as_text()
  assert "stablehlo.reduce" not in hlo


@pytest.mark.parametrize("g", [1, 2, 5, 64])
def test_add_broadcast_gradient_sums_the_leading_axes_without_a_reduce(g):
  x = jax.random.normal(jax.random.PRNGKey(0), (g, 3, 4, 7, 7))
  b = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 7))
  np.testing.assert_allclose(products.sum_leading(x), jnp.sum(x, axis=0), rtol=1e-5, atol=1e-5)
  loss = lambda add: lambda x, b: jnp.sum(jnp.sin(add(x, b)))
  want = jax.grad(loss(ops.get("xla").add_broadcast), argnums=(0, 1))(x, b)
  got = jax.grad(loss(products.add_broadcast), argnums=(0, 1))(x, b)
  for a, w in zip(got, want, strict=True):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(jax.grad(loss(products.add_broadcast), argnums=1)).lower(x, b).as_text()
  assert "stablehlo.reduce" not in hlo
  for table in ("xla", "xla_cpu"):
    with pytest.raises(ValueError, match="trailing"):
      ops.get(table).add_broadcast(x, b[:2])
