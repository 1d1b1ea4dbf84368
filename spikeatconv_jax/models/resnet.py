"""CIFAR-style ResNet-18 whose 17 activations are SPK blocks (DESIGN.md §8).

Conv3×3/1 (64) -> BN -> act; four stages of two BasicBlocks (64/128/256/512, strides 1/2/2/2),
each conv3×3 -> BN -> act -> conv3×3 -> BN (+ identity or 1×1 conv -> BN shortcut) -> act;
GAP -> FC. The image is repeated over T (the stem conv + BN run once and are broadcast: they do
not depend on t), BN statistics are over T·B·H·W, and the logits are the mean over T.

Activations: the configured SPK block (`model.spk`). `spk.kind='none'` gives the ANN row of
Table 1 with ReLU at all 17 sites (SpikeAtConv maps 'none' to GELU/identity instead; the CIFAR
ANN baseline is a ReLU ResNet).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from spikeatconv_jax.layers import common, ops
from spikeatconv_jax.layers import remat as remat_lib
from spikeatconv_jax.models.spikeatconv import DTYPES
from spikeatconv_jax.snn.spk import make_spk

WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


def _act(cfg: Any, name: str, dtype: Any):
  """The activation site: ReLU for the ANN (kind 'none'), else the SPK block."""
  if cfg.spk.kind == "none":
    return lambda x, train: nn.relu(x)
  return make_spk(cfg.spk, name=name, dtype=dtype)


class BasicBlock(nn.Module):
  """[T, B, H, W, C_in] -> [T, B, H/stride, W/stride, C]."""

  width: int
  stride: int
  cfg: Any
  dtype: Any = jnp.float32

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {
    "conv1": common.SRC_INPUT + "|" + common.SRC_REAL,
    "conv2": "spk1|" + common.SRC_REAL,
    "shortcut_conv": common.SRC_INPUT + "|" + common.SRC_REAL,
  }

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    t = x.shape[0]
    dt = self.dtype
    init_scale = float(self.cfg.spk.get("norm_init_scale", 1.0))
    xf = common.fold(x)  # [T*B, H, W, C_in]
    y = common.conv(self.width, 3, strides=self.stride, use_bias=False, dtype=dt, name="conv1")(xf)
    y = common.batch_norm(train=train, dtype=dt, name="bn1", scale_init=init_scale)(y)
    y = _act(self.cfg, "spk1", dt)(common.unfold(y, t), train=train)
    y = common.conv(self.width, 3, use_bias=False, dtype=dt, name="conv2")(common.fold(y))
    y = common.batch_norm(train=train, dtype=dt, name="bn2", scale_init=init_scale)(y)
    sc = xf
    if self.stride != 1 or x.shape[-1] != self.width:
      sc = common.conv(
        self.width, 1, strides=self.stride, use_bias=False, dtype=dt, name="shortcut_conv"
      )(xf)
      sc = common.batch_norm(train=train, dtype=dt, name="shortcut_bn", scale_init=init_scale)(sc)
    return _act(self.cfg, "spk2", dt)(common.unfold(y + sc, t), train=train)


class _Stage(nn.Module):
  width: int
  stride: int
  cfg: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    block_cls = BasicBlock
    use_remat = bool(self.cfg.get("remat", False))
    if use_remat:
      policy = remat_lib.policy(self.cfg.get("remat_policy", "full"))
      block_cls = remat_lib.remat(BasicBlock, static_argnums=(2,), policy=policy)
    with remat_lib.rematerialised(use_remat):
      for b in range(BLOCKS_PER_STAGE):
        stride = self.stride if b == 0 else 1
        x = block_cls(self.width, stride, self.cfg, dtype=self.dtype, name=f"block{b}")(x, train)
    return x


class _Stem(nn.Module):
  cfg: Any
  dtype: Any = jnp.float32

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {"conv": common.SRC_IMAGE}

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    t, dt = int(self.cfg.timesteps), self.dtype
    init_scale = float(self.cfg.spk.get("norm_init_scale", 1.0))
    y = common.conv(WIDTHS[0], 3, use_bias=False, dtype=dt, name="conv")(images.astype(dt))
    y = common.batch_norm(train=train, dtype=dt, name="bn", scale_init=init_scale)(y)
    y = common.repeat_time(y, t)  # [T, B, H, W, 64]
    return _act(self.cfg, "spk", dt)(y, train=train)


class ResNet18(nn.Module):
  """CIFAR ResNet-18 over T steps; `cfg` is the `config.model` ConfigDict."""

  cfg: Any

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {"head": common.SRC_REAL}

  @nn.compact
  @ops.uses_config_kernels  # the hook table of `cfg.kernels` (layers.ops)
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    dt = DTYPES[self.cfg.get("dtype", "float32")]
    x = _Stem(self.cfg, dtype=dt, name="stem")(images, train=train)
    for s, (width, stride) in enumerate(zip(WIDTHS, STRIDES, strict=True)):
      x = _Stage(width, stride, self.cfg, dtype=dt, name=f"stage{s}")(x, train)
    x = jnp.mean(x, axis=(2, 3))  # GAP: [T, B, 512]
    logits = common.dense(self.cfg.num_classes, use_bias=True, dtype=dt, name="head")(x)
    return jnp.mean(logits.astype(jnp.float32), axis=0)
