"""The TPU table's XLA forms besides the Pallas merge (`pallas_tpu.table`): the depthwise conv
with a channel multiplier as one depthwise conv per multiplier, and `materialize` /
`materialize_cotangent` as optimization barriers. Same values and gradients as the portable
forms; the barriers are in the lowered program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.layers import dwconv, ops
from spikeatconv_jax.pallas_tpu import hold


@pytest.mark.parametrize(
  "x_shape,m,stride", [((2, 9, 9, 3), 2, 2), ((1, 8, 6, 4), 3, 1), ((2, 7, 7, 5), 1, 2)]
)
def test_per_multiplier_conv_equals_the_grouped_conv(x_shape, m, stride):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, (7, 7, x_shape[-1], m))
  ref = dwconv.depthwise_conv2d_lax(x, kernel, (stride, stride))
  got = dwconv.depthwise_conv2d_per_multiplier(x, kernel, (stride, stride))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, ref.shape)

  def grads(fn):
    return jax.grad(lambda x, k: jnp.vdot(fn(x, k, (stride, stride)), g), (0, 1))(x, kernel)

  for want, have in zip(
    grads(dwconv.depthwise_conv2d_lax), grads(dwconv.depthwise_conv2d_per_multiplier), strict=True
  ):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


def test_per_multiplier_conv_checks_its_operands():
  with pytest.raises(ValueError, match="channels"):
    dwconv.depthwise_conv2d_per_multiplier(jnp.zeros((1, 8, 8, 3)), jnp.zeros((7, 7, 4, 2)))


@pytest.mark.parametrize("fn", [hold.materialize, hold.materialize_cotangent])
def test_holds_are_the_identity_with_the_identity_gradient(fn):
  x = jnp.arange(12.0).reshape(3, 4)
  g = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  y, vjp = jax.vjp(lambda x: fn(x) * 2.0, x)
  np.testing.assert_array_equal(y, 2.0 * x)
  np.testing.assert_array_equal(vjp(g)[0], 2.0 * g)


def test_holds_put_barriers_where_the_table_says():
  # materialize: a barrier on the value and on its cotangent; materialize_cotangent: only on
  # the cotangent.
  def count(fn):
    text = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(fn(jnp.cos(x)))))).lower(jnp.ones(4))
    return text.as_text().count("optimization_barrier")

  assert count(hold.materialize) == 2
  assert count(hold.materialize_cotangent) == 1
  assert count(lambda x: x) == 0


def test_tpu_table_takes_these_forms():
  table = ops.get("pallas_tpu")
  assert table.depthwise_conv2d is dwconv.depthwise_conv2d_per_multiplier
  assert table.materialize is hold.materialize
  assert table.materialize_cotangent is hold.materialize_cotangent
  assert table.materialize_heads is hold.materialize
  assert ops.get("xla").materialize_heads(1.0) == 1.0
  assert ops.get("xla_cpu").materialize_heads is ops.get("xla").materialize_heads
  assert ops.get("xla").depthwise_conv2d is dwconv.depthwise_conv2d_lax
