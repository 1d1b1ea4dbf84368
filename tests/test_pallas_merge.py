"""The Pallas TPU merge conv (`pallas_tpu.merge`), run by Pallas' interpreter on the host: the
same values and gradients as the portable table's merge, per device under a mesh, and the
table's name resolution. (`tests/test_compile_tpu.py` lowers the kernels through Mosaic.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.common import model_config
from spikeatconv_jax import models
from spikeatconv_jax.layers import dwconv, ops
from spikeatconv_jax.pallas_tpu import merge
from spikeatconv_jax.snn import lif as lif_lib


def _inputs(n, h, w, c, k, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), k + 2)
  # Spike counts in {0, 1, 2}: integer-valued, as the hook's contract allows.
  xs = [jax.random.randint(keys[i], (n, h, w, c), 0, 3).astype(jnp.float32) for i in range(k)]
  kernel = jax.random.normal(keys[k], (7, 7, k, c))
  g = jax.random.normal(keys[k + 1], (n, h, w, c))
  return xs, kernel, g


def _value_and_grads(fn, xs, kernel, g):
  return jax.value_and_grad(lambda xs, k: jnp.vdot(fn(xs, k), g), (0, 1))(xs, kernel)


def _pallas(xs, k):
  return merge.spike_merge_conv(xs, k, interpret=True)


@pytest.mark.parametrize(
  "shape",
  [(2, 8, 8, 16, 4), (1, 7, 7, 256, 2), (2, 6, 5, 8, 3)],
  ids=["k4", "two_channel_blocks", "odd_map"],
)
def test_values_and_gradients_match_the_portable_merge(shape):
  xs, kernel, g = _inputs(*shape)
  assert merge.plan(xs[0].shape, kernel.shape, (1, 1), jnp.float32) == merge.Plan(shape[1], False)
  _check_against_portable(xs, kernel, g)


def test_large_maps_go_in_row_bands(monkeypatch):
  """A map over the VMEM budget is split into bands of rows, read as overlapping windows of the
  zero-padded input: same values and gradients (a small budget makes a small map banded)."""
  xs, kernel, g = _inputs(2, 12, 9, 8, 2, seed=2)
  whole = merge.vmem_estimate(12, 9, 8, 7, 4, banded=False)
  monkeypatch.setattr(merge, "VMEM_BUDGET", whole - 1)
  got = merge.plan(xs[0].shape, kernel.shape, (1, 1), jnp.float32)
  assert got.banded and got.band < 12 and 12 % got.band == 0, got
  monkeypatch.setattr(merge, "VMEM_BUDGET", merge.vmem_estimate(3, 9, 8, 7, 4, banded=True))
  assert merge.plan(xs[0].shape, kernel.shape, (1, 1), jnp.float32) == merge.Plan(3, True)
  _check_against_portable(xs, kernel, g)


def _check_against_portable(xs, kernel, g):
  y = _pallas(xs, kernel)
  np.testing.assert_allclose(y, dwconv.spike_merge_conv_int8(xs, kernel), rtol=1e-5, atol=1e-4)
  got = _value_and_grads(_pallas, xs, kernel, g)
  want = _value_and_grads(dwconv.spike_merge_conv_int8, xs, kernel, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_runs_on_each_devices_images_under_a_mesh():
  mesh = jax.make_mesh((4,), ("data",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  xs, kernel, g = _inputs(8, 6, 6, 8, 3, seed=1)
  xs = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
  fn = jax.jit(lambda xs, k: _value_and_grads(_pallas, xs, k, g))
  with jax.set_mesh(mesh):
    got = fn(xs, kernel)
    jaxpr = str(jax.make_jaxpr(fn)(xs, kernel))
  assert "shard_map" in jaxpr  # the kernels see one device's images
  want = _value_and_grads(dwconv.spike_merge_conv_int8, xs, kernel, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_unsupported_shapes_say_why_and_take_the_portable_form():
  assert "stride" in merge.plan((2, 8, 8, 16), (7, 7, 4, 16), (2, 2), jnp.bfloat16)
  assert "kernel 7x5" in merge.plan((2, 8, 8, 16), (7, 5, 4, 16), (1, 1), jnp.bfloat16)
  assert "VMEM" in merge.plan((8, 64, 8192, 64), (7, 7, 4, 64), (1, 1), jnp.bfloat16)
  # tiny at 224 pixels: stage 0 whole, the stem's 112x112 map in bands.
  assert merge.plan((8, 56, 56, 64), (7, 7, 4, 64), (1, 1), jnp.bfloat16) == merge.Plan(56, False)
  assert merge.plan((8, 112, 112, 64), (7, 7, 4, 64), (1, 1), jnp.bfloat16).banded
  xs, kernel, _ = _inputs(2, 8, 8, 16, 2)
  jaxpr = str(jax.make_jaxpr(lambda xs, k: merge.spike_merge_conv(xs, k, (2, 2)))(xs, kernel))
  assert "pallas_call" not in jaxpr and "conv_general_dilated" in jaxpr
  np.testing.assert_allclose(
    merge.spike_merge_conv(xs, kernel, (2, 2)),
    dwconv.spike_merge_conv_int8(xs, kernel, (2, 2)),
  )


def test_tpu_targets_resolve_to_the_pallas_table():
  assert ops.resolve("auto", "tpu") == "pallas_tpu"
  assert ops.resolve("auto", "gpu") == "xla" and ops.resolve("auto", "cpu") == "xla_cpu"
  table = ops.get("pallas_tpu")
  assert table.spike_merge_conv is merge.spike_merge_conv
  assert table.layer_norm is ops.get("xla").layer_norm  # the rest is the portable table
  with pytest.raises(ValueError, match="runs on tpu, not cpu"):
    ops.resolve("pallas_tpu", "cpu")
  cfg = model_config(variant="nano")
  cfg.kernels = "pallas_tpu"
  with pytest.raises(ValueError, match="runs on tpu"):
    models.build(cfg, platform="cpu")


def _lif_case(n, h, w, c, k, seed=0):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = 3.0 * jax.random.normal(kx, (n, h, w, c))
  kernel = jax.random.normal(kk, (7, 7, k, c))
  g = jax.random.normal(kg, (n, h, w, c))
  return x, kernel, g


def _composed(lif):
  def f(x, kernel):
    spikes = lif_lib.lif_multithreshold(x[None], **lif._asdict())
    return dwconv.spike_merge_conv_int8([s[0] for s in spikes], kernel)

  return f


def _check_fused(lif, x, kernel, g):
  fused = lambda x, k: merge.lif_spike_merge(x, k, (1, 1), lif, interpret=True)  # noqa: E731
  want = _value_and_grads(_composed(lif), x, kernel, g)
  got = _value_and_grads(fused, x, kernel, g)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
  for a, b in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "shape,lif_kw",
  [
    ((2, 8, 8, 16), dict(v_threshold=(0.2, 1.0, 2.0, 4.0))),
    ((1, 6, 5, 8), dict(v_threshold=(0.5, 1.5), decay_input=False, surrogate="sigmoid")),
    ((1, 7, 7, 256), dict(v_threshold=(-0.5, 1.0), v_reset=None, tau=3.0)),
  ],
  ids=["mbpl_default", "odd_map_sigmoid", "two_channel_blocks_soft_reset"],
)
def test_fused_lif_merge_matches_the_lif_and_the_merge(shape, lif_kw):
  lif = lif_lib.make_params(**lif_kw)
  x, kernel, g = _lif_case(*shape, len(lif.v_thresholds))
  _check_fused(lif, x, kernel, g)


def test_fused_lif_merge_in_row_bands_never_fires_in_the_padding(monkeypatch):
  # A negative threshold fires on a zero input: the band windows' padding must not.
  lif = lif_lib.make_params(v_threshold=(-0.5, 1.0))
  x, kernel, g = _lif_case(1, 16, 8, 8, 2)
  monkeypatch.setattr(merge, "VMEM_BUDGET", merge.vmem_estimate(4, 8, 8, 7, 4, True, lif=True))
  assert merge.plan(x.shape, kernel.shape, (1, 1), jnp.float32, lif=True) == merge.Plan(4, True)
  _check_fused(lif, x, kernel, g)


def test_fused_lif_merge_falls_back_where_no_plan():
  lif = lif_lib.make_params(v_threshold=(0.2, 1.0))
  x, kernel, g = _lif_case(1, 6, 6, 8, 2)
  got = merge.lif_spike_merge(x, kernel, (2, 2), lif, interpret=True)
  want = dwconv.spike_merge_conv_int8(
    [s[0] for s in lif_lib.lif_multithreshold(x[None], **lif._asdict())], kernel, (2, 2)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="thresholds"):
    merge.lif_spike_merge(x, kernel[:, :, :1], (1, 1), lif)
