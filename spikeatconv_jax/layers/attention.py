"""Block/grid partition, relative-position bias, SISA/BDSA/softmax attention and the FFN.

DESIGN.md §4. Maps are [T, B, H, W, C]; attention runs separately in each time step (T is
folded into the batch), on groups of N = P² tokens:

  block (window): each group is a contiguous P×P patch.
  grid:           each group is P² tokens spaced H/P apart (dilated, global).

SISA:  S = SPK(LN(X)); Q/K/V = SPK(BN(S·W)) (bias-free); A = s·QKᵀ + B; O = A·V;
       Y = SPK_{θ/2}(O); out = Y·W_o + b.
BDSA:  S = SPK(LN(X)); Q = K = V = S; O = (s·SSᵀ + B)·S; out = SPK_{θ/2}(O)·W_o + b.
softmax (spike-free net): A = softmax(d^-½·QKᵀ + B).

SPKs run on the map layout before partitioning: the q/k/v projections are pointwise, so this
is equivalent, and DCL / the MBPL dwconv merge need the spatial input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spikeatconv_jax.layers import common
from spikeatconv_jax.snn.spk import make_spk

Dtype = Any

ATTENTION_KINDS = ("sisa", "bdsa", "softmax")
PARTITION_KINDS = ("block", "grid")


def check_attention_kind(kind: str) -> None:
  if kind not in ATTENTION_KINDS:
    raise ValueError(f"unknown attention kind {kind!r}; known kinds: {', '.join(ATTENTION_KINDS)}")


def partition_size(p: int, h: int, w: int) -> int:
  """P_s = min(P, map size); raises if it does not divide the map."""
  if h != w:
    raise ValueError(f"attention needs square maps, got {h}x{w}")
  ps = min(p, h)
  if h % ps:
    raise ValueError(f"partition size {ps} does not divide the {h}x{w} map")
  return ps


def block_partition(x: jax.Array, p: int) -> jax.Array:
  """[N, H, W, C] -> [N·(H/P)·(W/P), P², C]; each group is a contiguous P×P patch."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [N, H/P, W/P, P, P, C]
  return x.reshape(-1, p * p, c)


