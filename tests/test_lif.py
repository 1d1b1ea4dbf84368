"""Tests for the multi-step LIF neuron (DESIGN.md §2)."""

import itertools

import hlo_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.snn import (
  SURROGATES,
  lif_multistep,
  lif_multistep_reference,
  lif_multithreshold,
)
from spikeatconv_jax.snn import lif as lif_mod

X_SPEC = jnp.array([2.5, 0.5, 3.0], jnp.float32)

# DESIGN.md §2 test vectors (tau=2, V_th=1, X = 2.5, 0.5, 3.0): (kwargs, H, S, V).
SPEC_VECTORS = {
  "hard": (dict(), [1.25, 0.25, 1.625], [1, 0, 1], [0, 0.25, 0]),
  "soft": (dict(v_reset=None), [1.25, 0.375, 1.6875], [1, 0, 1], [0.25, 0.375, 0.6875]),
  "no_decay_input": (dict(decay_input=False), [2.5, 0.5, 3.25], [1, 0, 1], [0, 0.5, 0]),
}


@pytest.mark.parametrize("variant", sorted(SPEC_VECTORS))
def test_design_test_vectors(variant):
  kw, h, s, v = SPEC_VECTORS[variant]
  np.testing.assert_array_equal(np.asarray(lif_multistep(X_SPEC, **kw)), s)
  s_ref, h_ref, v_ref = lif_multistep_reference(X_SPEC, **kw)
  np.testing.assert_array_equal(np.asarray(s_ref), s)
  np.testing.assert_array_equal(np.asarray(h_ref), h)
  np.testing.assert_array_equal(np.asarray(v_ref), v)
  # A trailing neuron axis changes nothing: [T] -> [T, 1, 1].
  np.testing.assert_array_equal(np.asarray(lif_multistep(X_SPEC[:, None, None], **kw))[:, 0, 0], s)


def _inputs(t, n=96, seed=0):
  kx, kg = jax.random.split(jax.random.key(seed))
  # Mean 1, std 1.5: many neurons sit near the threshold, so the surrogate terms matter.
  x = 1.0 + 1.5 * jax.random.normal(kx, (t, n), jnp.float32)
  g = jax.random.normal(kg, (t, n), jnp.float32)
  return x, g


def _grads(x, g, **kw):
  """Input gradients of sum(g * S) through the custom_vjp and through the plain scan."""
  loss = lambda f: jax.grad(lambda x: jnp.sum(g * f(x)))
  gx = jax.jit(loss(lambda x: lif_multistep(x, **kw)))(x)
  gx_ref = jax.jit(loss(lambda x: lif_multistep_reference(x, **kw)[0]))(x)
  return np.asarray(gx), np.asarray(gx_ref)


def _assert_rel_close(a, b, rel=1e-6):
  scale = np.max(np.abs(b))
  assert scale > 0, "reference gradient is all zero: the test would not see a difference"
  np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize(
  "v_reset,decay_input,detach_reset,t",
  list(itertools.product([0.0, None], [True, False], [True, False], [1, 2, 4])),
)
def test_custom_vjp_matches_autodiff_through_scan(v_reset, decay_input, detach_reset, t):
  x, g = _inputs(t)
  kw = dict(v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset)
  np.testing.assert_array_equal(
    np.asarray(lif_multistep(x, **kw)), np.asarray(lif_multistep_reference(x, **kw)[0])
  )
  gx, gx_ref = _grads(x, g, **kw)
  _assert_rel_close(gx, gx_ref)


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_custom_vjp_matches_autodiff_every_surrogate(surrogate):
  x, g = _inputs(3, seed=1)
  kw = dict(surrogate=surrogate, detach_reset=False, tau=3.0, v_threshold=0.7, v_reset=-0.2)
  gx, gx_ref = _grads(x, g, **kw)
  _assert_rel_close(gx, gx_ref)


def test_rolled_scan_beyond_unroll_limit():
  # T > 8 takes the rolled scan; forward and gradient must not change.
  x, g = _inputs(11, n=32, seed=2)
  kw = dict(detach_reset=False)
  np.testing.assert_array_equal(
    np.asarray(lif_multistep(x, **kw)), np.asarray(lif_multistep_reference(x, **kw)[0])
  )
  gx, gx_ref = _grads(x, g, **kw)
  _assert_rel_close(gx, gx_ref)


