"""The tail of a pp string that runs on the accelerator, inside the jitted step.

A pp string such as ``"decode|flip_lr|normalize('imagenet')|random_erase(0.25)"`` is cut at
its first ``normalize``: the ops before it run in tf.data on the host and hand uint8 images to
the device (a quarter of the float32 bytes over the host-to-device link), and ``normalize``
with the ops after it run here, in JAX, fused by XLA into the step's first layers.

Device ops:

* ``normalize(name or mean, std)``: float32 ``x * scale + offset`` with the constants of
  `normalize_constants`, which the host op (ops.py) shares: the same values.
* ``random_erase(p=0.25, ...)``: Random Erasing in timm's "pixel" mode on the normalised image,
  one independent draw per example (`random_erase`).

Batches that reach the step already in floating point (synthetic inputs) are taken as
preprocessed and left as they are.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# name -> (factory(*args, **kwargs) -> fn(rng or None, images [B, H, W, C]) -> images, random)
_REGISTRY: dict[str, tuple[Callable[..., Callable], bool]] = {}

DeviceFn = Callable[[jax.Array | None, jax.Array], jax.Array]

# Per-channel statistics in [0, 1] units.
MEAN_STD = {
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  # CIFAR-100 train-set statistics, as used by the common PyTorch CIFAR-100 recipes.
  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  # Fashion-MNIST train-set mean and std of pixel/255.
  "fashion_mnist": ((0.2860,), (0.3530,)),
}


def normalize_constants(mean="imagenet", std=None) -> tuple[list[float], list[float]]:
  """Per-channel (scale, offset) with (x/255 - mean)/std = x * scale + offset.

  `mean` is a name in `MEAN_STD` or per-channel values (then `std` too). One multiply-add
  instead of divide, subtract, divide; the host and device ops share these constants, so they
  give the same float32 values.
  """
  if isinstance(mean, str):
    if mean not in MEAN_STD:
      raise ValueError(f"normalize: unknown statistics {mean!r}; known: {sorted(MEAN_STD)}")
    if std is not None:
      raise ValueError("normalize: give either a statistics name or mean and std, not both")
    mean, std = MEAN_STD[mean]
  if std is None:
    raise ValueError("normalize: std missing")
  if len(mean) != len(std):
    raise ValueError(f"normalize: {len(mean)} means but {len(std)} stds")
  scale = [1.0 / (255.0 * s) for s in std]
  offset = [-m / s for m, s in zip(mean, std, strict=True)]
  return scale, offset


def _op_name(spec: str) -> str:
  try:
    expr = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing op {spec!r}: {e}") from None
  func = expr.func if isinstance(expr, ast.Call) else expr
  return func.id if isinstance(func, ast.Name) else ""


def split_pp(pp: str) -> tuple[str, str]:
  """(host part, device part) of a pp string; the device part starts at the first normalize.

  Raises:
    ValueError: a device op before ``normalize``, or a host op after it (it would see
      normalised floats the host ops do not take).
  """
  specs = [s.strip() for s in (pp or "").split("|") if s.strip()]
  names = [_op_name(s) for s in specs]
  cut = names.index("normalize") if "normalize" in names else len(specs)
  for name in names[:cut]:
    if name in _REGISTRY:
      raise ValueError(f"pp {pp!r}: {name} works on normalised images; put it after normalize")
  for name in names[cut:]:
    if name not in _REGISTRY:
      raise ValueError(
        f"pp {pp!r}: {name!r} after normalize has no device form; the ops after normalize "
        f"run on the device, and those are {sorted(_REGISTRY)}"
      )
  return "|".join(specs[:cut]), "|".join(specs[cut:])


def is_random(device_pp: str) -> bool:
  return any(_REGISTRY[_op_name(s)][1] for s in device_pp.split("|") if s.strip())


def preprocess_fn(device_pp: str) -> DeviceFn:
  """``fn(rng, images)``: uint8 [B, H, W, C] -> float32, through the ops of `device_pp`.

  `rng` is a JAX key, used only by random ops (None is allowed when there are none). An empty
  `device_pp` only casts to float32.
  """
  steps = []
  for spec in (s.strip() for s in device_pp.split("|") if s.strip()):
    name = _op_name(spec)
    if name not in _REGISTRY:
      raise ValueError(f"unknown device preprocessing op {name!r}; known: {sorted(_REGISTRY)}")
    expr = ast.parse(spec, mode="eval").body
    args, kwargs = [], {}
    if isinstance(expr, ast.Call):
      try:
        args = [ast.literal_eval(a) for a in expr.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
      except ValueError:
        raise ValueError(f"op {spec!r}: arguments must be Python literals") from None
    factory, random = _REGISTRY[name]
    steps.append((factory(*args, **kwargs), random))

  def fn(rng: jax.Array | None, images: jax.Array) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"expected a batch of images [B, H, W, C], got shape {images.shape}")
    images = images.astype(jnp.float32)
    for i, (step, random) in enumerate(steps):
      if random and rng is None:
        raise ValueError(f"device pp {device_pp!r} has random ops but no rng was given")
      images = step(jax.random.fold_in(rng, i) if random else None, images)
    return images

  return fn


def apply(pp: str, images: jax.Array, rng: jax.Array | None) -> jax.Array:
  """The device part of the pp string `pp` on a uint8 batch; float batches pass unchanged."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  return preprocess_fn(split_pp(pp)[1])(rng, images)


