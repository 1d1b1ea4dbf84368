"""SPK blocks (DESIGN.md §3): the spiking activations that replace every activation.

All kinds take a real input of shape [T, B, ..., C] (DCL and the MBPL `dwconv`/`convnext`
merges need the spatial layout [T, B, H, W, C]) and return the same shape in the input dtype.

  sl    Y = LIF_θ(X)                                   binary
  rl    S1 = LIF_θ1(X); S2 = LIF_θ2(X + S1); Y = S1+S2 in {0,1,2}  (rl_mode='literal': LIF_θ2(S1))
  mbpl  S_k = LIF_θk(X); Y = Σ S_k + γ·LN(Σ_k DW7_k(S_k))   merge 'dwconv' (spec), 'sum', 'convnext'
  hsl   Y = concat(LIF_θ1(X[..., :C/2]), LIF_θ2(X[..., C/2:]))
  dcl   Y = concat(LIF(Conv3x3(X)), LIF(Conv5x5(X))), each C -> C/2, bias; optional BN
  none  identity, or GELU (`none_act='gelu'`): the spike-free network

Every LIF branch's firing rate per time step is sown as `("spikes", "rate")`, an array
[K, T]: branch k's mean spike rate at step t over batch, positions and channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from spikeatconv_jax.layers import common, ops
from spikeatconv_jax.layers.dwconv import DepthwiseConv
from spikeatconv_jax.layers.remat import name_spikes  # kept by model.remat_policy="save_spikes"
from spikeatconv_jax.snn import lif as lif_lib
from spikeatconv_jax.snn.lif import lif_multithreshold

Dtype = Any

SPK_KINDS = ("sl", "rl", "mbpl", "hsl", "dcl", "none")
DEFAULT_THRESHOLDS = {
  "sl": (1.0,),
  "rl": (1.0, 2.0),
  "mbpl": (0.2, 1.0, 2.0, 4.0),
  "hsl": (1.0, 2.0),
  "dcl": (1.0, 1.0),
  "none": (),
}
RL_MODES = ("cascade", "literal")
MBPL_MERGES = ("dwconv", "sum", "convnext")
NONE_ACTS = ("identity", "gelu")
# How many thresholds (LIF branches) each kind takes; None: any number >= 1 (MBPL's K).
N_THRESHOLDS = {"sl": 1, "rl": 2, "mbpl": None, "hsl": 2, "dcl": 2}


def check_options(
  kind: str, rl_mode: str = "cascade", mbpl_merge: str = "dwconv", none_act: str = "identity"
) -> None:
  """Raises a one-line ValueError for an unknown SPK kind or per-kind option."""
  for what, value, known in (
    ("SPK kind", kind, SPK_KINDS),
    ("rl_mode", rl_mode, RL_MODES),
    ("mbpl_merge", mbpl_merge, MBPL_MERGES),
    ("none_act", none_act, NONE_ACTS),
  ):
    if value not in known:
      raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")


class SPK(nn.Module):
  """A spiking activation block over [T, B, ..., C]; see the module docstring.

  Attributes:
    kind: one of SPK_KINDS.
    thresholds: per-branch V_th; empty means the kind's default (DEFAULT_THRESHOLDS).
    threshold_scale: multiplies every threshold (0.5 for attention outputs, DESIGN.md §4).
    tau, v_reset, decay_input, detach_reset, surrogate, alpha: LIF settings (DESIGN.md §2).
    rl_mode, mbpl_merge, dcl_norm: per-kind options (DESIGN.md §3).
    none_act: what kind='none' computes ('identity' or 'gelu').
    neuron_timesteps: n > 1 is DESIGN.md §1's `time_mode='neuron'`: each LIF repeats its
      (single-step, T=1) input n times and outputs its mean spike rate, in {0, 1/n, ..., 1}.
  """

  kind: str = "sl"
  thresholds: Sequence[float] = ()
  threshold_scale: float = 1.0
  tau: float = 2.0
  v_reset: float | None = 0.0
  decay_input: bool = True
  detach_reset: bool = True
  surrogate: str = "atan"
  alpha: float | None = None
  rl_mode: str = "cascade"
  mbpl_merge: str = "dwconv"
  dcl_norm: bool = False
  none_act: str = "identity"
  neuron_timesteps: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_options(self.kind, self.rl_mode, self.mbpl_merge, self.none_act)
    super().__post_init__()

  def _thresholds(self) -> tuple[float, ...]:
    th = tuple(self.thresholds) or DEFAULT_THRESHOLDS[self.kind]
    # A wrong count (e.g. MBPL's four thresholds left in a config switched to SL) would
    # otherwise be silently truncated or fail with an IndexError deep inside the block.
    n = N_THRESHOLDS[self.kind]
    if (n is None and not th) or (n is not None and len(th) != n):
      raise ValueError(
        f"SPK kind {self.kind!r} takes {n or 'one or more'} thresholds, got {tuple(th)}"
      )
    return tuple(float(t) * self.threshold_scale for t in th)

  def _lif(self, x, v_threshold):
    return self._lifs(x, (v_threshold,))[0]

  def _lifs(self, x, v_thresholds, counts: bool = False):
    """One LIF neuron per threshold, all driven by x: a tuple of spike trains. Under
    `neuron_timesteps` n > 1: each neuron's mean spike rate over its n steps (with `counts`, its
    spike count instead: integer-valued)."""
    n = int(self.neuron_timesteps)
    if n > 1:
      if x.shape[0] != 1:
        raise ValueError(f"time_mode='neuron' runs the network at T=1; this SPK got T={x.shape[0]}")
      ss = self._lif_steps(jnp.broadcast_to(x, (n,) + x.shape[1:]), v_thresholds)
      reduce = jnp.sum if counts else jnp.mean
      return tuple(reduce(s.astype(jnp.float32), axis=0, keepdims=True).astype(x.dtype) for s in ss)
    return self._lif_steps(x, v_thresholds)

  def _lif_params(self, v_thresholds) -> lif_lib.LIFParams:
    return lif_lib.make_params(
      tau=self.tau,
      v_threshold=tuple(v_thresholds),
      v_reset=self.v_reset,
      decay_input=self.decay_input,
      detach_reset=self.detach_reset,
      surrogate=self.surrogate,
      alpha=self.alpha,
    )

  def _lif_steps(self, x, v_thresholds):
    return lif_multithreshold(
      # The input gradient sums the K neurons' gradients and feeds the norm backward before it.
      common.materialize_cotangent(x),
      v_thresholds=v_thresholds,
      tau=self.tau,
      v_reset=self.v_reset,
      decay_input=self.decay_input,
      detach_reset=self.detach_reset,
      surrogate=self.surrogate,
      alpha=self.alpha,
    )

  @staticmethod
  def _rates(spikes: Sequence[jax.Array]) -> jax.Array:
    """[K, T]: each branch's mean over everything but time, in float32."""
    return jnp.stack(
      [jnp.mean(s.astype(jnp.float32), axis=tuple(range(1, s.ndim))) for s in spikes]
    )

  def _sow_rates(self, spikes: Sequence[jax.Array]):
    self.sow("spikes", "rate", self._rates(spikes))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.kind == "none":
      return common.gelu(x) if self.none_act == "gelu" else x
    th = self._thresholds()
    dtype = x.dtype

    if self.kind == "sl":
      s = self._lif(x, th[0])
      self._sow_rates([s])
      return name_spikes(s)

    if self.kind == "rl":
      s1 = self._lif(x, th[0])
      s2 = self._lif(x + s1 if self.rl_mode == "cascade" else s1, th[1])
      self._sow_rates([s1, s2])
      return name_spikes(s1 + s2)

    if self.kind == "hsl":
      c = x.shape[-1]
      if c % 2:
        raise ValueError(f"HSL splits channels in half; got an odd channel count {c}")
      s1 = self._lif(x[..., : c // 2], th[0])
      s2 = self._lif(x[..., c // 2 :], th[1])
      self._sow_rates([s1, s2])
      return name_spikes(jnp.concatenate([s1, s2], axis=-1))

    if self.kind == "dcl":
      if x.ndim != 5:
        raise ValueError(f"DCL needs a [T, B, H, W, C] input, got shape {x.shape}")
      t, b, h, w, c = x.shape
      if c % 2:
        raise ValueError(f"DCL outputs C/2 + C/2 channels; got an odd channel count {c}")
      xf = x.reshape(t * b, h, w, c)
      outs = []
      for i, k in enumerate((3, 5)):
        z = common.conv(c // 2, k, use_bias=True, dtype=self.dtype, name=f"conv{k}x{k}")(xf)
        if self.dcl_norm:
          z = common.batch_norm(train=train, dtype=self.dtype, name=f"bn{k}x{k}")(z)
        outs.append(self._lif(z.reshape(t, b, h, w, c // 2).astype(dtype), th[i]))
      self._sow_rates(outs)
      return name_spikes(jnp.concatenate(outs, axis=-1))

    # mbpl. K neurons on one input, one custom VJP (lif_multithreshold): the backward sums the K
    # input gradients in its single elementwise pass. (One LIF over a [..., C, K] broadcast
    # with per-branch thresholds ran ~50x slower on XLA:CPU.)
    n = int(self.neuron_timesteps)
    merge = self.mbpl_merge != "sum"
    if merge and x.ndim != 5:
      raise ValueError(f"MBPL merge {self.mbpl_merge!r} needs [T, B, H, W, C], got {x.shape}")
    # At T=1 a table may make the merge from the LIF input itself (`lif_spike_merge`).
    fused = merge and x.shape[0] == 1 and n == 1 and ops.current().lif_spike_merge is not None

    def spikes_and_merge(mdl, x):
      # Spike trains; under neuron_timesteps n > 1, spike counts over the n steps (the merge
      # conv takes integer-valued inputs) and the rates are counts / n.
      trains = list(mdl._lifs(x, th, counts=True))
      spikes = trains if n == 1 else [c / n for c in trains]
      count = sum(spikes[1:], spikes[0])
      rates = mdl._rates(spikes)
      if not merge:
        return rates, count, None
      t, b, h, w, c = x.shape
      # Z = Σ_k DW7_k(S_k): the grouped conv K*C -> C with groups=C of DESIGN.md §3, fed the K
      # spike trains as a sequence (`layers.ops` spike_merge_conv), or at T=1, where the table
      # has the fused form, made from the LIF input itself (`lif_spike_merge`).
      conv = DepthwiseConv(
        7,
        use_bias=False,
        sum_branches=len(trains),
        dtype=mdl.dtype,
        param_dtype=mdl.param_dtype,
        name="merge_dw",
      )
      if fused:
        z = conv(x.reshape(b, h, w, c), lif=mdl._lif_params(th))
      else:
        z = conv([s_k.reshape(t * b, h, w, c) for s_k in trains])
      return rates, count, z / n if n > 1 else z  # the merge of the rates: the conv is linear

    if fused and self.mbpl_merge == "dwconv" and ops.current().lif_merge_norm is not None:
      return self._merge_norm(x, th)
    if merge:
      # The merge conv's backward needs the spikes: the table may recompute them from x. The
      # fused form keeps only x itself, but the count's LIF is then recomputed too, which keeps
      # less between the passes than saving its outputs.
      spikes_and_merge = common.recompute_spikes(spikes_and_merge)
    rates, count, z = spikes_and_merge(self, x)
    self.sow("spikes", "rate", rates)
    if not merge:
      return name_spikes(count)
    t, b, h, w, c = x.shape
    shift = self.param("merge_bias", nn.initializers.zeros, (c,), self.param_dtype)
    gamma = self.param("merge_gamma", nn.initializers.constant(1e-6), (c,), self.param_dtype)
    if self.mbpl_merge == "convnext":
      z = common.layer_norm(dtype=self.dtype, name="merge_ln0")(z + shift.astype(z.dtype))
      z = common.dense(4 * c, use_bias=True, dtype=self.dtype, name="merge_fc1")(z)
      z = common.gelu(z)
      z = common.dense(c, use_bias=True, dtype=self.dtype, name="merge_fc2")(z)
      z = z * gamma.astype(z.dtype)
    else:
      # γ ⊙ LN(Z + bias) as one op (`layers.ops` scaled_layer_norm).
      z = common.scaled_layer_norm(dtype=self.dtype, name="merge_ln")(z, shift=shift, gamma=gamma)
    z = z.reshape(t, b, h, w, c)
    return name_spikes((count + z).astype(dtype))

  def _merge_norm(self, x: jax.Array, th: tuple[float, ...]) -> jax.Array:
    """MBPL's paper merge at T=1 from the table's `lif_merge_norm`, with the parameters the
    composed form makes (merge_dw/kernel, merge_bias, merge_gamma, merge_ln/scale and bias)."""
    _, b, h, w, c = x.shape
    k = len(th)
    (kernel,) = _Parameters(
      (("kernel", DepthwiseConv.kernel_init, (7, 7, k * c, 1)),),
      param_dtype=self.param_dtype,
      name="merge_dw",
    )()
    shift = self.param("merge_bias", nn.initializers.zeros, (c,), self.param_dtype)
    gamma = self.param("merge_gamma", nn.initializers.constant(1e-6), (c,), self.param_dtype)
    scale, bias = _Parameters(
      (("scale", nn.initializers.ones, (c,)), ("bias", nn.initializers.zeros, (c,))),
      param_dtype=self.param_dtype,
      name="merge_ln",
    )()
    g = gamma.astype(jnp.float32)  # folded into the LayerNorm's affine, as ScaledLayerNorm does
    y, rates = ops.current().lif_merge_norm(
      x.reshape(b, h, w, c).astype(self.dtype),
      kernel.reshape(7, 7, k, c).astype(self.dtype),
      shift,
      scale.astype(jnp.float32) * g,
      bias.astype(jnp.float32) * g,
      self._lif_params(th),
      common.LN_EPS,
    )
    self.sow("spikes", "rate", rates)
    return name_spikes(y.reshape(x.shape).astype(x.dtype))


class _Parameters(nn.Module):
  """Parameters under this module's name as the module that normally owns them makes them
  (names, shapes, initialisers): for a form that uses them without that module."""

  specs: tuple[tuple[str, Any, tuple[int, ...]], ...]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, ...]:
    return tuple(self.param(n, init, shape, self.param_dtype) for n, init, shape in self.specs)


def make_spk(cfg: Any, *, threshold_scale: float = 1.0, none_act: str = "identity", **kw) -> SPK:
  """Builds an SPK from a `model.spk` ConfigDict (DESIGN.md §13 names).

  Args:
    cfg: ConfigDict/mapping with kind, thresholds, tau, surrogate, alpha, v_reset,
      decay_input, detach_reset, rl_mode, mbpl_merge, dcl_norm (missing keys: defaults).
    threshold_scale: 0.5 for the attention-output SPK.
    none_act: what kind='none' becomes at this site ('gelu' where the ANN has GELU).
    **kw: module attributes such as name, dtype.
  """
  get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
  kind = get("kind", "sl")
  thresholds = get("thresholds", ()) or ()
  return SPK(
    kind=kind,
    thresholds=tuple(float(t) for t in thresholds),
    threshold_scale=threshold_scale,
    tau=float(get("tau", 2.0)),
    v_reset=get("v_reset", 0.0),
    decay_input=bool(get("decay_input", True)),
    detach_reset=bool(get("detach_reset", True)),
    surrogate=get("surrogate", "atan"),
    alpha=get("alpha", None),
    rl_mode=get("rl_mode", "cascade"),
    mbpl_merge=get("mbpl_merge", "dwconv"),
    dcl_norm=bool(get("dcl_norm", False)),
    none_act=none_act,
    neuron_timesteps=int(get("neuron_timesteps", 1)),
    **kw,
  )


def collect_rates(spikes: Any) -> dict[str, jax.Array]:
  """Flattens a sown "spikes" collection to {"path/of/spk_site": rates [K, T]}.

  `spikes` is the "spikes" collection returned by `apply(..., mutable=["spikes"])`.
  A site called more than once in one apply (e.g. shared modules) reports the mean.
  """
  out = {}
  for path, value in flax.traverse_util.flatten_dict(dict(spikes)).items():
    if path[-1] != "rate":
      continue
    vals = value if isinstance(value, tuple) else (value,)
    out["/".join(path[:-1])] = sum(vals[1:], vals[0]) / len(vals)
  return out
