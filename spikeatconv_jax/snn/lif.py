"""Multi-step LIF neuron over a leading time axis (SpikingJelly semantics, DESIGN.md §2).

  charge  decay_input=True : H_t = V_{t-1} + (X_t - (V_{t-1} - V_reset)) / tau
          decay_input=False: H_t = V_{t-1} - (V_{t-1} - V_reset) / tau + X_t
  fire    S_t = Θ(H_t - V_th)                  (fires at equality)
  reset   hard: V_t = S̃_t V_reset + (1 - S̃_t) H_t;  soft (v_reset=None): V_t = H_t - S̃_t V_th
  with S̃ = stop_gradient(S) when detach_reset, and V_0 = V_reset (0 for soft reset).

`lif_multistep` is one `jax.custom_vjp` over the whole scan. The forward keeps only the
pre-spike potentials H (float32, [T, ...]) as residuals; the backward is a reverse scan
that rebuilds every local derivative from H. Autodiff through a plain scan would also keep
V and S for every step. `lif_multistep_reference` is that plain scan, kept for tests.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

from spikeatconv_jax.snn.surrogate import heaviside, resolve_alpha, spike, surrogate_grad

# Scans over at most this many steps are fully unrolled: on XLA:CPU a rolled scan over a
# small T runs 2-8x slower than the unrolled one, and T <= 8 covers every paper setting.
MAX_UNROLL = 8


class LIFParams(typing.NamedTuple):
  """Static LIF settings (hashable, used as a non-differentiable argument)."""

  tau: float
  v_threshold: float
  v_reset: float | None
  decay_input: bool
  detach_reset: bool
  surrogate: str
  alpha: float


def _charge(v, x, p: LIFParams):
  vr = 0.0 if p.v_reset is None else p.v_reset
  if p.decay_input:
    return v + (x - (v - vr)) / p.tau
  return v - (v - vr) / p.tau + x


def _reset(h, s, p: LIFParams):
  if p.v_reset is None:
    return h - s * p.v_threshold
  return s * p.v_reset + (1.0 - s) * h


def _v0(x, p: LIFParams):
  vr = 0.0 if p.v_reset is None else p.v_reset
  return jnp.full(x.shape[1:], vr, jnp.float32)


def _unroll(t: int) -> int:
  return t if t <= MAX_UNROLL else 1


def _forward(x, p: LIFParams):
  """Returns (spikes [T, ...] in x.dtype, pre-spike potentials H [T, ...] float32)."""

  def step(v, xt):
    h = _charge(v, xt, p)
    s = heaviside(h - p.v_threshold)
    return _reset(h, s, p), (s.astype(x.dtype), h)

  # Upcast the whole input once, before slicing it into steps: with per-step converts of
  # bf16 slices, XLA:CPU copies every slice x[t] into its own buffer first (an extra pass).
  xf = x.astype(jnp.float32)
  if x.shape[0] == 1:  # no scan at T=1 (DESIGN.md §2)
    _, (s, h) = step(_v0(x, p), xf[0])
    return s[None], h[None]
  _, (s, h) = lax.scan(step, _v0(x, p), xf, unroll=_unroll(x.shape[0]))
  return s, h


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lif(x, p: LIFParams):
  return _forward(x, p)[0]


def _lif_fwd(x, p: LIFParams):
  s, h = _forward(x, p)
  return s, h


def _lif_bwd(p: LIFParams, h, g):
  """Reverse scan. Carry: dL/dV_t. Per step (with u = H_t - V_th, σ' = surrogate'(u)):

  dL/dH_t = g_t σ' + dL/dV_t · dV_t/dH_t, where
    hard: dV/dH = (1 - S) + [not detach] (V_reset - H) σ'
    soft: dV/dH = 1 - [not detach] V_th σ'
  dL/dX_t = dL/dH_t · dH/dX (1/tau or 1);  dL/dV_{t-1} = dL/dH_t · (1 - 1/tau).
  """
  k = 1.0 - 1.0 / p.tau
  dh_dx = 1.0 / p.tau if p.decay_input else 1.0

  def step(gv, inputs):
    ht, gt = inputs
    u = ht - p.v_threshold
    sg = surrogate_grad(u, p.surrogate, p.alpha)
    if p.v_reset is None:
      dv_dh = 1.0 if p.detach_reset else 1.0 - p.v_threshold * sg
    else:
      dv_dh = 1.0 - heaviside(u)
      if not p.detach_reset:
        dv_dh = dv_dh + (p.v_reset - ht) * sg
    gh = gt * sg + gv * dv_dh
    return gh * k, (gh * dh_dx).astype(g.dtype)

  # As in the forward: upcast the cotangent once, not one slice per step.
  gf = g.astype(jnp.float32)
  h = lax.optimization_barrier(h)
  if h.shape[0] == 1:
    _, gx = step(jnp.zeros(h.shape[1:], jnp.float32), (h[0], gf[0]))
    return (gx[None],)
  _, gx = lax.scan(
    step, jnp.zeros(h.shape[1:], jnp.float32), (h, gf), reverse=True, unroll=_unroll(h.shape[0])
  )
  return (gx,)


_lif.defvjp(_lif_fwd, _lif_bwd)


def make_params(
  *,
  tau: float = 2.0,
  v_threshold: float = 1.0,
  v_reset: float | None = 0.0,
  decay_input: bool = True,
  detach_reset: bool = True,
  surrogate: str = "atan",
  alpha: float | None = None,
) -> LIFParams:
  """Validates LIF settings and resolves the surrogate's default alpha."""
  if not tau > 1.0:
    raise ValueError(f"LIF tau must be > 1 (SpikingJelly asserts it), got {tau}")
  return LIFParams(
    float(tau),
    float(v_threshold),
    None if v_reset is None else float(v_reset),
    bool(decay_input),
    bool(detach_reset),
    surrogate,
    resolve_alpha(surrogate, alpha),
  )


