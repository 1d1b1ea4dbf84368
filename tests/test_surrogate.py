"""Tests for the spike function and its surrogate gradients (DESIGN.md §2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.snn import SURROGATES, get_surrogate, spike, surrogate_grad

ALL = sorted(SURROGATES)
POINTS = np.array([-3.0, -1.0, -0.4, -0.1, 0.0, 0.05, 0.3, 0.49, 0.7, 1.0, 2.5], np.float64)


def _sig(z):
  return 1.0 / (1.0 + np.exp(-z))


# Closed forms, written out independently of the module, in float64.
FORMULAS = {
  "atan": lambda u, a: a / (2.0 * (1.0 + (math.pi * a * u / 2.0) ** 2)),
  "sigmoid": lambda u, a: a * _sig(a * u) * (1.0 - _sig(a * u)),
  "triangle": lambda u, a: a * np.maximum(0.0, 1.0 - a * np.abs(u)),
  "rectangular": lambda u, a: np.where(np.abs(u) < 0.5 / a, a, 0.0),
  "fast_sigmoid": lambda u, a: 1.0 / (1.0 + a * np.abs(u)) ** 2,
}


def _grad(u, name, alpha=None):
  return jax.grad(lambda v: jnp.sum(spike(v, name, alpha)))(u)


def test_registry_has_the_required_surrogates():
  assert {"atan", "sigmoid"} <= set(SURROGATES)
  assert len(SURROGATES) >= 4
  assert set(FORMULAS) == set(SURROGATES), "add the closed form of every registered surrogate"
  assert get_surrogate("atan").default_alpha == 2.0
  assert get_surrogate("sigmoid").default_alpha == 4.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_gradient_matches_closed_form(name, alpha):
  a = get_surrogate(name).default_alpha if alpha is None else alpha
  # Keep away from the rectangular window's edge, where float32 rounding decides the side.
  u = POINTS[np.abs(np.abs(POINTS) - 0.5 / a) > 1e-3]
  g = _grad(jnp.asarray(u, jnp.float32), name, alpha)
  np.testing.assert_allclose(np.asarray(g), FORMULAS[name](u, a), rtol=2e-6, atol=1e-7)
  # The standalone helper agrees with the gradient through `spike`.
  np.testing.assert_allclose(
    np.asarray(surrogate_grad(jnp.asarray(u, jnp.float32), name, alpha)), np.asarray(g), rtol=1e-7
  )


def test_spec_values_of_the_default_surrogates():
  # DESIGN.md §2: both defaults peak at 1 at u=0; at u=1 ATan gives 0.0920, Sigmoid 0.0707.
  u = jnp.array([0.0, 1.0])
  np.testing.assert_allclose(np.asarray(_grad(u, "atan")), [1.0, 0.0920], atol=5e-5)
  np.testing.assert_allclose(np.asarray(_grad(u, "sigmoid")), [1.0, 0.0707], atol=5e-5)


def test_gradient_scales_the_cotangent():
  u = jnp.array([0.0, 0.3, -0.6])
  g = jnp.array([2.0, -1.5, 0.25])
  _, vjp = jax.vjp(lambda v: spike(v, "atan"), u)
  np.testing.assert_allclose(
    np.asarray(vjp(g)[0]),
    np.asarray(g) * FORMULAS["atan"](np.asarray(u, np.float64), 2.0),
    rtol=1e-6,
  )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_finite_at_zero_and_large_inputs(name, dtype):
  big = float(jnp.finfo(dtype).max)
  u = jnp.array([0.0, 1e4, -1e4, 1e30, -1e30, big, -big], dtype)
  g = _grad(u, name)
  assert g.dtype == dtype
  g32 = np.asarray(g.astype(jnp.float32))
  assert np.all(np.isfinite(g32)), (name, dtype, g32)
  assert g32[0] > 0.0, f"{name}: gradient at u=0 must be positive, got {g32[0]}"
  assert np.all(g32 >= 0.0)
  # Far from the threshold every surrogate has (numerically) vanished.
  assert np.all(g32[1:] < 1e-3), g32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_is_heaviside_firing_at_zero(dtype):
  tiny = float(jnp.finfo(dtype).tiny)
  u = jnp.array([-5.0, -1.0, -tiny, -0.0, 0.0, tiny, 1.0, 5.0], dtype)
  for name in ALL:
    s = spike(u, name)
    assert s.dtype == dtype and s.shape == u.shape
    np.testing.assert_array_equal(np.asarray(s.astype(jnp.float32)), [0, 0, 0, 1, 1, 1, 1, 1])


def test_output_dtype_follows_input_under_jit():
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.zeros((3, 4), dtype)
    assert jax.jit(spike)(x).dtype == dtype


def test_unknown_surrogate_lists_known_ones():
  with pytest.raises(ValueError, match="unknown surrogate 'erf'") as e:
    spike(jnp.zeros(3), "erf")
  for name in ALL:
    assert name in str(e.value)
  with pytest.raises(ValueError, match="known surrogates"):
    get_surrogate("")
