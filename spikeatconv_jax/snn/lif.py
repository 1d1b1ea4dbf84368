"""Multi-step LIF neuron over a leading time axis (SpikingJelly semantics, DESIGN.md §2).

  charge  decay_input=True : H_t = V_{t-1} + (X_t - (V_{t-1} - V_reset)) / tau
          decay_input=False: H_t = V_{t-1} - (V_{t-1} - V_reset) / tau + X_t
  fire    S_t = Θ(H_t - V_th)                  (fires at equality)
  reset   hard: V_t = S̃_t V_reset + (1 - S̃_t) H_t;  soft (v_reset=None): V_t = H_t - S̃_t V_th
  with S̃ = stop_gradient(S) when detach_reset, and V_0 = V_reset (0 for soft reset).

`lif_multistep` is one `jax.custom_vjp` whose forward is a `lax.scan` over T and whose backward
is the reverse `lax.scan` that rebuilds every local derivative from the pre-spike potentials H.
Up to MAX_UNROLL steps (every paper setting) both scans are fully unrolled and the only residual
is the input X: the backward recomputes H from it with the forward scan. Longer inputs take
rolled scans that keep H (float32, [T, ...]) as the residual. Autodiff through a plain scan
would also keep V and S for every step.
`lif_multistep_reference` is that plain scan, kept for tests.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

from spikeatconv_jax.snn.surrogate import heaviside, resolve_alpha, spike, surrogate_grad

# Up to this many steps both scans are fully unrolled (`unroll=True`); T <= 8 covers every paper
# setting. A rolled scan over a small T runs several times slower on XLA:CPU: each iteration is
# a separate pass over the whole map, while the unrolled steps fuse into one elementwise pass
# per output. Longer inputs take a rolled scan (one step's code, whatever T).
MAX_UNROLL = 8


def _unroll(t_steps: int) -> bool:
  return t_steps <= MAX_UNROLL


class LIFParams(typing.NamedTuple):
  """Static LIF settings (hashable, used as a non-differentiable argument).

  `v_thresholds` holds one V_th per neuron sharing the input (one for a plain LIF; MBPL's K
  branches are K neurons driven by the same current).
  """

  tau: float
  v_thresholds: tuple[float, ...]
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


def _reset(h, s, th: float, p: LIFParams):
  if p.v_reset is None:
    return h - s * th
  return s * p.v_reset + (1.0 - s) * h


def _rest(p: LIFParams) -> float:
  """V_0: V_reset for a hard reset, 0 for a soft one."""
  return 0.0 if p.v_reset is None else p.v_reset


def _v0(x, p: LIFParams):
  return jnp.full(x.shape[1:], _rest(p), jnp.float32)


def first_potential(x, p: LIFParams):
  """H_1: the pre-spike potential of the first step from V_0 for input x (float32,
  elementwise). A one-step neuron fires Θ(H_1 - V_th); kernels that fuse it use this."""
  return _charge(_rest(p), x, p)


def potential_gain(p: LIFParams) -> float:
  """dH_t/dX_t: 1/tau with decay_input, else 1."""
  return 1.0 / p.tau if p.decay_input else 1.0


def _step(vs, xt, p: LIFParams):
  """One step for every neuron: (new potentials V_t, (spikes S_t, pre-spike potentials H_t))."""
  hs = [_charge(v, xt, p) for v in vs]
  ss = [heaviside(h - th) for h, th in zip(hs, p.v_thresholds, strict=True)]
  vs = tuple(_reset(h, s, th, p) for h, s, th in zip(hs, ss, p.v_thresholds, strict=True))
  return vs, (tuple(ss), tuple(hs))


def _scan_forward(xf, p: LIFParams, *, spikes_dtype=None, potentials: bool = False):
  """The membrane dynamics as a `lax.scan` over the float32 input [T, ...].

  Returns (spikes, potentials): per neuron, the spikes [T, ...] in `spikes_dtype` (none when it
  is None) and the pre-spike potentials H [T, ...] in float32 (none unless `potentials`). Only
  what is asked for leaves the scan, so the backward's recomputation stacks no spikes.
  """

  def step(vs, xt):
    vs, (ss, hs) = _step(vs, xt, p)
    ss = () if spikes_dtype is None else tuple(s.astype(spikes_dtype) for s in ss)
    return vs, (ss, hs if potentials else ())

  v0 = tuple(_v0(xf, p) for _ in p.v_thresholds)
  _, (ss, hs) = lax.scan(step, v0, xf, unroll=_unroll(xf.shape[0]))
  return ss, hs


def _forward(x, p: LIFParams):
  """Returns (K spike trains [T, ...] in x.dtype, residual).

  Up to MAX_UNROLL steps the residual is the input x itself: the backward recomputes the
  potentials H from it (elementwise, fused into its own pass), so the forward writes no float32
  H maps (K per step after the first) and the backward reads T input maps instead. Beyond it the
  residuals are the rolled scan's stacked pre-spike potentials H [T, ...] per neuron.
  """
  # The membrane is float32 whatever x's dtype (a bf16 membrane would round differently).
  keep_h = not _unroll(x.shape[0])
  spikes, hs = _scan_forward(x.astype(jnp.float32), p, spikes_dtype=x.dtype, potentials=keep_h)
  return spikes, (hs if keep_h else x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lif(x, p: LIFParams):
  return _forward(x, p)[0]


def _lif_fwd(x, p: LIFParams):
  return _forward(x, p)


def _lif_bwd(p: LIFParams, res, gs):
  """Reverse scan. Carry: dL/dV_t of each neuron. Per step and neuron (u = H_t - V_th,
  σ' = surrogate'(u)):

  dL/dH_t = g_t σ' + dL/dV_t · dV_t/dH_t, where
    hard: dV/dH = (1 - S) + [not detach] (V_reset - H) σ'
    soft: dV/dH = 1 - [not detach] V_th σ'
  dL/dX_t = Σ_neurons dL/dH_t · dH/dX (1/tau or 1);  dL/dV_{t-1} = dL/dH_t · (1 - 1/tau).

  The neurons' input gradients are summed in the same elementwise pass, so K neurons on one
  input read H and their K cotangents once and write one gradient.
  """
  k = 1.0 - 1.0 / p.tau
  dh_dx = potential_gain(p)
  ths = p.v_thresholds
  dtype = gs[0].dtype

  def neuron(gv, ht, gt, th):
    u = ht - th
    sg = surrogate_grad(u, p.surrogate, p.alpha)
    gh = gt * sg
    if gv is None:  # the last step: nothing flows back from V_T
      return gh
    if p.v_reset is None:
      dv_dh = 1.0 if p.detach_reset else 1.0 - th * sg
    else:
      dv_dh = 1.0 - heaviside(u)
      if not p.detach_reset:
        dv_dh = dv_dh + (p.v_reset - ht) * sg
    return gh + gv * dv_dh

  def step(gvs, inputs):
    hts, gts = inputs
    ghs = [neuron(gv, ht, gt, th) for gv, ht, gt, th in zip(gvs, hts, gts, ths, strict=True)]
    gx = functools.reduce(jnp.add, ghs) * dh_dx
    return tuple(gh * k for gh in ghs), gx.astype(dtype)

  # The backward, like the membrane, runs in float32.
  gf = tuple(g.astype(jnp.float32) for g in gs)
  t_steps = gf[0].shape[0]
  if not _unroll(t_steps):
    # Long T: the carry starts from a zero dL/dV_T; its needless multiply-add is one step in T.
    hs = lax.optimization_barrier(res)
    g0 = tuple(jnp.zeros(g.shape[1:], jnp.float32) for g in gf)
    _, gx = lax.scan(step, g0, (hs, gf), reverse=True)
    return (gx,)
  # The residual is the input: recompute H with the forward scan. The barrier keeps XLA from
  # reusing the forward's H instead, which would keep them alive as residuals after all.
  x = lax.optimization_barrier(res)
  _, hs = _scan_forward(x.astype(jnp.float32), p, potentials=True)
  # The last step takes in no dL/dV_T, and XLA keeps a float multiply by zero, so that step runs
  # on its own (at T=1 it is the whole backward) and the reverse scan starts from its dL/dV.
  gvs, gx_last = step((None,) * len(ths), jax.tree.map(lambda a: a[-1], (hs, gf)))
  if t_steps == 1:
    return (gx_last[None],)
  rest = jax.tree.map(lambda a: a[:-1], (hs, gf))
  _, gx = lax.scan(step, gvs, rest, reverse=True, unroll=True)
  return (jnp.concatenate([gx, gx_last[None]]),)


_lif.defvjp(_lif_fwd, _lif_bwd)


def make_params(
  *,
  tau: float = 2.0,
  v_threshold: float | typing.Sequence[float] = 1.0,
  v_reset: float | None = 0.0,
  decay_input: bool = True,
  detach_reset: bool = True,
  surrogate: str = "atan",
  alpha: float | None = None,
) -> LIFParams:
  """Validates LIF settings and resolves the surrogate's default alpha. `v_threshold` is one
  V_th or a sequence of them (one neuron each)."""
  if not tau > 1.0:
    raise ValueError(f"LIF tau must be > 1 (SpikingJelly asserts it), got {tau}")
  ths = (v_threshold,) if isinstance(v_threshold, (int, float)) else tuple(v_threshold)
  if not ths:
    raise ValueError("LIF needs at least one threshold")
  return LIFParams(
    float(tau),
    tuple(float(t) for t in ths),
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
    v_threshold: firing threshold V_th.
    tau: membrane time constant (> 1).
    v_reset: reset potential for a hard reset, or None for a soft (subtractive) reset.
    decay_input: whether the input is divided by tau when charging.
    detach_reset: whether the reset is excluded from the gradient.
    surrogate: registered surrogate name; alpha its sharpness (None: its default).

  Returns:
    0/1 spikes, same shape and dtype as `x`.
  """
  (s,) = lif_multithreshold(
    x,
    v_thresholds=(float(v_threshold),),
    tau=tau,
    v_reset=v_reset,
    decay_input=decay_input,
    detach_reset=detach_reset,
    surrogate=surrogate,
    alpha=alpha,
  )
  return s


