"""Shared config helpers: config-string parsing and the model ConfigDict (DESIGN.md §13).

Config files take one string argument, as in big_vision::

  python train.py --config configs/imagenet.py:variant=base,spk=mbpl,timesteps=2

`parse_arg` turns ``variant=base,spk=mbpl,timesteps=2`` into a ConfigDict whose
values are typed from the defaults, and fails early on a key it does not know.
"""

from __future__ import annotations

import ast

import ml_collections
from ml_collections import config_dict

from spikeatconv_jax.snn.spk import DEFAULT_THRESHOLDS


def _convert(value: str, default):
  """Converts a config-string value to the type of its default."""
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", "on"):
      return True
    if value.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  if default is None or isinstance(default, tuple | list):
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2=v2"`` (or a bare ``"v"`` for the first key) against `defaults`.

  Tuple values use ``+`` as separator inside the string (``thresholds=0.2+1+2+4``)
  since ``,`` separates keys.

  Raises:
    ValueError: for an unknown key or a value that does not convert.
  """
  out = dict(defaults)
  if arg:
    for i, item in enumerate(arg.split(",")):
      item = item.strip()
      if not item:
        continue
      if "=" not in item:
        if i != 0 or not defaults:
          raise ValueError(f"config string item {item!r} is not of the form key=value")
        key, value = next(iter(defaults)), item
      else:
        key, value = (s.strip() for s in item.split("=", 1))
      if key not in defaults:
        raise ValueError(
          f"unknown config-string key {key!r}; known keys: {', '.join(sorted(defaults))}"
        )
      default = defaults[key]
      if isinstance(default, tuple) and "+" in value:
        value = tuple(float(v) for v in value.split("+"))
      else:
        try:
          value = _convert(value, default)
        except ValueError as e:
          raise ValueError(f"config-string key {key!r}: {e}") from None
      out[key] = value
  return ml_collections.ConfigDict(out)


def spk_config(kind: str = "mbpl", **overrides) -> ml_collections.ConfigDict:
  """The `model.spk` ConfigDict (DESIGN.md §2-§3, §13 names)."""
  c = ml_collections.ConfigDict()
  c.kind = kind  # sl | rl | mbpl | hsl | dcl | none
  c.thresholds = DEFAULT_THRESHOLDS.get(kind, ())
  c.tau = 2.0
  c.surrogate = "atan"
  c.alpha = config_dict.placeholder(float)  # None: the surrogate's default
  # float: hard reset to that value; None: soft reset. A typed reference so None stays settable.
  c.v_reset = config_dict.FieldReference(0.0, field_type=float)
  c.decay_input = True
  c.detach_reset = True
  c.rl_mode = "cascade"  # cascade (spec) | literal
  c.mbpl_merge = "dwconv"  # dwconv (spec) | sum | convnext
  c.dcl_norm = False
  c.norm_init_scale = 1.0  # init scale of the norm right before an SPK (DESIGN.md §3)
  c.update(overrides)
  return c


def model_config(
  name: str = "spikeatconv",
  variant: str = "nano",
  num_classes: int = 1000,
  timesteps: int = 1,
  spk: str = "mbpl",
  attention: str = "sisa",
  **overrides,
) -> ml_collections.ConfigDict:
  """The `config.model` ConfigDict (DESIGN.md §13)."""
  m = ml_collections.ConfigDict()
  m.name = name  # spikeatconv | resnet18_cifar
  m.variant = variant  # nano | tiny | base | large (spikeatconv only)
  m.num_classes = num_classes
  m.timesteps = timesteps
  # network: T steps through the whole net (DESIGN.md §1). neuron: the net runs at T=1 and each
  # LIF repeats its input `timesteps` times, emitting its mean spike rate (ablation switch).
  m.time_mode = "network"
  # True: the literal "each FFN linear is followed by SPK" (BN -> SPK after W2, DESIGN.md §4).
  m.spk_after_branch_out = False
  m.drop_path = config_dict.placeholder(float)  # None: the variant's default (DESIGN.md §7)
  m.dtype = "float32"  # compute dtype; params and membrane stay float32
  m.remat = False  # per-block jax.checkpoint
  # What a rematerialised block keeps besides its input (read when remat=True): "full" nothing
  # (the backward recomputes the whole block), "save_spikes" every SPK output (it recomputes
  # each layer's conv/norm/LIF from the spikes before it: more memory than "full", less compute).
  m.remat_policy = "full"
  # nn.scan over blocks 1..depth-1 of each stage: compile time stops growing with depth;
  # parameter names are the same either way.
  m.scan_blocks = False
  m.stem_act = "gelu"  # gelu | spk
  # The hook table the layers trace with (spikeatconv_jax.layers.ops): "xla" (portable: what GPUs
  # run), "xla_cpu" (the XLA:CPU wing), "pallas_tpu" (portable + MBPL's merge as Pallas TPU
  # kernels), or "auto": "xla_cpu" on CPUs, "pallas_tpu" on TPUs, else "xla". Parameters are the
  # same either way.
  m.kernels = "auto"
  m.spk = spk_config(spk)
  m.attention = ml_collections.ConfigDict()
  m.attention.kind = attention  # sisa | bdsa | softmax
  m.attention.block_attention = False
  m.attention.partition = 7  # P; stages whose map is smaller use their map size
  m.attention.head_dim = 32
  m.attention.scale = 0.125
  m.update(overrides)
  return m
