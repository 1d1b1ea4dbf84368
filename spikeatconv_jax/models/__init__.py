"""Model factory: `build(model_config, platform=)` and `validate(model_config, image_size)`.

`model.name` picks the family: "spikeatconv" (SpikeAtConv nano/tiny/base/large and its
spike-free version) or "resnet18_cifar" (the CIFAR-100 ablation net, DESIGN.md §8).

`model.kernels` picks the hook table the layers trace with (`layers.ops`): "xla" (portable: what
GPUs run), "xla_cpu" (the XLA:CPU wing), "pallas_tpu" (portable, with MBPL's merge as Pallas TPU
kernels), or "auto" (default): "xla_cpu" when the target platform is cpu, "pallas_tpu" on tpu,
else "xla". `build` resolves "auto" from its `platform` argument (callers with a
mesh pass `mesh.devices.flat[0].platform`), so a CPU host can trace what a TPU runs.

Both are called as `module.apply(variables, images [B, H, W, C], train=bool,
rngs={"dropout": key}, mutable=["batch_stats", "spikes"])` -> logits [B, classes] float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from spikeatconv_jax.layers import ops
from spikeatconv_jax.layers import remat as remat_lib
from spikeatconv_jax.layers.attention import ATTENTION_KINDS
from spikeatconv_jax.layers.convnext import STEM_ACTS
from spikeatconv_jax.models.resnet import ResNet18
from spikeatconv_jax.models.spikeatconv import DTYPES, VARIANTS, SpikeAtConv, stage_map_sizes
from spikeatconv_jax.snn.spk import MBPL_MERGES, RL_MODES, SPK_KINDS

MODEL_NAMES = ("spikeatconv", "resnet18_cifar")
TIME_MODES = ("network", "neuron")


def _frozen(cfg: Any) -> ml_collections.FrozenConfigDict:
  # Linen module attributes must be immutable (and hashable for nn.remat).
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return cfg
  if isinstance(cfg, ml_collections.ConfigDict):
    return ml_collections.FrozenConfigDict(cfg)
  return ml_collections.FrozenConfigDict(ml_collections.ConfigDict(dict(cfg)))


def valid_image_sizes(partition: int, limit: int = 512) -> list[int]:
  """Image sizes up to `limit` whose four stage maps the partition size divides."""
  out = []
  for size in range(8, limit + 1):
    if all(m % min(partition, m) == 0 for m in stage_map_sizes(size)):
      out.append(size)
  return out


def check_config(cfg: Any) -> None:
  """Config checks that do not need the image size (raise ValueError)."""
  name = cfg.get("name", "spikeatconv")
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model.name {name!r}; known: {', '.join(MODEL_NAMES)}")
  t = cfg.get("timesteps", 1)
  if not isinstance(t, int) or t < 1:
    raise ValueError(f"model.timesteps must be an integer >= 1, got {t!r}")
  if cfg.get("time_mode", "network") not in TIME_MODES:
    raise ValueError(f"unknown model.time_mode {cfg.time_mode!r}; known: {', '.join(TIME_MODES)}")
  if cfg.get("kernels", "auto") not in ops.KERNELS:
    raise ValueError(f"unknown model.kernels {cfg.kernels!r}; known: {', '.join(ops.KERNELS)}")
  remat_lib.check_policy(cfg.get("remat_policy", "full"))
  if cfg.get("dtype", "float32") not in DTYPES:
    raise ValueError(f"unknown model.dtype {cfg.get('dtype')!r}; known: {', '.join(DTYPES)}")
  spk = cfg.spk
  if spk.kind not in SPK_KINDS:
    raise ValueError(f"unknown model.spk.kind {spk.kind!r}; known: {', '.join(SPK_KINDS)}")
  if spk.get("rl_mode", "cascade") not in RL_MODES:
    raise ValueError(f"unknown model.spk.rl_mode {spk.rl_mode!r}; known: {', '.join(RL_MODES)}")
  if spk.get("mbpl_merge", "dwconv") not in MBPL_MERGES:
    raise ValueError(
      f"unknown model.spk.mbpl_merge {spk.mbpl_merge!r}; known: {', '.join(MBPL_MERGES)}"
    )
  if spk.kind in ("rl", "hsl", "dcl") and len(spk.get("thresholds", ()) or ()) not in (0, 2):
    raise ValueError(f"model.spk.kind={spk.kind!r} needs two thresholds, got {spk.thresholds}")
  if spk.kind == "sl" and len(spk.get("thresholds", ()) or ()) > 1:
    raise ValueError(f"model.spk.kind='sl' takes one threshold, got {spk.thresholds}")
  if name == "resnet18_cifar":
    return
  if cfg.variant not in VARIANTS:
    raise ValueError(f"unknown model.variant {cfg.variant!r}; known: {', '.join(VARIANTS)}")
  att = cfg.attention
  if att.kind not in ATTENTION_KINDS:
    raise ValueError(
      f"unknown model.attention.kind {att.kind!r}; known: {', '.join(ATTENTION_KINDS)}"
    )
  if cfg.get("stem_act", "gelu") not in STEM_ACTS:
    raise ValueError(f"unknown model.stem_act {cfg.stem_act!r}; known: {', '.join(STEM_ACTS)}")
  if not isinstance(att.partition, int) or att.partition < 1:
    raise ValueError(f"model.attention.partition must be an integer >= 1, got {att.partition!r}")
  for d in VARIANTS[cfg.variant]["dims"]:
    if d % att.head_dim:
      raise ValueError(
        f"variant {cfg.variant!r} width {d} is not a multiple of head_dim {att.head_dim}"
      )
  if spk.kind in ("hsl", "dcl") and min(VARIANTS[cfg.variant]["dims"]) % 2:
    raise ValueError(f"SPK kind {spk.kind!r} needs even widths")
  dp = cfg.get("drop_path", None)
  if dp is not None and not 0.0 <= dp < 1.0:
    raise ValueError(f"model.drop_path must be in [0, 1), got {dp}")


def validate(model_config: Any, image_size: int | tuple[int, int]) -> None:
  """Raises a clear ValueError, before any compile, for a config/image size that cannot work.

  Args:
    model_config: the `config.model` ConfigDict.
    image_size: int (square) or (H, W).
  """
  check_config(model_config)
  if isinstance(image_size, int):
    h = w = image_size
  else:
    h, w = image_size
  if h != w:
    raise ValueError(f"square images only, got {h}x{w}")
  if h < 8:
    raise ValueError(f"image size {h} is too small (need >= 8)")
  if model_config.get("name", "spikeatconv") != "spikeatconv":
    return
  p = model_config.attention.partition
  maps = stage_map_sizes(h)
  bad = [m for m in maps if m % min(p, m)]
  if bad:
    sizes = valid_image_sizes(p)
    near = [s for s in sizes if abs(s - h) <= 64][:12] or sizes[:12]
    ok_p = [q for q in range(1, max(maps) + 1) if all(m % min(q, m) == 0 for m in maps)]
    raise ValueError(
      f"image size {h}: stage maps {maps} are not divisible by the partition size "
      f"min(P={p}, map) at maps {bad}. Image sizes that work with P={p} include {near} "
      f"(any size whose stage maps are multiples of P, or smaller than P); partition sizes that "
      f"work for {h} px: {ok_p}"
    )


def network_timesteps(model_config: Any) -> int:
  """Time steps the network runs: `timesteps`, or 1 under `time_mode='neuron'`."""
  if model_config.get("time_mode", "network") == "neuron":
    return 1
  return int(model_config.get("timesteps", 1))


def _apply_time_mode(cfg: Any) -> Any:
  """time_mode='neuron': the net at T=1, every SPK repeating its input `timesteps` times."""
  if cfg.get("time_mode", "network") != "neuron" or int(cfg.timesteps) == 1:
    return cfg
  out = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  out.spk.neuron_timesteps = int(cfg.timesteps)
  out.timesteps = 1
  return out


def build(model_config: Any, *, platform: str | None = None) -> nn.Module:
  """The Flax module for a `config.model` ConfigDict (DESIGN.md §13 names).

  Args:
    model_config: the `config.model` ConfigDict.
    platform: the platform of the devices the model will run on ("cpu", "gpu", "tpu"), which
      resolves `model.kernels="auto"`; None means `jax.devices()[0].platform`. The resolved
      table is stored in the module's config (`module.cfg.kernels`).
  """
  check_config(model_config)
  cfg = _apply_time_mode(model_config)
  kernels = ops.resolve(cfg.get("kernels", "auto"), platform)
  cfg = _frozen(_with_field(cfg, "kernels", kernels))
  if cfg.get("name", "spikeatconv") == "resnet18_cifar":
    return ResNet18(cfg)
  return SpikeAtConv(cfg)


def _with_field(cfg: Any, key: str, value: Any) -> ml_collections.ConfigDict:
  """A copy of `cfg` with `cfg[key] = value` (added if missing)."""
  out = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  with out.unlocked():
    out[key] = value
  return out


__all__ = [
  "MODEL_NAMES",
  "TIME_MODES",
  "VARIANTS",
  "build",
  "check_config",
  "network_timesteps",
  "valid_image_sizes",
  "validate",
]
