"""layers.common.dense and .conv: their CPU gradient forms give autodiff's values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.layers import common


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_dense_matches_nn_dense(dtype, tol):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 5, 12))  # [T, B, H, W, C]
  ours = common.dense(7, use_bias=True, dtype=dtype, name="fc")
  ref = nn.Dense(7, dtype=dtype, param_dtype=jnp.float32, name="fc")
  v = ours.init(jax.random.PRNGKey(1), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # a non-zero bias

  def loss(m):
    return lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x).astype(jnp.float32)))

  for f in (jax.jit, lambda f: f):  # compiled and eager
    y0, g0 = f(jax.value_and_grad(loss(ref), argnums=(0, 1)))(v["params"], x)
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
    np.asarray(common.dense_dot_general(a, b, dims)),
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
  """common.conv's convolution (im2col kernel gradient on CPU) against lax's, values and both
  gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, shape[-1], 6))
  dims = ("NHWC", "HWIO", "NHWC")

  def loss(conv):
    return lambda x, w: jnp.sum(
      jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dims))
    )

  y0, g0 = jax.value_and_grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
  y1, g1 = jax.jit(jax.value_and_grad(loss(common.conv_general_dilated), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(float(y1), float(y0), rtol=1e-5)
  for a, b in zip(g0, g1, strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_conv_module_uses_it():
  m = common.conv(4, 3, strides=2, use_bias=False, dtype=jnp.float32, name="c")
  assert m.conv_general_dilated is common.conv_general_dilated