def block_unpartition(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `block_partition`: [N·(H/P)·(W/P), P², C] -> [N, H, W, C]."""
  c = x.shape[-1]
  x = x.reshape(-1, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def grid_partition(x: jax.Array, p: int) -> jax.Array:
  """[N, H, W, C] -> [N·(H/P)·(W/P), P², C]; a group's tokens are H/P (W/P) apart."""
  n, h, w, c = x.shape
  x = x.reshape(n, p, h // p, p, w // p, c)
  x = x.transpose(0, 2, 4, 1, 3, 5)  # [N, H/P, W/P, P, P, C]
  return x.reshape(-1, p * p, c)


def grid_unpartition(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `grid_partition`."""
  c = x.shape[-1]
  x = x.reshape(-1, h // p, w // p, p, p, c).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(-1, h, w, c)


def partition(x: jax.Array, p: int, kind: str) -> jax.Array:
  return block_partition(x, p) if kind == "block" else grid_partition(x, p)


def unpartition(x: jax.Array, p: int, h: int, w: int, kind: str) -> jax.Array:
  return block_unpartition(x, p, h, w) if kind == "block" else grid_unpartition(x, p, h, w)


def relative_position_index(p: int) -> np.ndarray:
  """[P², P²] flat index into a (2P-1)×(2P-1) table: (Δrow + P-1)·(2P-1) + (Δcol + P-1)."""
  coords = np.stack(np.meshgrid(np.arange(p), np.arange(p), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (p - 1)  # [2, P², P²]
  return rel[0] * (2 * p - 1) + rel[1]


class RelativePositionBias(nn.Module):
  """Learned table R [h, 2P-1, 2P-1] (normal 0.02) -> bias B [h, P², P²]."""

  heads: int
  size: int

  @nn.compact
  def __call__(self) -> jax.Array:
    p = self.size
    table = self.param(
      "table", nn.initializers.normal(0.02), (self.heads, 2 * p - 1, 2 * p - 1), jnp.float32
    )
    idx = relative_position_index(p)
    return table.reshape(self.heads, -1)[:, idx]  # [h, P², P²]


class AttentionCore(nn.Module):
  """Scores and weighted sum on partitioned heads; no parameters.

  A separate module so the energy counter can see q/k/v shapes (`nn.intercept_methods`).
  q, k, v: [G, N, h, d]; bias [h, N, N]. Returns [G, N, h, d].
  """

  kind: str
  scale: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, bias):
    scores = jnp.einsum("gnhd,gmhd->ghnm", q, k)
    if self.kind == "softmax":
      scores = common.add_broadcast(scores * jnp.asarray(q.shape[-1] ** -0.5, scores.dtype), bias)
      scores = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    else:
      # Spike-driven: no softmax (SDT-V2), a constant scale, scores before the product with V.
      scores = common.add_broadcast(scores * jnp.asarray(self.scale, scores.dtype), bias)
    return jnp.einsum("ghnm,gmhd->gnhd", scores, v)


class Attention(nn.Module):
  """Pre-norm attention branch (SISA / BDSA / softmax) on [T, B, H, W, C], block or grid.

  Returns the residual-stream update X + DropPath(γ ⊙ Attn(X)).
  """

  kind: str
  partition: str  # block | grid
  partition_size: int  # P (the config value; small maps use P_s = min(P, H))
  head_dim: int
  scale: float
  spk: Any  # model.spk ConfigDict
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {
    "q": "spk_in",
    "k": "spk_in",
    "v": "spk_in",
    "proj": "spk_out",
  }  # the attention core's q/k/v sites are read by name in energy.py

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, drop_rate: Any = None) -> jax.Array:
    check_attention_kind(self.kind)
    t, b, h, w, c = x.shape
    if c % self.head_dim:
      raise ValueError(f"width {c} is not a multiple of head_dim {self.head_dim}")
    heads = c // self.head_dim
    p = partition_size(self.partition_size, h, w)
    init_scale = float(self.spk.get("norm_init_scale", 1.0))
    dt = self.dtype

    s = common.layer_norm(dtype=dt, name="ln", scale_init=init_scale)(x)
    s = make_spk(self.spk, name="spk_in", dtype=dt)(s, train=train)  # [T, B, H, W, C]
    if self.kind == "bdsa":
      q = k = v = s
    else:
      qkv = []
      for n in ("q", "k", "v"):
        z = common.dense(c, use_bias=False, dtype=dt, name=n)(s)
        z = common.batch_norm(train=train, dtype=dt, name=f"bn_{n}", scale_init=init_scale)(z)
        qkv.append(make_spk(self.spk, name=f"spk_{n}", dtype=dt)(z, train=train))
      q, k, v = qkv

    def heads_of(z):  # [T, B, H, W, C] -> [G, N, h, d]
      # Held before the partition's transposes and (where the table says) after them: each
      # side computed once, in its own layout, not fused into the score products.
      z = partition(common.fold(common.materialize(z)), p, self.partition)
      z = common.materialize_heads(z)
      return z.reshape(z.shape[0], z.shape[1], heads, self.head_dim)

    bias = RelativePositionBias(heads, p, name="rel_pos")()
    o = AttentionCore(self.kind, self.scale, dtype=dt, name="core")(
      heads_of(q), heads_of(k), heads_of(v), bias
    )
    o = unpartition(o.reshape(o.shape[0], o.shape[1], c), p, h, w, self.partition)
    # The output SPK's LIF (and its backward) reads `o` in image order, not the transpose's.
    o = common.materialize(o.reshape(t, b, h, w, c))
    # The attention-output SPK has its thresholds halved (SDT attn_lif v_threshold=0.5).
    o = make_spk(self.spk, threshold_scale=0.5, name="spk_out", dtype=dt)(o, train=train)
    o = common.dense(c, use_bias=True, dtype=dt, name="proj")(o)
    o = common.LayerScale(name="layer_scale")(o)
    return x + common.DropPath(self.drop_path, name="drop_path")(o, train=train, rate=drop_rate)


class FFN(nn.Module):
  """X + DropPath(γ ⊙ W₂·SPK(BN(W₁·SPK(LN(X))))); W₁: C -> 4C no bias, W₂: 4C -> C with bias.

  W₂'s output stays real (SDT-V2 membrane shortcut). In the spike-free net the hidden SPK is
  GELU (where MaxViT's MLP has GELU) and the input SPK is the identity.

  `spk_out=True` is the paper's literal "each FFN linear is followed by SPK"
  (`model.spk_after_branch_out`): W₂ (no bias, a BN follows) -> BN -> SPK, so the branch adds
  spikes to the residual stream.
  """

  spk: Any
  spk_out: bool = False
  expansion: int = 4
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {"fc1": "spk_in", "fc2": "spk_hidden"}

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, drop_rate: Any = None) -> jax.Array:
    c = x.shape[-1]
    init_scale = float(self.spk.get("norm_init_scale", 1.0))
    dt = self.dtype
    y = common.layer_norm(dtype=dt, name="ln", scale_init=init_scale)(x)
    y = make_spk(self.spk, name="spk_in", dtype=dt)(y, train=train)
    y = common.dense(self.expansion * c, use_bias=False, dtype=dt, name="fc1")(y)
    y = common.batch_norm(train=train, dtype=dt, name="bn", scale_init=init_scale)(y)
    y = make_spk(self.spk, none_act="gelu", name="spk_hidden", dtype=dt)(y, train=train)
    y = common.dense(c, use_bias=not self.spk_out, dtype=dt, name="fc2")(y)
    if self.spk_out:
      y = common.batch_norm(train=train, dtype=dt, name="bn_out", scale_init=init_scale)(y)
      y = make_spk(self.spk, name="spk_out", dtype=dt)(y, train=train)
    y = common.LayerScale(name="layer_scale")(y)
    return x + common.DropPath(self.drop_path, name="drop_path")(y, train=train, rate=drop_rate)
