"""Stem and the spiking ConvNeXt branch with stage-entry downsampling (DESIGN.md §5-§6).

Stem:   Conv3×3/2 (3 -> C0/2, no bias) -> BN -> GELU (or SPK with stem_act='spk')
        -> Conv3×3/1 (-> C0, no bias) -> BN -> SPK.
Branch: BN -> SPK -> DW7×7 (stride 2 at stage entry, multiplier C/C_in, bias) -> LN -> SPK
        -> 1×1 C->4C (bias) -> BN -> SPK -> 1×1 4C->C (bias) -> γ -> DropPath, + shortcut.
Shortcut at stage entry: AvgPool 2×2 (ceil mode) plus a 1×1 conv with bias if the width changes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from spikeatconv_jax.layers import common
from spikeatconv_jax.layers.dwconv import DepthwiseConv
from spikeatconv_jax.snn.spk import make_spk

Dtype = Any

STEM_ACTS = ("gelu", "spk")


class Stem(nn.Module):
  """Images [B, H, W, 3] -> spikes [T, B, H/2, W/2, C0].

  Nothing before the first SPK depends on t (direct encoding), so with stem_act='gelu' the two
  convs and BNs run once on B images and are broadcast over T; numbers and BN statistics equal
  those of running them on the T-times repeated input. With stem_act='spk' the broadcast happens
  before that first SPK.
  """

  widths: tuple[int, int]
  timesteps: int
  spk: Any
  stem_act: str = "gelu"
  dtype: Dtype = jnp.float32

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {
    "conv1": common.SRC_IMAGE,
    "conv2": "act1|" + common.SRC_REAL_ONCE,
  }

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.stem_act not in STEM_ACTS:
      raise ValueError(f"unknown stem_act {self.stem_act!r}; known: {', '.join(STEM_ACTS)}")
    t, dt = self.timesteps, self.dtype
    init_scale = float(self.spk.get("norm_init_scale", 1.0))
    c1, c0 = self.widths

    def bcast(z):  # [B, ...] -> [T, B, ...]
      return common.repeat_time(z, t)

    y = common.conv(c1, 3, strides=2, use_bias=False, dtype=dt, name="conv1")(x.astype(dt))
    if self.stem_act == "gelu":
      y = common.batch_norm(train=train, dtype=dt, name="bn1")(y)
      y = common.gelu(y)
      y = common.conv(c0, 3, use_bias=False, dtype=dt, name="conv2")(y)
      y = common.batch_norm(train=train, dtype=dt, name="bn2", scale_init=init_scale)(y)
      y = bcast(y)  # [T, B, H/2, W/2, C0]
    else:
      y = common.batch_norm(train=train, dtype=dt, name="bn1", scale_init=init_scale)(y)
      y = make_spk(self.spk, none_act="gelu", name="act1", dtype=dt)(bcast(y), train=train)
      y = common.conv(c0, 3, use_bias=False, dtype=dt, name="conv2")(common.fold(y))
      y = common.batch_norm(train=train, dtype=dt, name="bn2", scale_init=init_scale)(y)
      y = common.unfold(y, t)
    return make_spk(self.spk, name="spk", dtype=dt)(y, train=train)


class ConvBranch(nn.Module):
  """Spiking ConvNeXt block on [T, B, H, W, C_in] -> [T, B, H', W', C] (stride 2 at entry)."""

  width: int
  stride: int
  spk: Any
  drop_path: float = 0.0
  expansion: int = 4
  dtype: Dtype = jnp.float32

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {
    "shortcut": common.SRC_REAL,
    "dw": "spk_in",
    "fc1": "spk_dw",
    "fc2": "spk_fc1",
  }

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, drop_rate: Any = None) -> jax.Array:
    t, b, h, w, cin = x.shape
    c, dt = self.width, self.dtype
    if c % cin:
      raise ValueError(f"stage width {c} must be a multiple of the input width {cin}")
    if self.stride not in (1, 2):
      raise ValueError(f"stride must be 1 or 2, got {self.stride}")
    init_scale = float(self.spk.get("norm_init_scale", 1.0))

    # Shortcut: identity, or (stage entry) avg-pool plus a 1x1 conv if the width changes.
    sc = x
    if self.stride == 2 or cin != c:
      sc = common.fold(x)
      if self.stride == 2:
        sc = common.avg_pool_same(sc)
      if cin != c:
        sc = common.conv(c, 1, use_bias=True, dtype=dt, name="shortcut")(sc)
      sc = common.unfold(sc, t)

    y = common.batch_norm(train=train, dtype=dt, name="bn_in", scale_init=init_scale)(x)
    y = make_spk(self.spk, name="spk_in", dtype=dt)(y, train=train)
    y = DepthwiseConv(
      7, multiplier=c // cin, strides=self.stride, use_bias=True, dtype=dt, name="dw"
    )(common.fold(y))
    y = common.unfold(y, t)  # [T, B, H', W', C]
    y = common.layer_norm(dtype=dt, name="ln", scale_init=init_scale)(y)
    y = make_spk(self.spk, name="spk_dw", dtype=dt)(y, train=train)
    y = common.dense(self.expansion * c, use_bias=True, dtype=dt, name="fc1")(y)
    y = common.batch_norm(train=train, dtype=dt, name="bn_fc1", scale_init=init_scale)(y)
    y = make_spk(self.spk, none_act="gelu", name="spk_fc1", dtype=dt)(y, train=train)
    y = common.dense(c, use_bias=True, dtype=dt, name="fc2")(y)
    y = common.LayerScale(name="layer_scale")(y)
    return sc + common.DropPath(self.drop_path, name="drop_path")(y, train=train, rate=drop_rate)
