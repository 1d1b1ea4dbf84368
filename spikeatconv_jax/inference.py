"""A trained model outside the training loop: load a checkpoint, classify images, read spikes.

  from spikeatconv_jax import inference
  model, variables, config, step = inference.load("runs/default")
  logits = model.apply(variables, images, train=False)          # images [B, H, W, C]
  out = inference.predict(model, variables, images)             # probs, rates per image

`load` takes a training workdir (its config.json and checkpoints/), its checkpoints/ directory,
one step directory (checkpoints/<step>), or a file written by `export.export` (read without
Orbax). The arrays land on one local device, or on a mesh the caller passes, whatever mesh the
checkpoint was trained on. The saved model config is compared with the config first, and a
difference is the checkpoint module's ValueError listing the fields.

Per-image firing rates and spike maps come from the LIF outputs of every SPK site, captured with
Flax's `capture_intermediates` in the same forward pass as the logits: site rates are means
over positions and channels per LIF branch and time step ([K, T], as the sown "spikes"
collection holds them for a whole batch).
"""

from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from spikeatconv_jax import models
from spikeatconv_jax.snn.spk import SPK

# The SPK method whose output is the K LIF branches' spikes (a tuple of [T, B, ..., C] arrays);
# every SPK kind calls it once per LIF population it fires.
LIF_METHOD = "_lifs"


