"""SpikeAtConv (DESIGN.md §5-§7): spiking ConvNeXt + spike-driven grid attention, MaxxViT-V2 style.

Images [B, H, W, 3] are repeated over T (direct encoding); the stem emits spikes [T, B, H/2,
W/2, C0]; four stages of blocks (ConvNeXt branch, optional window attention + FFN, grid attention
+ FFN) downsample by 2 at each stage entry; the head is GAP -> LN -> Linear per step, and the
logits are the mean over T (float32).

`spk.kind='none'` with `attention.kind='softmax'` is the spike-free MaxxViT-V2-style ANN.

Module paths (and so sown spike paths and parameter names) are "stem/...",
"stage{s}/block{b}/{conv,block_attn,block_ffn,grid_attn,grid_ffn}/...", "head_ln", "head";
they do not change with `model.remat` or `model.scan_blocks`.

`model.scan_blocks` runs blocks 1..depth-1 of each stage (identical in shape) as one `nn.scan`,
so the compiled graph holds one copy of the block per stage instead of `depth`; XLA's compile
time then stops growing with depth (base and large). The scanned blocks keep their variables
stacked on a leading axis inside the scan only: `nn.map_variables` presents them to the outside
as the usual "block{b}" entries (parameters, BatchNorm statistics and sown spike rates alike),
so checkpoints, weight-decay masks, sharding rules and rate reports are the same with it on or
off. (Initial values differ, since the scan splits the init RNG per block.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from spikeatconv_jax.layers import common, ops
from spikeatconv_jax.layers import remat as remat_lib
from spikeatconv_jax.layers.attention import FFN, Attention
from spikeatconv_jax.layers.convnext import ConvBranch, Stem

# name -> (dims, depths, stem widths, default drop_path). heads = dim / head_dim.
VARIANTS = {
  "nano": dict(dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), stem=(16, 32), drop_path=0.0),
  "tiny": dict(dims=(64, 128, 256, 512), depths=(1, 3, 6, 1), stem=(32, 64), drop_path=0.1),
  "base": dict(dims=(128, 256, 512, 1024), depths=(2, 6, 12, 2), stem=(64, 128), drop_path=0.3),
  "large": dict(dims=(160, 320, 640, 1280), depths=(2, 6, 16, 2), stem=(80, 160), drop_path=0.4),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def stage_map_sizes(image_size: int) -> list[int]:
  """Stage feature-map sizes: stem stride 2, then stride 2 at every stage entry (SAME, ceil)."""
  s = -(-image_size // 2)
  out = []
  for _ in range(4):
    s = -(-s // 2)
    out.append(s)
  return out


class SpikeAtConvBlock(nn.Module):
  """ConvNeXt branch, optional window attention + FFN, grid attention + FFN."""

  width: int
  stride: int
  cfg: Any  # model ConfigDict
  drop_path: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, drop_rate: Any = None) -> jax.Array:
    spk, att = self.cfg.spk, self.cfg.attention
    kw = dict(drop_path=self.drop_path, dtype=self.dtype)
    dr = dict(train=train, drop_rate=drop_rate)  # drop_rate: a traced override under nn.scan
    x = ConvBranch(self.width, self.stride, spk, name="conv", **kw)(x, **dr)
    units = ("block", "grid") if att.block_attention else ("grid",)
    for part in units:
      x = Attention(
        att.kind,
        part,
        att.partition,
        att.head_dim,
        float(att.scale),
        spk,
        name=f"{part}_attn",
        **kw,
      )(x, **dr)
      x = FFN(
        spk, spk_out=bool(self.cfg.get("spk_after_branch_out", False)), name=f"{part}_ffn", **kw
      )(x, **dr)
    return x


class _ScanBlock(SpikeAtConvBlock):
  """SpikeAtConvBlock with nn.scan's (carry, x) -> (carry, y) signature; x = its drop rate."""

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array, train: bool):
    return super().__call__(x, train, drop_rate), None


SCANNED = "blocks"  # the stacked view of blocks 1..depth-1, seen only inside Stage


def _stack_blocks(depth: int):
  """{block0, block1, ...} -> {block0, blocks: stacked block1..} for every collection."""

  def per_collection(tree):
    tree = dict(tree)
    rest = [tree.pop(f"block{b}") for b in range(1, depth) if f"block{b}" in tree]
    if rest:
      tree[SCANNED] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *rest)
    return tree

  return lambda cols: {k: per_collection(v) for k, v in cols.items()}


