"""layers.remat: same values, gradients and variables as no remat, and a real memory saving."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.layers.remat import after_cotangent, remat

WIDE = 2048
KEY = jax.random.PRNGKey(7)


class Block(nn.Module):
  """A residual MLP block with BatchNorm, per-row dropout (like drop path) and a sown value:
  every collection and RNG kind the models use."""

  width: int

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(WIDE, name="up")(x)
    h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
    h = jnp.tanh(h) * jnp.sin(h)
    h = nn.Dropout(0.1, broadcast_dims=(1,), deterministic=not train)(h)
    self.sow("spikes", "rate", jnp.mean(h > 0))
    return x + nn.Dense(self.width, name="down")(h)


class Net(nn.Module):
  use_remat: bool
  depth: int = 6

  @nn.compact
  def __call__(self, x, train: bool):
    cls = remat(Block, static_argnums=(2,)) if self.use_remat else Block
    for b in range(self.depth):
      x = cls(x.shape[-1], name=f"block{b}")(x, train)
    return x


def _grad_fn(model):
  def loss(params, stats, x, key):
    y, mut = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      True,
      rngs={"dropout": key},
      mutable=["batch_stats", "spikes"],
    )
    return jnp.sum(y**2), mut

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
  v = Net(False).init(jax.random.PRNGKey(1), x, False)
  return x, v


def test_same_variables_values_gradients_and_updates(setup):
  x, v = setup
  v_r = jax.eval_shape(lambda: Net(True).init(jax.random.PRNGKey(1), x, False))
  assert jax.tree_util.tree_structure(v_r) == jax.tree_util.tree_structure(v)
  out0 = _grad_fn(Net(False))(v["params"], v["batch_stats"], x, KEY)
  out1 = _grad_fn(Net(True))(v["params"], v["batch_stats"], x, KEY)
  assert jax.tree_util.tree_structure(out0) == jax.tree_util.tree_structure(out1)
  for a, b in zip(jax.tree_util.tree_leaves(out0), jax.tree_util.tree_leaves(out1), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  grads = out1[1]
  assert float(jnp.abs(grads["block0"]["up"]["kernel"]).sum()) > 0


def test_peak_memory_drops(setup):
  """Six blocks of [N, 2048] activations: with every block rematerialised the compiled train
  step's temporaries must fall well below those without. (XLA:CPU hoists the recomputation of
  plain jax.checkpoint to the start of the backward pass; this checks ours is not hoisted.)"""
  _, v = setup
  x = jax.ShapeDtypeStruct((4096, 32), jnp.float32)

  def temp_mb(use_remat):
    c = _grad_fn(Net(use_remat)).lower(v["params"], v["batch_stats"], x, KEY).compile()
    return c.memory_analysis().temp_size_in_bytes / 2**20

  plain, rematted = temp_mb(False), temp_mb(True)
  assert rematted < 0.5 * plain, (plain, rematted)


def test_after_cotangent_matches_plain_vjp():
  def f(w, x, n):
    return jnp.tanh(x @ w) * 2, jnp.sum(x)

  w = jax.random.normal(jax.random.PRNGKey(0), (8, 8))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  n = jnp.arange(3)  # an integer argument: its cotangent is float0

  def loss(fun):
    return lambda w, x: jnp.sum(fun(w, x, n)[0] ** 2) + fun(w, x, n)[1]

  g0 = jax.grad(loss(f), argnums=(0, 1))(w, x)
  g1 = jax.grad(loss(after_cotangent(jax.checkpoint(f))), argnums=(0, 1))(w, x)
  for a, b in zip(g0, g1, strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_static_argnums_count_self():
  with pytest.raises(ValueError, match="count self"):
    remat(Block, static_argnums=(0,))
