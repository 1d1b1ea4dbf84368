"""MBPL's T = 1 output as Pallas TPU kernels (`pallas_tpu.merge_norm`), run by Pallas'
interpreter on the host: the SPK block gives the same values, rates, parameters and gradients
as under the portable table, per device under a mesh, and composes the parts where a map does
not fit. (`tests/test_compile_tpu.py` lowers the kernels through Mosaic.)"""

import dataclasses
import functools

import hlo_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.common import spk_config
from spikeatconv_jax.layers import ops
from spikeatconv_jax.pallas_tpu import merge, merge_norm
from spikeatconv_jax.snn import lif as lif_lib
from spikeatconv_jax.snn.spk import make_spk

INTERPRET = "pallas_tpu_interpret"


def _interpreted():
  table = ops.get("pallas_tpu")
  run = dict(interpret=True)
  return dataclasses.replace(
    table,
    name=INTERPRET,
    lif_merge_norm=functools.partial(merge_norm.lif_merge_norm, **run),
    lif_spike_merge=functools.partial(merge.lif_spike_merge, **run),
    spike_merge_conv=functools.partial(merge.spike_merge_conv, **run),
  )


ops.register(INTERPRET, _interpreted)


def _case(shape, dtype=jnp.float32, seed=0, **spk):
  mod = make_spk(spk_config("mbpl", **spk), dtype=dtype, name="spk")
  kx, kg, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = (2.0 * jax.random.normal(kx, shape)).astype(dtype)
  g = jax.random.normal(kg, shape).astype(dtype)
  with ops.use("xla"):
    v = mod.init(kp, x, train=True)
  # Away from the initial values (γ = 1e-6 would hide the LayerNorm's share of everything).
  leaves, tree = jax.tree.flatten(v["params"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  params = tree.unflatten([a + 0.5 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  return mod, params, x, g


def _run(table, mod, params, x, g):
  def loss(p, x):
    with ops.use(table):
      y, mut = mod.apply({"params": p}, x, train=True, mutable=["spikes"])
    return jnp.vdot(y.astype(jnp.float32), g.astype(jnp.float32)), (y, mut["spikes"])

  (_, (y, rates)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  return y, rates, grads


def _check(mod, params, x, g, rtol=1e-5, atol=1e-4, jaxpr_has="lif_merge_norm_fwd"):
  want = _run("xla", mod, params, x, g)
  got = _run(INTERPRET, mod, params, x, g)
  jaxpr = str(jax.make_jaxpr(functools.partial(_run, INTERPRET, mod))(params, x, g))
  assert jaxpr_has in jaxpr
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, np.abs(b).max()))
  return jaxpr


@pytest.mark.parametrize(
  "shape,spk",
  [
    ((1, 2, 8, 8, 16), {}),
    ((1, 1, 6, 5, 8), dict(thresholds=(0.5, 1.5), decay_input=False, surrogate="sigmoid")),
    ((1, 1, 7, 7, 256), dict(thresholds=(-0.5, 1.0), v_reset=None, tau=3.0)),
    ((1, 1, 6, 5, 2048), dict(thresholds=(0.5, 1.5))),  # 3 of 6 rows per inner step
  ],
  ids=["mbpl_default", "odd_map_sigmoid", "wide_soft_reset_negative_threshold", "very_wide"],
)
def test_block_matches_the_composed_spk(shape, spk):
  jaxpr = _check(*_case(shape, **spk))
  assert "lif_merge_norm_bwd" in jaxpr  # the gradients came from the backward kernel


def test_block_in_bfloat16_matches_the_composed_spk():
  # The same roundings as the composed block (Z, Z + shift and the LayerNorm in bf16); what
  # differs is where float32 sums are rounded.
  jaxpr = _check(*_case((1, 2, 8, 8, 128), jnp.bfloat16, seed=3), rtol=2e-2, atol=2e-2)
  assert "lif_merge_norm_bwd" in jaxpr


def test_init_makes_the_composed_parameters():
  mod, _, x, _ = _case((1, 2, 8, 8, 16))
  key = jax.random.PRNGKey(7)
  inits = []
  for table in ("xla", INTERPRET):
    with ops.use(table):
      inits.append(mod.init(key, x, train=True)["params"])
  assert jax.tree.structure(inits[0]) == jax.tree.structure(inits[1])
  for a, b in zip(jax.tree.leaves(inits[0]), jax.tree.leaves(inits[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_maps_that_do_not_fit_whole_get_the_parts_composed(monkeypatch):
  mod, params, x, g = _case((1, 1, 16, 8, 8), thresholds=(-0.5, 1.0))
  budget = merge_norm.vmem_estimate(16, 8, 8, 7, 4) - 1
  monkeypatch.setattr(merge, "VMEM_BUDGET", budget)
  assert "VMEM" in merge_norm.plan((1, 16, 8, 8), (7, 7, 2, 8), (1, 1), jnp.float32)
  assert not isinstance(merge.plan((1, 16, 8, 8), (7, 7, 2, 8), (1, 1), jnp.float32, lif=True), str)
  jaxpr = _check(mod, params, x, g, jaxpr_has="lif_merge_fwd")
  assert "lif_merge_norm_fwd" not in jaxpr


def test_runs_on_each_devices_images_under_a_mesh():
  mesh = jax.make_mesh((4,), ("data",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  mod, params, x, g = _case((1, 8, 6, 6, 8), seed=5)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "data")))  # noqa: E731
  x, g = put(x), put(g)
  fn = jax.jit(functools.partial(_run, INTERPRET, mod))
  with jax.set_mesh(mesh):
    got = fn(params, x, g)
    jaxpr = str(jax.make_jaxpr(fn)(params, x, g))
  assert "shard_map" in jaxpr and "lif_merge_norm_bwd" in jaxpr
  want = _run("xla", mod, params, x, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_plans_and_checks():
  bf16 = jnp.bfloat16
  # Every MBPL site of tiny, Base and Large at 224 pixels but the stem's takes the kernels.
  for h, c in [(56, 64), (56, 96), (56, 128), (28, 256), (14, 384), (7, 1024)]:
    assert merge_norm.plan((8, h, h, c), (7, 7, 4, c), (1, 1), bf16) == merge.Plan(h, False)
  assert "VMEM" in merge_norm.plan((8, 112, 112, 64), (7, 7, 4, 64), (1, 1), bf16)
  assert "stride" in merge_norm.plan((8, 8, 8, 16), (7, 7, 4, 16), (2, 2), bf16)
  assert merge_norm._rows(6, 5, 2048) == 3 and merge_norm._rows(56, 56, 64) == 8
  lif = lif_lib.make_params(v_threshold=(0.2, 1.0))
  x = jnp.zeros((1, 8, 8, 16))
  with pytest.raises(ValueError, match="2 thresholds"):
    merge_norm.lif_merge_norm(x, jnp.zeros((7, 7, 3, 16)), *[jnp.zeros(16)] * 3, lif, 1e-6)


def test_each_kernel_is_traced_once_per_shape():
  """Two sites of one shape share one traced forward and one backward kernel caller (the
  train step's compile time grows with each traced kernel); a third shape gets its own."""
  lif = lif_lib.LIFParams(2.0, (0.5, 1.0, 1.5, 2.0), 0.0, True, True, "atan", 2.0)
  c = 8
  kernel = jnp.full((7, 7, 4, c), 0.01)
  vec = jnp.ones((c,))

  def site(x):
    y, _ = merge_norm.lif_merge_norm(x, kernel, vec, vec, vec, lif, 1e-6, interpret=True)
    return jnp.sum(y.astype(jnp.float32))

  def two_sites_and_another(a, b, d):
    return site(a) + site(b) + site(d)

  x = jnp.ones((2, 8, 8, c))
  d = jnp.ones((2, 16, 8, c))
  jaxpr = jax.make_jaxpr(jax.grad(two_sites_and_another, (0, 1, 2)))(x, x, d)

  callers = {}
  for eqn in hlo_utils.equations(jaxpr):
    name = eqn.params.get("name") if eqn.primitive.name in ("pjit", "jit") else None
    if name in ("_forward_call", "_backward_call"):
      callers.setdefault(name, []).append(eqn.params["jaxpr"])
  assert sorted(callers) == ["_backward_call", "_forward_call"]
  for name, traced in callers.items():
    assert len(traced) == 3, name
    assert len({id(j) for j in traced}) == 2, name  # two shapes, each traced once