class Loaded(NamedTuple):
  """A model ready to apply: `model.apply(variables, images, train=False)`."""

  model: nn.Module
  variables: dict[str, Any]  # {"params": ..., "batch_stats": ...} (no batch_stats if none)
  config: ml_collections.ConfigDict  # the full training config
  step: int  # the checkpoint's training step


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from the JSON dict of `checkpoint.config_to_dict` (config.json)."""
  return ml_collections.ConfigDict(d)


def build_model(model_config: Any, platform: str | None = None) -> nn.Module:
  """`models.build` for the platform the variables live on (None: the default device's), so
  `model.kernels="auto"` picks the forms of the devices that run it, not of those that
  trained it."""
  return models.build(model_config, platform=platform)


def variables_of(params: Any, batch_stats: Any) -> dict[str, Any]:
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def _step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and path.is_dir()


def _resolve(path: epath.Path, step: int | None) -> tuple[epath.Path, epath.Path, int | None]:
  """(workdir, checkpoints directory, step or None) of a workdir / checkpoints / step path."""
  if (path / "checkpoints").is_dir():
    return path, path / "checkpoints", step
  if _step_dir(path):
    if step is not None and step != int(path.name):
      raise ValueError(f"{path} is the checkpoint of step {path.name}, not of step {step}")
    return path.parent.parent, path.parent, int(path.name)
  if path.is_dir() and any(_step_dir(p) for p in path.iterdir()):
    return path.parent, path, step
  raise FileNotFoundError(
    f"{path} is neither a training workdir (with checkpoints/), a checkpoints directory, a "
    "checkpoint step directory nor an exported model file"
  )


def variable_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/stem/conv1/kernel": shape} for a pytree of arrays, ShapeDtypeStructs or Orbax
  metadata (dicts, flax structs and dataclass nodes alike)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
      out["/".join(names)] = tuple(shape)
  return out


def init_shapes(model: nn.Module, image_size: int, channels: int) -> dict[str, Any]:
  """The model's variables as ShapeDtypeStructs, for [image_size, image_size, channels] inputs
  (traced, not computed)."""
  images = jax.ShapeDtypeStruct((2, image_size, image_size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def input_channels(model: nn.Module, image_size: int, saved: dict[str, tuple[int, ...]]) -> int:
  """The input channel count whose parameter shapes are those of `saved` (`variable_shapes`
  of the stored variables); 3 when none fits (the shape check then names what differs).

  The parameter shapes depend on the input channels (1 for Fashion-MNIST, 3 for RGB), which
  the config does not name.
  """
  for channels in (3, 1, 4, 2):
    params = variable_shapes({"params": init_shapes(model, image_size, channels)["params"]})
    if all(saved.get(k) == v for k, v in params.items()):
      return channels
  return 3


def _abstract_state(config, model, ckpt, step: int):
  """The TrainState's ShapeDtypeStructs (the restore target) for the checkpoint's input."""
  from spikeatconv_jax import optim
  from spikeatconv_jax.train import state as state_lib

  # The optimizer state's structure (not its values) is part of the restore target; the
  # schedule's length does not change it, so any valid length will do.
  total = optim.warmup_steps(config, 1) + 1
  tx = optim.make_optimizer(config, total_steps=total, steps_per_epoch=1)[0]
  size = int(config.dataset.image_size)
  saved = variable_shapes(ckpt.manager.item_metadata(int(step))["state"])
  channels = input_channels(model, size, saved)
  return state_lib.abstract_state(model, tx, (size, size, channels), int(config.seed))


def load(
  path: str | epath.PathLike,
  step: int | None = None,
  *,
  config: ml_collections.ConfigDict | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> Loaded:
  """Loads a trained model: the module, its variables, the training config and the step.

  Args:
    path: a training workdir, its checkpoints/ directory, a checkpoints/<step> directory, or
      a file written by `export.export`. Local paths and URLs (gs://...) alike.
    step: the checkpoint step; default the latest (or the step of a step directory).
    config: the training config; default the workdir's config.json (written by train.py).
    mesh: restore onto this mesh (parameters sharded as in training); default one local
      device.

  Raises:
    FileNotFoundError: no checkpoint (or not that step), or no config.json and no `config`.
    ValueError: the checkpoint was made with another model config, or other array shapes.
  """
  from spikeatconv_jax import checkpoint as ckpt_lib
  from spikeatconv_jax import sharding as sharding_lib

  path = epath.Path(path)
  if path.is_file():
    from spikeatconv_jax import export

    if config is not None:
      raise ValueError(f"{path} is an exported model file: it carries its own config")
    return export.load_file(path, step=step, device=None if mesh is None else mesh.devices.flat[0])
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  workdir, directory, step = _resolve(path, step)
  if config is None:
    config_file = workdir / "config.json"
    if not config_file.exists():
      raise FileNotFoundError(f"no config.json in {workdir}; pass the training config")
    config = config_from_dict(json.loads(config_file.read_text()))
  models.validate(config.model, config.dataset.image_size)

  ckpt = ckpt_lib.Checkpointer(str(directory), read_only=True, asynchronous=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
    ckpt.check_model_config(step, config.model)  # before tracing a model of another shape

    if mesh is None:
      mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    model = build_model(config.model, platform=mesh.devices.flat[0].platform)
    shapes = _abstract_state(config, model, ckpt, step)
    from spikeatconv_jax.train import state as state_lib

    shardings = sharding_lib.state_shardings(shapes, mesh)
    state, _ = ckpt.restore(step, state_lib.abstract_with_shardings(shapes, shardings))
  finally:
    ckpt.close()
  return Loaded(model, variables_of(state.params, state.batch_stats), config, int(step))


# ----------------------------------------------------------------------------------------------
# Forward passes with per-image rates and spike maps.
# ----------------------------------------------------------------------------------------------


def _capture_lifs(module: nn.Module, method_name: str) -> bool:
  return isinstance(module, SPK) and method_name == LIF_METHOD


def site_spikes(intermediates: Any) -> dict[str, list[jax.Array]]:
  """{"stage0/block0/conv/spk_in": [S_1, ..., S_K]} (each [T, B, ..., C]) from the captured
  intermediates, sites in network order."""
  out: dict[str, list[jax.Array]] = {}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  for path, calls in flat.items():
    if path[-1] != LIF_METHOD:
      continue
    site = "/".join(path[:-1])
    for branches in calls if isinstance(calls, tuple) else (calls,):
      out.setdefault(site, []).extend(branches)
  return out


def apply_with_spikes(model: nn.Module, variables: dict, images: jax.Array):
  """(logits [B, N], {site: [S_k [T, B, ..., C]]}) of one eval-mode forward pass.

  Under `time_mode='neuron'` (n neuron steps per network step) each S_k is the branch's mean
  spike over its n steps, as the sown rates count it.
  """
  logits, state = model.apply(
    variables, images, train=False, capture_intermediates=_capture_lifs, mutable=["intermediates"]
  )
  spikes = site_spikes(state.get("intermediates", {}))
  spk = model.cfg.spk
  n = int(spk.get("neuron_timesteps", 1))
  if n > 1 and spk.kind == "mbpl":  # MBPL asks its LIFs for spike counts over the n steps
    spikes = {site: [s / n for s in branches] for site, branches in spikes.items()}
  return logits, spikes


def per_image_rates(spikes: dict[str, list[jax.Array]]) -> dict[str, jax.Array]:
  """{site: [B, K, T]}: each image's rate per LIF branch and time step (mean over positions
  and channels), the per-image version of the sown batch rates."""
  out = {}
  for site, branches in spikes.items():
    per_branch = [jnp.mean(s.astype(jnp.float32), axis=tuple(range(2, s.ndim))) for s in branches]
    out[site] = jnp.stack(per_branch).transpose(2, 0, 1)  # [K, T, B] -> [B, K, T]
  return out


def stage_of(site: str) -> str:
  return site.split("/", 1)[0]


def _predict_fn(model, variables, images):
  logits, spikes = apply_with_spikes(model, variables, images)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), per_image_rates(spikes)


def predict(model: nn.Module, variables: dict, images: Any, *, batch_size: int = 64) -> dict:
  """Class probabilities and firing rates of each image, in batches of `batch_size`.

  Args:
    images: [N, H, W, C] float32, preprocessed as the training config's eval pipeline does.

  Returns:
    {"probs": [N, classes], "site_rates": {site: [N, K, T]}, "firing_rate": [N] (unweighted
    mean over sites of each site's mean rate, as `metrics.summarize_rates` reports a batch;
    NaN for a model without SPK sites), "stage_rates": {stage: [N]}} as numpy arrays.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  fn = jax.jit(functools.partial(_predict_fn, model))
  probs, rates = [], []
  for i in range(0, images.shape[0], batch_size):
    chunk = images[i : i + batch_size]
    n = chunk.shape[0]
    if n < batch_size and i:
      # One compiled shape: the last batch is padded, its padding dropped after the pass.
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
    p, r = jax.device_get(fn(variables, chunk))
    probs.append(p[:n])
    rates.append({k: v[:n] for k, v in r.items()})
  site_rates = {k: np.concatenate([r[k] for r in rates]) for k in rates[0]}
  site_means = {k: v.mean(axis=(1, 2)) for k, v in site_rates.items()}  # [N]
  n = images.shape[0]
  firing = np.mean(list(site_means.values()), axis=0) if site_means else np.full(n, np.nan)
  stages: dict[str, list] = {}
  for site, r in site_means.items():
    stages.setdefault(stage_of(site), []).append(r)
  return {
    "probs": np.concatenate(probs),
    "site_rates": site_rates,
    "firing_rate": firing,
    "stage_rates": {s: np.mean(v, axis=0) for s, v in sorted(stages.items())},
  }


def site_order(model: nn.Module, variables: dict, image_shape: tuple[int, ...]) -> list[str]:
  """The model's SPK sites ("stage0/block0/conv/spk_in", ...) in the order the forward pass
  calls them (traced with `jax.eval_shape`, nothing computed). Flax keeps collections sorted
  by name, so the call order has to be observed."""
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, SPK) and context.method_name == "__call__":
      site = "/".join(context.module.path)
      if site not in order:
        order.append(site)
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return order