def _register(name: str, random: bool = False):
  def wrap(factory):
    _REGISTRY[name] = (factory, random)
    return factory

  return wrap


@_register("normalize")
def normalize(mean="imagenet", std=None, key: str = "image"):
  """(x/255 - mean)/std as one multiply-add, with the host op's float32 constants."""
  del key
  scale, offset = normalize_constants(mean, std)

  def fn(rng, images):
    del rng
    if len(scale) not in (1, images.shape[-1]):
      raise ValueError(f"normalize: {len(scale)} channel statistics for {images.shape[-1]} ch")
    return images * jnp.asarray(scale, jnp.float32) + jnp.asarray(offset, jnp.float32)

  return fn


def erase_one(
  rng, image, p=0.25, area_min=0.02, area_max=1.0 / 3.0, ratio_min=0.3, ratio_max=1 / 0.3,
  attempts=10,
):  # fmt: skip
  """Random Erasing (Zhong et al. 2020) of one [H, W, C] normalised image, timm "pixel" mode.

  With probability p, one box of area fraction U(area_min, area_max) and aspect ratio
  log-uniform in [ratio_min, ratio_max] is filled with per-pixel N(0, 1) noise. As in timm, up
  to `attempts` boxes are drawn and the first that fits inside the image is used (none fitting
  means no erasing).
  """
  h, w, _ = image.shape
  k_apply, k_area, k_ratio, k_top, k_left, k_noise = jax.random.split(rng, 6)
  target = h * w * jax.random.uniform(k_area, (attempts,), minval=area_min, maxval=area_max)
  log_ratio = jax.random.uniform(
    k_ratio, (attempts,), minval=math.log(ratio_min), maxval=math.log(ratio_max)
  )
  ratio = jnp.exp(log_ratio)
  eh = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)  # [attempts]
  ew = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits)
  eh, ew = eh[first], ew[first]
  do = (jax.random.uniform(k_apply) < p) & jnp.any(fits)
  top = jnp.floor(jax.random.uniform(k_top) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & do
  noise = jax.random.normal(k_noise, image.shape, image.dtype)
  return jnp.where(inside[..., None], noise, image)


@_register("random_erase", random=True)
def random_erase(p=0.25, key: str = "image", **kwargs):
  """Random Erasing per example (`erase_one`), one key per example split off the batch key."""
  del key

  def fn(rng, images):
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(lambda k, x: erase_one(k, x, p, **kwargs))(keys, images)

  return fn
