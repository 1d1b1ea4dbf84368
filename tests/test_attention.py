"""Partitions, relative-position bias, attention and FFN units (DESIGN.md §4)."""

import hlo_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import spk_config
from spikeatconv_jax.layers import attention as att
from spikeatconv_jax.layers import common


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("h,p", [(8, 4), (14, 7), (4, 4), (6, 2)])
def test_partition_round_trip(kind, h, p):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, h, h, 5))
  g = att.partition(x, p, kind)
  assert g.shape == (3 * (h // p) ** 2, p * p, 5)
  np.testing.assert_array_equal(att.unpartition(g, p, h, h, kind), x)


def _coords(h):
  # Each position's value is its (row, col), so a group's tokens reveal where they came from.
  r, c = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
  return jnp.asarray(np.stack([r, c], -1)[None].astype(np.float32))  # [1, H, W, 2]


def test_grid_group_tokens_are_h_over_p_apart():
  h, p = 12, 3
  groups = np.asarray(att.grid_partition(_coords(h), p))  # [(H/P)², P², 2]
  stride = h // p
  for grp in groups:
    rc = grp.reshape(p, p, 2)
    np.testing.assert_array_equal(np.diff(rc[:, :, 0], axis=0), stride)
    np.testing.assert_array_equal(np.diff(rc[:, :, 1], axis=1), stride)
    np.testing.assert_array_equal(np.diff(rc[:, :, 0], axis=1), 0)
  # Together the groups cover every position exactly once.
  assert len({tuple(v) for v in groups.reshape(-1, 2).tolist()}) == h * h


def test_block_group_tokens_are_adjacent():
  h, p = 12, 3
  groups = np.asarray(att.block_partition(_coords(h), p))
  for grp in groups:
    rc = grp.reshape(p, p, 2)
    np.testing.assert_array_equal(np.diff(rc[:, :, 0], axis=0), 1)
    np.testing.assert_array_equal(np.diff(rc[:, :, 1], axis=1), 1)
    assert rc[0, 0, 0] % p == 0 and rc[0, 0, 1] % p == 0


def test_partition_size_small_maps_and_errors():
  assert att.partition_size(7, 14, 14) == 7
  assert att.partition_size(7, 4, 4) == 4  # smaller map: global over the stage
  assert att.partition_size(7, 1, 1) == 1
  with pytest.raises(ValueError, match="does not divide"):
    att.partition_size(7, 8, 8)


def test_relative_position_index_matches_offsets():
  p = 3
  idx = att.relative_position_index(p)
  assert idx.shape == (9, 9)
  # Token 0 is (0,0), token 8 is (2,2): Δ = (-2,-2) -> table cell (0, 0).
  assert idx[0, 8] == 0
  assert idx[8, 0] == (2 * p - 1) ** 2 - 1
  assert np.all(np.diag(idx) == (p - 1) * (2 * p - 1) + (p - 1))  # Δ = 0: the centre cell


def test_rel_pos_bias_shape_and_init():
  mod = att.RelativePositionBias(heads=2, size=4)
  v = mod.init(jax.random.PRNGKey(0))
  assert v["params"]["table"].shape == (2, 7, 7)
  assert 0.01 < float(jnp.std(v["params"]["table"])) < 0.04
  assert mod.apply(v).shape == (2, 16, 16)


def test_attention_core_spike_driven_equals_formula():
  g, n, h, d = 2, 4, 2, 3
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  q = (jax.random.uniform(k1, (g, n, h, d)) > 0.5).astype(jnp.float32)
  k = (jax.random.uniform(k2, (g, n, h, d)) > 0.5).astype(jnp.float32)
  v = (jax.random.uniform(k3, (g, n, h, d)) > 0.5).astype(jnp.float32)
  bias = jax.random.normal(k1, (h, n, n))
  out = att.AttentionCore("sisa", 0.125).apply({}, q, k, v, bias)
  for gi in range(g):
    for hi in range(h):
      a = 0.125 * q[gi, :, hi] @ k[gi, :, hi].T + bias[hi]  # no softmax
      np.testing.assert_allclose(out[gi, :, hi], a @ v[gi, :, hi], rtol=1e-5, atol=1e-6)
  soft = att.AttentionCore("softmax", 0.125).apply({}, q, k, v, bias)
  a = jax.nn.softmax(q[0, :, 0] @ k[0, :, 0].T / np.sqrt(d) + bias[0], axis=-1)
  np.testing.assert_allclose(soft[0, :, 0], a @ v[0, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sisa", "bdsa", "softmax"])
def test_attention_unit_params_and_rel_pos_grad(kind):
  spk = spk_config("sl" if kind != "softmax" else "none", norm_init_scale=3.0)
  mod = att.Attention(kind, "grid", 2, head_dim=4, scale=0.125, spk=spk)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 4, 4, 8))  # [T, B, H, W, C]
  v = mod.init(jax.random.PRNGKey(1), x, train=False)
  p = v["params"]
  assert p["rel_pos"]["table"].shape == (2, 3, 3)  # heads = 8/4, P = 2
  assert ("q" in p) == (kind != "bdsa")
  assert "bias" not in p.get("q", {}) and "bias" in p["proj"]
  assert float(p["layer_scale"]["gamma"][0]) == pytest.approx(1e-6)

  w = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(params):
    y, _ = mod.apply(
      {"params": params, "batch_stats": v.get("batch_stats", {})},
      x,
      train=True,
      mutable=["batch_stats", "spikes"],
    )
    return jnp.sum(y * w)  # not (y - x)²: the branch output can be exactly 0 at init

  g = jax.grad(loss)(p)
  assert float(jnp.abs(g["rel_pos"]["table"]).sum()) > 0  # google-research/maxvit issue #7
  assert float(jnp.abs(g["proj"]["bias"]).sum()) > 0
  if kind != "bdsa":
    assert float(jnp.abs(g["q"]["kernel"]).sum()) > 0


def test_ffn_structure():
  mod = att.FFN(spk_config("sl"))
  x = jnp.ones((1, 2, 3, 3, 8))
  p = mod.init(jax.random.PRNGKey(0), x, train=False)["params"]
  assert p["fc1"]["kernel"].shape == (8, 32) and "bias" not in p["fc1"]
  assert p["fc2"]["kernel"].shape == (32, 8) and "bias" in p["fc2"]


def test_drop_path_mask_shared_over_time():
  x = jnp.ones((3, 64, 2, 2, 4))
  y = common.DropPath(0.5).apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y[:, :, 0, 0, 0] > 0)  # [T, B]
  assert np.all(kept == kept[:1])  # the same samples dropped at every step
  assert 0 < kept[0].sum() < 64
  np.testing.assert_allclose(np.asarray(y)[:, kept[0]], 2.0)  # kept samples scaled by 1/(1-p)
  np.testing.assert_array_equal(common.DropPath(0.5).apply({}, x, train=False), x)


def test_fold_unfold_and_drop_path_rates():
  x = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
  np.testing.assert_array_equal(common.unfold(common.fold(x), 2), x)
  r = common.drop_path_rates(0.3, (1, 2, 1))
  assert r[0] == [0.0] and r[-1] == [pytest.approx(0.3)]
  assert r[1] == [pytest.approx(0.1), pytest.approx(0.2)]


def test_avg_pool_same_odd_map():
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  y = common.avg_pool_same(x)
  assert y.shape == (1, 2, 2, 1)
  # Padding is not counted: the corner window holds only x[2, 2] = 8.
  np.testing.assert_allclose(np.asarray(y)[0, :, :, 0], [[2.0, 3.5], [6.5, 8.0]])


def _strided_lif_fusions(compiled) -> list[str]:
  """Fused computations that evaluate a LIF step (a threshold compare, or the surrogate's
  divide) through a transpose, i.e. in the grid partition's strided order."""
  return [
    name
    for name, _, body in hlo_utils.computations(compiled)
    if " transpose(" in body and (" compare(" in body or " divide(" in body)
  ]


def test_spk_outputs_are_computed_apart_from_the_partition_transposes(monkeypatch):
  # With the XLA:CPU table the q/k/v SPK outputs pass `common.materialize` before the grid
  # partition and the output SPK's input after the unpartition: each value, and in the backward
  # each cotangent, is computed once in its own layout instead of inside the transpose. Same
  # values and gradients either way. T=2, so the LIF backward is the concatenation of two steps.
  from spikeatconv_jax.layers import ops
  from spikeatconv_jax.xla_cpu import native

  if not native.available():
    pytest.skip(f"needs the native CPU library: {native.unavailable_reason()}")
  spk = spk_config("mbpl")
  mod = att.Attention("sisa", "grid", 2, head_dim=4, scale=0.125, spk=spk)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 4, 4, 8)) * 2
  v = mod.init(jax.random.PRNGKey(1), x, train=False)

  def compiled():
    def loss(params, x):
      y, _ = mod.apply(
        {"params": params, "batch_stats": v["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats", "spikes"],
      )
      return jnp.sum(y * x)

    with ops.use("xla_cpu"):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(v["params"], x).compile()

  with_barrier = compiled()
  monkeypatch.setattr(common, "materialize", lambda z: z)
  without = compiled()
  n_barriers = lambda c: c.as_text().count('custom_call_target="spikeatconv_dwconv_barrier"')
  assert n_barriers(with_barrier) == n_barriers(without) + 8  # q, k, v, o; value and cotangent
  assert _strided_lif_fusions(with_barrier) == []
  assert len(_strided_lif_fusions(without)) >= 4  # the check can fail
  for a, b in zip(
    jax.tree_util.tree_leaves(with_barrier(v["params"], x)),
    jax.tree_util.tree_leaves(without(v["params"], x)),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