def lif_multistep(
  x: jax.Array,
  *,
  tau: float = 2.0,
  v_threshold: float = 1.0,
  v_reset: float | None = 0.0,
  decay_input: bool = True,
  detach_reset: bool = True,
  surrogate: str = "atan",
  alpha: float | None = None,
) -> jax.Array:
  """Spikes of a multi-step LIF neuron for input currents `x` of shape [T, ...].

  Args:
    x: input currents, time-major [T, ...], any float dtype (bf16 works; the membrane is
      float32 whatever the input dtype).
    tau: membrane time constant (> 1).
    v_threshold: firing threshold V_th.
    v_reset: reset potential for a hard reset, or None for a soft (subtractive) reset.
    decay_input: whether the input is divided by tau when charging.
    detach_reset: whether the reset is excluded from the gradient.
    surrogate: registered surrogate name; alpha its sharpness (None: its default).

  Returns:
    0/1 spikes, same shape and dtype as `x`.
  """
  if x.ndim < 1:
    raise ValueError("lif_multistep expects a [T, ...] input")
  p = make_params(
    tau=tau,
    v_threshold=v_threshold,
    v_reset=v_reset,
    decay_input=decay_input,
    detach_reset=detach_reset,
    surrogate=surrogate,
    alpha=alpha,
  )
  return _lif(x, p)


def lif_multistep_reference(x: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain autodiff-through-scan LIF. Returns (S, H, V) per step; for tests and debugging."""
  p = make_params(**kwargs)

  def step(v, xt):
    h = _charge(v, xt.astype(jnp.float32), p)
    s = spike(h - p.v_threshold, p.surrogate, p.alpha)
    s_reset = lax.stop_gradient(s) if p.detach_reset else s
    v_new = _reset(h, s_reset, p)
    return v_new, (s.astype(x.dtype), h, v_new)

  _, (s, h, v) = lax.scan(step, _v0(x, p), x)
  return s, h, v