@pytest.mark.parametrize("t", [4, 11])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residuals_are_the_input_or_the_pre_spike_potentials(t, dtype):
  # Up to MAX_UNROLL steps the only residual is the input itself (the backward recomputes H
  # from it); beyond it the rolled scan's stacked float32 H ([T, ...]). Nothing else is kept.
  x, _ = _inputs(t, n=24)
  x = x.astype(dtype)
  _, vjp = jax.vjp(lambda x: lif_multistep(x, detach_reset=False), x)
  res = jax.tree_util.tree_leaves(vjp)
  if t <= lif_mod.MAX_UNROLL:
    assert [(r.shape, r.dtype) for r in res] == [(x.shape, x.dtype)]
    np.testing.assert_array_equal(np.asarray(res[0]), np.asarray(x))
  else:
    _, h_ref, _ = lif_multistep_reference(x, detach_reset=False)
    assert [(r.shape, r.dtype) for r in res] == [(x.shape, jnp.float32)]
    np.testing.assert_array_equal(np.asarray(res[0]), np.asarray(h_ref))
  # Sanity check of the method: plain autodiff through the scan does keep more.
  _, vjp_ref = jax.vjp(lambda x: lif_multistep_reference(x, detach_reset=False)[0], x)
  assert sum(r.size for r in jax.tree_util.tree_leaves(vjp_ref)) > x.size


def _scans(fn, *args) -> list[dict]:
  """The params of every scan in the jaxpr of fn(*args), nested jaxprs included."""
  eqns = hlo_utils.equations(jax.make_jaxpr(fn)(*args))
  return [eqn.params for eqn in eqns if eqn.primitive.name == "scan"]


@pytest.mark.parametrize("t", [1, 2, 4, 16])
def test_forward_and_backward_are_scans_over_time(t):
  # The membrane dynamics are a lax.scan over T, fully unrolled up to MAX_UNROLL steps and
  # rolled beyond; the backward is a reverse scan. Unrolled, the backward recomputes H with a
  # second forward scan (the residual is x) and runs the last step, which takes in no dL/dV,
  # before a reverse scan over the other T - 1 steps (none at T=1).
  x, g = _inputs(t, n=8)
  unrolled = t <= lif_mod.MAX_UNROLL
  fwd = (t, False, t if unrolled else 1)
  assert [(s["length"], s["reverse"], s["unroll"]) for s in _scans(lif_multistep, x)] == [fwd]

  def fwd_bwd(x, g):
    s, vjp = jax.vjp(lif_multistep, x)
    return s, vjp(g)

  scans = sorted((s["length"], s["reverse"], s["unroll"]) for s in _scans(fwd_bwd, x, g))
  if not unrolled:
    assert scans == sorted([fwd, (t, True, 1)])
  elif t == 1:
    assert scans == [fwd, fwd]
  else:
    assert scans == sorted([fwd, fwd, (t - 1, True, t - 1)])


@pytest.mark.parametrize("t", [1, 2, 4, 9])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_values_and_grads_match_reference_on_both_sides_of_the_unroll_limit(t, v_reset):
  x, g = _inputs(t, n=64, seed=4)
  kw = dict(v_reset=v_reset, detach_reset=False, tau=1.5, v_threshold=0.8)
  np.testing.assert_array_equal(
    np.asarray(lif_multistep(x, **kw)), np.asarray(lif_multistep_reference(x, **kw)[0])
  )
  gx, gx_ref = _grads(x, g, **kw)
  _assert_rel_close(gx, gx_ref)


MBPL_THRESHOLDS = (0.25, 1.0, 2.0, 4.0)


