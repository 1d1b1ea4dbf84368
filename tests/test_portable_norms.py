"""The portable table's norms (layers.norms) against flax's nn.LayerNorm / nn.BatchNorm: same
parameter and batch_stats trees, values, gradients and running averages; smaller residuals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.layers import common, norms, ops

TOLS = [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)]


def _close_tree(got, want, tol):
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
    assert a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = float(np.max(np.abs(a))) or 1.0
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * scale)


def _perturbed(v):
  return jax.tree_util.tree_map(lambda a: a + jnp.linspace(0.1, 0.9, a.shape[-1]), v)


def _input(dtype, shape=(2, 3, 5, 4, 24)):
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3.0 + 2.0
  return x.astype(dtype), jax.random.normal(jax.random.PRNGKey(2), shape)


@pytest.mark.parametrize("dtype,tol", TOLS)
def test_layer_norm_matches_flax(dtype, tol):
  x, r = _input(dtype)
  ref = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
  ours = norms.LayerNorm(epsilon=1e-6, dtype=dtype)
  v = ref.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(1), x)) == (
    jax.tree_util.tree_structure(v)
  )
  v = _perturbed(v)

  def loss(m):
    return lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x).astype(jnp.float32)) * r)

  assert ours.apply(v, x).dtype == ref.apply(v, x).dtype == dtype
  # Reference in float32 (flax's bf16 form rounds in between).
  x32 = x.astype(jnp.float32)
  y0, g0 = jax.value_and_grad(loss(nn.LayerNorm(epsilon=1e-6)), argnums=(0, 1))(v["params"], x32)
  y1, g1 = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1)))(v["params"], x)
  np.testing.assert_allclose(float(y1), float(y0), rtol=tol, atol=tol)
  _close_tree(g1, g0, tol)
  assert g1[1].dtype == dtype


@pytest.mark.parametrize("dtype,tol", TOLS)
def test_scaled_layer_norm_matches_flax_form(dtype, tol):
  x, r = _input(dtype)
  c = x.shape[-1]
  shift = jnp.linspace(-1.0, 1.0, c)
  gamma = jnp.linspace(0.5, 2.0, c)

  def tail(make):
    class Tail(nn.Module):
      @nn.compact
      def __call__(self, x, shift, gamma):
        f = make(epsilon=1e-6, dtype=x.dtype, param_dtype=jnp.float32, name="ln")
        return f(x, shift=shift, gamma=gamma)

    return Tail()

  ref, ours = tail(ops.scaled_layer_norm_flax), tail(norms.ScaledLayerNorm)
  v = ref.init(jax.random.PRNGKey(1), x, shift, gamma)
  assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(1), x, shift, gamma)) == (
    jax.tree_util.tree_structure(v)
  )
  v = _perturbed(v)

  def loss(m):
    return lambda p, x, s, g: jnp.sum(
      jnp.sin(m.apply({"params": p}, x, s, g).astype(jnp.float32)) * r
    )

  args = (v["params"], x, shift, gamma)
  assert ours.apply(v, x, shift, gamma).dtype == ref.apply(v, x, shift, gamma).dtype
  x32 = x.astype(jnp.float32)
  y0, g0 = jax.value_and_grad(loss(ref), argnums=(0, 1, 2, 3))(v["params"], x32, shift, gamma)
  y1, g1 = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1, 2, 3)))(*args)
  np.testing.assert_allclose(float(y1), float(y0), rtol=tol, atol=tol)
  _close_tree(g1, g0, tol)


@pytest.mark.parametrize("dtype,tol", TOLS)
def test_batch_norm_matches_flax(dtype, tol):
  x, r = _input(dtype, (4, 5, 6, 16))

  def make(cls):
    return cls(
      use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32
    )

  ref, ours = make(nn.BatchNorm), make(norms.BatchNorm)
  v = ref.init(jax.random.PRNGKey(1), x)
  v1 = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_structure(v1) == jax.tree_util.tree_structure(v)
  _close_tree(v1, v, 0.0)  # init: no running-average update
  v = _perturbed(v)

  def loss(m):
    def f(p, x):
      y, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y.astype(jnp.float32)) * r), upd

    return f

  x32 = x.astype(jnp.float32)
  ref32 = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  (y0, s0), g0 = jax.value_and_grad(loss(ref32), argnums=(0, 1), has_aux=True)(v["params"], x32)
  (y1, s1), g1 = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1), has_aux=True))(
    v["params"], x
  )
  np.testing.assert_allclose(float(y1), float(y0), rtol=tol, atol=tol)
  _close_tree(g1, g0, tol)
  _close_tree(s1, s0, 1e-5)  # statistics are float32 of the same input values
  assert s1["batch_stats"]["mean"].dtype == jnp.float32
  # Eval mode: the running averages.
  ev_ref = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype)
  ev = norms.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype)
  _close_tree(ev.apply(v, x), ev_ref.apply(v, x), tol)
  assert ev.apply(v, x).dtype == ev_ref.apply(v, x).dtype == dtype


def _residual_bytes(f, *args):
  """Bytes of the residuals jax.vjp keeps (the saved values, not the inputs' references)."""
  _, vjp = jax.vjp(f, *args)
  ids = {id(a) for a in jax.tree_util.tree_leaves(args)}
  return sum(
    leaf.nbytes
    for leaf in jax.tree_util.tree_leaves(vjp)
    if hasattr(leaf, "nbytes") and id(leaf) not in ids
  )


@pytest.mark.parametrize("kind", ["layer", "batch"])
def test_norm_backward_keeps_only_input_and_statistics(kind):
  # bf16 [8, 16, 16, 64]: flax's autodiff keeps float32 maps; ours the bf16 input and float32
  # statistics only.
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 64)).astype(jnp.bfloat16)
  if kind == "layer":
    ref, ours = nn.LayerNorm(dtype=jnp.bfloat16), norms.LayerNorm(dtype=jnp.bfloat16)
    stats = x.size // 64 * 2 * 4
  else:
    ref = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    ours = norms.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    stats = 64 * 2 * 4
  v = ref.init(jax.random.PRNGKey(1), x)

  def f(m):
    return lambda p, x: m.apply({**v, "params": p}, x, mutable=["batch_stats"])[0]

  ours_bytes = _residual_bytes(f(ours), v["params"], x)
  ref_bytes = _residual_bytes(f(ref), v["params"], x)
  # At most the input (2 bytes/element, when jax.vjp copies it) plus statistics and params.
  assert ours_bytes <= x.nbytes + stats + 4 * 64 * 8
  assert ref_bytes >= 2 * x.size * 4  # at least two float32 maps


def test_common_batch_norm_follows_the_table():
  with ops.use("xla"):
    assert isinstance(common.batch_norm(train=True, dtype=jnp.float32, name="bn"), norms.BatchNorm)
  assert ops.get("xla_cpu").batch_norm is nn.BatchNorm
