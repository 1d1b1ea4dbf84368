"""One portable file per trained model: its variables, config and class names, without Orbax.

  from spikeatconv_jax import export, inference
  export.export("model.msgpack", inference.load("runs/default"))
  model, variables, config, step = export.load_file("model.msgpack")

The file is one msgpack map (`flax.serialization.msgpack_serialize`): "format" (FORMAT),
"config" (the training config as JSON text), "step", "class_names" (or nil) and "variables"
(params and batch_stats as nested maps of arrays). The loader puts the class names in
`config.dataset.class_names`. Reading it needs flax and msgpack, not Orbax
or TensorFlow; any msgpack reader sees the arrays as flax's ndarray extension type.
"""

from __future__ import annotations

import json
from typing import Any

import flax
import jax
import numpy as np
from etils import epath

FORMAT = "spikeatconv_jax.export/1"


def export(path: str | epath.PathLike, loaded: Any, class_names: list[str] | None = None) -> int:
  """Writes `loaded` (an `inference.Loaded`) to `path`; returns the number of bytes written.

  Args:
    path: the output file (parent directories are created). Local paths and URLs alike.
    loaded: the model, variables, config and step of `inference.load`.
    class_names: the label names to keep with the model; default `inference.class_names` of
      the config (the dataset's tfds metadata), None when it has no names.
  """
  from spikeatconv_jax import checkpoint as ckpt_lib
  from spikeatconv_jax import inference

  if class_names is None:
    names = inference.class_names(loaded.config)
    class_names = None if names[0] == "class 0" else names
  variables = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), loaded.variables)
  payload = {
    "format": FORMAT,
    "config": json.dumps(ckpt_lib.config_to_dict(loaded.config), sort_keys=True),
    "step": int(loaded.step),
    "class_names": None if class_names is None else [str(n) for n in class_names],
    "variables": flax.serialization.to_state_dict(variables),
  }
  data = flax.serialization.msgpack_serialize(payload)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.rename(path)
  return len(data)


def read(path: str | epath.PathLike) -> dict[str, Any]:
  """The raw contents of an exported file: format, config (a dict), step, class_names and
  variables (numpy arrays).

  Raises:
    ValueError: the file is not an export of this package (or of an unknown version).
  """
  path = epath.Path(path)
  try:
    payload = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # noqa: BLE001 - msgpack raises several types for foreign bytes
    raise ValueError(f"{path} is not an exported model file: {type(e).__name__}: {e}") from None
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    raise ValueError(f"{path} is not an exported model file of format {FORMAT!r} (found {found!r})")
  payload = dict(payload)
  payload["config"] = json.loads(payload["config"])
  return payload


def load_file(path: str | epath.PathLike, *, step: int | None = None, device=None):
  """An `inference.Loaded` from an exported file, the arrays on `device` (default: the first
  local device); the model is built for that device's platform.

  Raises:
    ValueError: not an exported file, a step other than the one it holds, or variables that
      do not fit the model its config describes.
  """
  from spikeatconv_jax import inference

  payload = read(path)
  if step is not None and step != payload["step"]:
    raise ValueError(f"{path} holds step {payload['step']}, not step {step}")
  config = inference.config_from_dict(payload["config"])
  if payload.get("class_names"):
    config.dataset.class_names = list(payload["class_names"])
  device = device or jax.local_devices()[0]
  model = inference.build_model(config.model, platform=device.platform)
  variables = payload["variables"]
  check_shapes(model, config, variables, where=str(path))
  variables = jax.device_put(variables, device)
  return inference.Loaded(model, variables, config, int(payload["step"]))


def check_shapes(model, config, variables: dict, where: str) -> None:
  """Raises ValueError listing the arrays whose names or shapes differ from the model's."""
  from spikeatconv_jax import inference

  size = int(config.dataset.image_size)
  have = inference.variable_shapes({k: variables.get(k, {}) for k in ("params", "batch_stats")})
  wanted = inference.init_shapes(model, size, inference.input_channels(model, size, have))
  want = inference.variable_shapes({k: wanted.get(k, {}) for k in ("params", "batch_stats")})
  lines = [
    f"{k}: file {have.get(k, '<absent>')} != model {want.get(k, '<absent>')}"
    for k in sorted(set(have) | set(want))
    if have.get(k) != want.get(k)
  ]
  if lines:
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    raise ValueError(
      f"{where}: the variables do not fit the model of its config ({len(lines)} arrays "
      "differ):\n  " + "\n  ".join(shown)
    )