def first_sites(sites: list[str]) -> list[str]:
  """The first of `sites` (in network order) of the stem and of each stage."""
  seen, out = set(), []
  for site in sites:
    stage = stage_of(site)
    if stage not in seen:
      seen.add(stage)
      out.append(site)
  return out


def spike_maps(model: nn.Module, variables: dict, image: Any, sites: list[str] | None = None):
  """The spike counts of one image at SPK sites: {site: [T, H, W, C] float32 numpy}.

  Each value is the number of the site's LIF branches that fired (0/1 for one branch, up to K
  for MBPL), the quantity the next layer receives before MBPL's merge. `sites` default: the
  first site of the stem and of each stage, in network order.
  """
  image = np.asarray(image, np.float32)[None]  # [1, H, W, C]

  def fn(variables, images):
    _, spikes = apply_with_spikes(model, variables, images)
    return {k: sum(v[1:], v[0])[:, 0].astype(jnp.float32) for k, v in spikes.items()}

  counts = jax.device_get(jax.jit(fn)(variables, image))
  if sites is None:
    order = site_order(model, variables, image.shape[1:])
    sites = first_sites([s for s in order if s in counts])
  missing = [s for s in sites if s not in counts]
  if missing:
    raise ValueError(f"no SPK site {missing[0]!r}; sites: {', '.join(counts)}")
  return {s: np.asarray(counts[s]) for s in sites}