@pytest.mark.parametrize(
  "v_reset,detach_reset,t", list(itertools.product([0.0, None], [True, False], [1, 3, 10]))
)
def test_multithreshold_is_k_separate_lifs(v_reset, detach_reset, t):
  # K neurons on one input: the same spikes as K lif_multistep calls, and the input gradient
  # of Σ_k <g_k, S_k> equal to the sum of the K separate gradients.
  x, _ = _inputs(t, seed=3)
  gs = [_inputs(t, seed=10 + k)[1] for k in range(len(MBPL_THRESHOLDS))]
  kw = dict(v_reset=v_reset, detach_reset=detach_reset, tau=2.0)
  ss = lif_multithreshold(x, v_thresholds=MBPL_THRESHOLDS, **kw)
  assert len(ss) == len(MBPL_THRESHOLDS)
  singles = [lif_multistep(x, v_threshold=th, **kw) for th in MBPL_THRESHOLDS]
  for s, s1 in zip(ss, singles, strict=True):
    assert s.dtype == x.dtype and s.shape == x.shape
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s1))
  # The thresholds give different spike trains (otherwise the sum check below is weak).
  assert len({np.asarray(s).tobytes() for s in ss}) == len(MBPL_THRESHOLDS)

  def loss_multi(x):
    return sum(
      jnp.sum(g * s)
      for g, s in zip(gs, lif_multithreshold(x, v_thresholds=MBPL_THRESHOLDS, **kw), strict=True)
    )

  def loss_singles(x):
    return sum(
      jnp.sum(g * lif_multistep_reference(x, v_threshold=th, **kw)[0])
      for g, th in zip(gs, MBPL_THRESHOLDS, strict=True)
    )

  gx = jax.jit(jax.grad(loss_multi))(x)
  gx_ref = jax.jit(jax.grad(loss_singles))(x)
  _assert_rel_close(np.asarray(gx), np.asarray(gx_ref))


@pytest.mark.parametrize("t", [1, 3])
def test_multithreshold_keeps_one_residual_for_all_neurons(t):
  # K neurons on one input keep one residual, the input, not K potentials per step (the
  # backward recomputes every neuron's H from it).
  x, _ = _inputs(t, n=24)
  _, vjp = jax.vjp(lambda x: lif_multithreshold(x, v_thresholds=MBPL_THRESHOLDS), x)
  res = jax.tree_util.tree_leaves(vjp)
  assert [(r.shape, r.dtype) for r in res] == [(x.shape, x.dtype)]


def _lif_bf16_membrane(x):
  """A LIF whose membrane is bfloat16: what lif_multistep must NOT compute."""
  v = jnp.zeros(x.shape[1:], jnp.bfloat16)
  out = []
  for xt in x:
    h = v + (xt - v) / jnp.bfloat16(2)
    s = (h >= 1).astype(jnp.bfloat16)
    v = (1 - s) * h
    out.append(s)
  return jnp.stack(out)


def test_bf16_input_keeps_float32_membrane():
  x32, g = _inputs(4, n=4096, seed=3)
  xb = x32.astype(jnp.bfloat16)
  s = lif_multistep(xb)
  assert s.dtype == jnp.bfloat16 and s.shape == xb.shape
  # Same spikes as the same values in float32: the membrane is float32.
  np.testing.assert_array_equal(
    np.asarray(s.astype(jnp.float32)), np.asarray(lif_multistep(xb.astype(jnp.float32)))
  )
  # A bf16 membrane rounds differently on these inputs, so the check above has teeth.
  assert np.any(np.asarray(_lif_bf16_membrane(xb) != s))
  gx = jax.grad(lambda x: jnp.sum(g.astype(x.dtype) * lif_multistep(x)).astype(jnp.float32))(xb)
  assert gx.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(gx.astype(jnp.float32))))
  _, gx32 = _grads(xb.astype(jnp.float32), g)
  np.testing.assert_allclose(np.asarray(gx.astype(jnp.float32)), gx32, rtol=2e-2, atol=1e-2)


def test_threshold_at_t1_is_tau_times_theta():
  # decay_input=True at T=1: a θ=1, τ=2 neuron fires exactly when x >= 2.
  x = jnp.array([[1.999, 2.0, 2.001]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(lif_multistep(x)), [[0, 1, 1]])
  np.testing.assert_array_equal(np.asarray(lif_multistep(x, tau=4.0, v_threshold=0.5)), [[0, 1, 1]])


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="tau must be > 1"):
    lif_multistep(X_SPEC, tau=1.0)
  with pytest.raises(ValueError, match=r"\[T, \.\.\.\]"):
    lif_multistep(jnp.float32(1.0))
  with pytest.raises(ValueError, match="unknown surrogate"):
    lif_multistep(X_SPEC, surrogate="nope")
  with pytest.raises(ValueError, match="at least one threshold"):
    lif_multithreshold(X_SPEC[:, None], v_thresholds=())