def lif_multithreshold(
  x: jax.Array,
  *,
  v_thresholds: typing.Sequence[float],
  tau: float = 2.0,
  v_reset: float | None = 0.0,
  decay_input: bool = True,
  detach_reset: bool = True,
  surrogate: str = "atan",
  alpha: float | None = None,
) -> tuple[jax.Array, ...]:
  """K LIF neurons driven by the same currents `x` [T, ...], one per threshold (MBPL's
  branches, DESIGN.md §3): the same spikes and gradients as K `lif_multistep` calls.

  One custom VJP serves all K: it keeps one residual for all of them (the input, or beyond
  MAX_UNROLL steps each neuron's H), and its backward sums the K input gradients in the same
  elementwise pass. (XLA:CPU fuses K separate LIFs the same way; this states it in the graph
  instead of relying on XLA's CSE.)

  Args:
    x: input currents, time-major [T, ...], any float dtype.
    v_thresholds: one V_th per neuron.
    tau, v_reset, decay_input, detach_reset, surrogate, alpha: as in `lif_multistep`.

  Returns:
    K spike trains, each the shape and dtype of `x`.
  """
  if x.ndim < 1:
    raise ValueError(f"a LIF expects a [T, ...] input, got shape {x.shape}")
  p = make_params(
    tau=tau,
    v_threshold=tuple(v_thresholds),
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
    (th,) = p.v_thresholds
    s = spike(h - th, p.surrogate, p.alpha)
    s_reset = lax.stop_gradient(s) if p.detach_reset else s
    v_new = _reset(h, s_reset, th, p)
    return v_new, (s.astype(x.dtype), h, v_new)

  _, (s, h, v) = lax.scan(step, _v0(x, p), x)
  return s, h, v