def _unstack_blocks(depth: int):
  """The inverse of _stack_blocks."""

  def per_collection(tree):
    tree = dict(tree)
    if SCANNED in tree:
      stacked = tree.pop(SCANNED)
      for b in range(1, depth):
        tree[f"block{b}"] = jax.tree_util.tree_map(lambda a, i=b - 1: a[i], stacked)
    return tree

  return lambda cols: {k: per_collection(v) for k, v in cols.items()}


def scans_blocks(cfg: Any, depth: int) -> bool:
  """Whether a stage of `depth` blocks runs blocks 1..depth-1 under nn.scan (at least two)."""
  return bool(cfg.get("scan_blocks", False)) and depth >= 3


def stage_class(cfg: Any, depth: int) -> type[nn.Module]:
  """Stage, or (when it scans) Stage behind the stacked/unstacked variable view."""
  if not scans_blocks(cfg, depth):
    return Stage
  return nn.map_variables(
    Stage,
    mapped_collections=True,
    trans_in_fn=_stack_blocks(depth),
    trans_out_fn=_unstack_blocks(depth),
    mutable=True,
  )


class Stage(nn.Module):
  """`depth` blocks; the first has stride 2 (and changes the width)."""

  width: int
  depth: int
  cfg: Any
  drop_paths: tuple[float, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    use_remat = bool(self.cfg.get("remat", False))
    policy = remat_lib.policy(self.cfg.get("remat_policy", "full"))
    block_cls = SpikeAtConvBlock
    if use_remat:
      # static_argnums counts self: `train` (argument 2) must stay a Python bool.
      block_cls = remat_lib.remat(SpikeAtConvBlock, static_argnums=(2,), policy=policy)
    scan = scans_blocks(self.cfg, self.depth)
    for b in range(1 if scan else self.depth):
      x = block_cls(
        self.width,
        2 if b == 0 else 1,
        self.cfg,
        self.drop_paths[b],
        dtype=self.dtype,
        name=f"block{b}",  # explicit: a lifted remat would otherwise rename the module
      )(x, train)
    if scan:
      # Plain nn.remat inside the scan: the loop itself orders each step's recomputation.
      body = _ScanBlock
      if use_remat:
        body = nn.remat(_ScanBlock, static_argnums=(3,), prevent_cse=False, policy=policy)
      blocks = nn.scan(
        body,
        variable_axes={True: 0},  # every collection: params, batch_stats, spikes
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=self.depth - 1,
      )
      rates = jnp.asarray(self.drop_paths[1:], jnp.float32)
      # drop_path=0 here: each step takes its own rate from `rates`.
      x, _ = blocks(self.width, 1, self.cfg, 0.0, dtype=self.dtype, name=SCANNED)(x, rates, train)
    return x


class SpikeAtConv(nn.Module):
  """The full classifier; `cfg` is the `config.model` ConfigDict (DESIGN.md §13)."""

  cfg: Any

  ENERGY_SOURCES: ClassVar[dict[str, str]] = {"head": common.SRC_REAL}

  @nn.compact
  @ops.uses_config_kernels  # the hook table of `cfg.kernels` (layers.ops)
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.cfg
    v = VARIANTS[cfg.variant]
    dtype = DTYPES[cfg.get("dtype", "float32")]
    t = int(cfg.timesteps)
    rate = cfg.drop_path if cfg.get("drop_path", None) is not None else v["drop_path"]
    rates = common.drop_path_rates(float(rate), v["depths"])

    # Under remat the stem is rematerialised too: its full-resolution activations (T-fold after
    # the first SPK) would otherwise be the largest residuals kept for the backward pass.
    stem_cls = Stem
    use_remat = bool(cfg.get("remat", False))
    if use_remat:
      policy = remat_lib.policy(cfg.get("remat_policy", "full"))
      stem_cls = remat_lib.remat(Stem, static_argnums=(2,), policy=policy)
    with remat_lib.rematerialised(use_remat):  # the stem and every block, as wrapped here
      x = stem_cls(
        tuple(v["stem"]),
        t,
        cfg.spk,
        stem_act=cfg.get("stem_act", "gelu"),
        dtype=dtype,
        name="stem",
      )(images, train)  # [T, B, H/2, W/2, C0]
      for s, (width, depth) in enumerate(zip(v["dims"], v["depths"], strict=True)):
        stage = stage_class(cfg, depth)
        x = stage(width, depth, cfg, tuple(rates[s]), dtype=dtype, name=f"stage{s}")(x, train)
    x = jnp.mean(x, axis=(2, 3))  # GAP: [T, B, C]
    x = common.layer_norm(dtype=dtype, name="head_ln")(x)
    logits = common.dense(cfg.num_classes, use_bias=True, dtype=dtype, name="head")(x)
    return jnp.mean(logits.astype(jnp.float32), axis=0)  # [B, classes]