# ----------------------------------------------------------------------------------------------
# Image files and class names (TensorFlow and tfds are imported only here).
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def image_files(paths: list[str]) -> list[epath.Path]:
  """The image files named in `paths`, each directory replaced by its image files (sorted)."""
  out = []
  for p in map(epath.Path, paths):
    if p.is_dir():
      found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
      if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {p}")
      out.extend(found)
    elif p.is_file():
      out.append(p)
    else:
      raise FileNotFoundError(f"{p} does not exist")
  return out


def preprocess(files: list[str | epath.PathLike], dataset_config: Any) -> np.ndarray:
  """[N, H, W, C] float32: each file's bytes through the eval pp string of `dataset_config`
  (`pp_eval`), as the eval pipeline feeds a tfds record's encoded image: the host part (up to
  the first normalize) in TensorFlow, then the device part on the uint8 batch.

  Raises:
    ValueError: a file that does not decode, or images of another size than the model's after
      the pp string (e.g. no resize op in it for an image of another size).
  """
  import tensorflow as tf

  from spikeatconv_jax.data import device_ops, ops

  pp_eval = dataset_config.pp_eval
  host_pp, _ = device_ops.split_pp(pp_eval)
  pp = ops.get_preprocess_fn(host_pp or "keep('image', 'label')")
  size = int(dataset_config.image_size)
  out = []
  for i, f in enumerate(files):
    f = epath.Path(f)
    example = {"image": tf.constant(f.read_bytes()), "label": tf.constant(0, tf.int64)}
    try:
      image = pp(ops.with_rng(example, i))["image"].numpy()
    except (tf.errors.InvalidArgumentError, ValueError) as e:
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"{f}: cannot decode and preprocess it: {msg}") from None
    if image.shape[:2] != (size, size):
      raise ValueError(
        f"{f} is {image.shape[0]}x{image.shape[1]} after the eval preprocessing {pp_eval!r}; "
        f"the model was trained on {size}x{size}: give images of that size (or a pp string "
        "that resizes)"
      )
    out.append(image)
  if not out:
    raise ValueError("no images given")
  on_device = jax.jit(functools.partial(device_ops.apply, pp_eval, rng=None))
  return np.asarray(on_device(np.stack(out)), np.float32)


def class_names(config: Any) -> list[str]:
  """The dataset's label names: `config.dataset.class_names` when set (exported files carry
  them there), else the tfds metadata; "class <i>" where neither has them."""
  n = int(config.model.num_classes)
  names = config.dataset.get("class_names")
  if names:
    return list(names)
  try:
    import tensorflow_datasets as tfds

    from spikeatconv_jax.data import pipeline  # registers the local builders

    del pipeline
    data_dir = config.dataset.get("data_dir")
    info = tfds.builder(config.dataset.name, data_dir=data_dir or None).info
    names = list(info.features["label"].names)
  except Exception:  # noqa: BLE001 - metadata is optional: numbers stand in for names
    names = None
  if not names or len(names) != n:
    return [f"class {i}" for i in range(n)]
  return names
