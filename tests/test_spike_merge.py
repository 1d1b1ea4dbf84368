"""The portable table's MBPL merge (dwconv.spike_merge_conv_int8) against the plain lax grouped
conv: values and gradients in float32 and bfloat16, both forward forms; int8 residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.layers import dwconv


def _branches(dtype, k=4, shape=(2, 9, 9, 6), counts=False):
  keys = jax.random.split(jax.random.PRNGKey(0), k)
  if counts:  # spike counts (time_mode='neuron'): integers beyond {0, 1}
    xs = [jax.random.randint(kk, shape, 0, 5).astype(dtype) for kk in keys]
  else:
    xs = [jax.random.bernoulli(kk, 0.3, shape).astype(dtype) for kk in keys]
  kernel = jax.random.normal(jax.random.PRNGKey(1), (7, 7, k, shape[-1])) * 0.1
  return xs, kernel.astype(dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize(
  "form,counts", [("depthwise", False), ("depthwise", True), ("grouped", False)]
)
def test_merge_matches_lax_grouped_conv(form, dtype, tol, counts):
  xs, kernel = _branches(dtype, counts=counts)
  r = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 9, 6))

  def loss(f):
    return lambda xs, k: jnp.sum(f(xs, k).astype(jnp.float32) * r)

  def ours(xs, k):
    return dwconv.spike_merge_conv_int8(xs, k, (1, 1), form)

  want, g_want = jax.value_and_grad(loss(dwconv.branch_sum_conv2d_lax), argnums=(0, 1))(
    [x.astype(jnp.float32) for x in xs], kernel.astype(jnp.float32)
  )
  got, g_got = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1)))(xs, kernel)
  assert ours(xs, kernel).dtype == dtype
  np.testing.assert_allclose(float(got), float(want), rtol=tol, atol=tol * 10)
  for a, b in zip(jax.tree_util.tree_leaves(g_want), jax.tree_util.tree_leaves(g_got), strict=True):
    assert b.dtype == dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol * float(np.max(np.abs(a))))


def test_merge_keeps_branches_as_int8():
  xs, kernel = _branches(jnp.bfloat16, shape=(2, 16, 16, 8))
  _, vjp = jax.vjp(lambda xs, k: dwconv.spike_merge_conv_int8(xs, k), xs, kernel)
  kept = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "dtype")]
  maps = [leaf for leaf in kept if leaf.size >= xs[0].size]
  assert [(m.dtype, m.shape) for m in maps] == [(jnp.int8, (2, 16, 16, 8, 4))]


def test_merge_rejects_unknown_form():
  xs, kernel = _branches(jnp.float32)
  with pytest.raises(ValueError, match="unknown merge form"):
    dwconv.spike_merge_conv_int8(xs, kernel, (1, 1), "taps")


def _mbpl_vjp(kernels, x):
  """(output, gradients, vjp residual maps) of an MBPL SPK under table `kernels`."""
  from spikeatconv_jax.layers import ops
  from spikeatconv_jax.snn.spk import SPK

  spk = SPK(kind="mbpl", dtype=x.dtype)
  with ops.use(kernels):
    params = spk.init(jax.random.PRNGKey(0), x)["params"]
  # A visible γ, so the merge's gradients are not scaled down to nothing by its 1e-6 init.
  params = dict(params, merge_gamma=jnp.full_like(params["merge_gamma"], 0.5))
  r = jax.random.normal(jax.random.PRNGKey(3), x.shape)

  def loss(x, p):
    with ops.use(kernels):
      y, _ = spk.apply({"params": p}, x, mutable=["spikes"])
    return jnp.sum(y.astype(jnp.float32) * r)

  value, vjp = jax.vjp(loss, x, params)
  maps = [a for a in jax.tree_util.tree_leaves(vjp) if hasattr(a, "size") and a.size >= x.size]
  return value, vjp(jnp.ones_like(value)), maps


def test_portable_mbpl_recomputes_its_spikes_for_the_merge_backward():
  """The portable table's `recompute_spikes`: the same values and gradients as keeping the
  spikes, and no stacked int8 spikes among what the forward keeps for the backward."""
  import dataclasses

  from spikeatconv_jax.layers import ops

  keep = dataclasses.replace(ops.get("xla"), name="keep", recompute_spikes=lambda fn: fn)
  ops.register("xla_keep_spikes", lambda: keep)
  x = 1.5 * jax.random.normal(jax.random.PRNGKey(4), (1, 2, 9, 9, 8), jnp.float32) + 0.5
  v_keep, g_keep, kept = _mbpl_vjp("xla_keep_spikes", x)
  v_re, g_re, recomputed = _mbpl_vjp("xla", x)
  np.testing.assert_allclose(float(v_re), float(v_keep), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_keep), jax.tree_util.tree_leaves(g_re), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  assert any(np.max(np.abs(np.asarray(g))) > 0 for g in jax.tree_util.tree_leaves(g_re))
  assert [m.dtype for m in kept if m.dtype == jnp.int8] == [jnp.int8]
  assert all(m.dtype != jnp.int8 for m in recomputed)
  assert sum(m.nbytes for m in recomputed) < sum(m.nbytes for m in kept)


def test_no_second_recomputation_inside_a_rematerialised_block():
  """Under `model.remat` the block's own recomputation covers the spikes: the SPK adds none."""
  from spikeatconv_jax.layers import remat as remat_lib

  x = 1.5 * jax.random.normal(jax.random.PRNGKey(4), (1, 2, 9, 9, 8), jnp.float32) + 0.5
  with remat_lib.rematerialised():
    assert remat_lib.inside_rematerialised()
    _, _, maps = _mbpl_vjp("xla", x)
  assert not remat_lib.inside_rematerialised()
  assert [m.dtype for m in maps if m.dtype == jnp.int8] == [jnp.int8]
