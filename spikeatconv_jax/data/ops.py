"""Preprocessing ops, registered by name and composed from a pp string (big_vision style).

A pp string such as ``"decode|inception_crop(224)|flip_lr|normalize('imagenet')"`` names ops
separated by ``|``; each op is a factory registered with `register`, called with the literal
arguments written in the string, and returning a function that maps a feature dict to a new
feature dict. Ops read and write ``features[key]`` (``key="image"`` unless given).

Randomness is stateless and per example: the pipeline stores a seed under
``features["_rng"]`` (int64 [2], derived from the run seed, the epoch and the example index)
and every random op splits a fresh seed off it, so an example's augmentation depends only on
(seed, epoch, index) and never on thread scheduling or on where a restart resumed. To call a
random op by hand, use `with_rng`.

Images are uint8 [H, W, C] until `normalize`, which returns float32. The training and eval
pipelines stop before `normalize` and hand uint8 images to the device, where `normalize` and
the ops after it (`random_erase`) run inside the jitted step (`device_ops.py`); the host
`normalize` here gives the same values, for preprocessing files outside the pipeline.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

import tensorflow as tf

from spikeatconv_jax.data.device_ops import MEAN_STD as MEAN_STD  # the named statistics
from spikeatconv_jax.data.device_ops import normalize_constants

Features = dict[str, tf.Tensor]
Op = Callable[[Features], Features]

RNG_KEY = "_rng"
_REGISTRY: dict[str, Callable[..., Op]] = {}

# Ops that exist only on the device (they follow normalize; see device_ops.py).
DEVICE_ONLY = ("random_erase",)


def register(name: str):
  """Decorator registering an op factory under `name`."""

  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f"preprocessing op {name!r} registered twice")
    _REGISTRY[name] = factory
    return factory

  return wrap


def registered_ops() -> list[str]:
  return sorted(_REGISTRY)


def get_op(spec: str) -> Op:
  """Builds one op from ``"name"`` or ``"name(literal args, key=literal)"``."""
  try:
    expr = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing op {spec!r}: {e}") from None
  if isinstance(expr, ast.Name):
    name, args, kwargs = expr.id, [], {}
  elif isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
    name = expr.func.id
    try:
      args = [ast.literal_eval(a) for a in expr.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
    except ValueError:
      raise ValueError(f"op {spec!r}: arguments must be Python literals") from None
  else:
    raise ValueError(f"op {spec!r} is neither `name` nor `name(args)`")
  if name in DEVICE_ONLY:
    raise ValueError(
      f"preprocessing op {name!r} runs on the device, after normalize (data/device_ops.py)"
    )
  if name not in _REGISTRY:
    raise ValueError(f"unknown preprocessing op {name!r}; registered: {registered_ops()}")
  return _REGISTRY[name](*args, **kwargs)


def get_preprocess_fn(pp: str) -> Op:
  """Composes the ops of a pp string into one feature-dict function."""
  if not pp or not pp.strip():
    raise ValueError("empty preprocessing string")
  ops = [get_op(s) for s in pp.split("|") if s.strip()]

  def apply(features: Features) -> Features:
    features = dict(features)
    for op in ops:
      features = op(features)
    return features

  return apply


def with_rng(features: Features, seed: int | tf.Tensor) -> Features:
  """Returns a copy of `features` carrying the per-example seed random ops need."""
  seed = tf.convert_to_tensor(seed, tf.int64)
  if seed.shape.rank == 0:
    seed = tf.stack([seed, tf.constant(0, tf.int64)])
  return {**features, RNG_KEY: seed}


def next_seed(features: Features) -> tf.Tensor:
  """Splits a fresh int64 [2] seed off ``features["_rng"]`` (mutates `features`)."""
  if RNG_KEY not in features:
    raise KeyError(
      "a random preprocessing op needs features['_rng'] (the pipeline adds it; by hand use "
      "ops.with_rng(features, seed))"
    )
  seeds = tf.random.experimental.stateless_split(features[RNG_KEY], 2)  # [2, 2]
  features[RNG_KEY] = seeds[0]
  return seeds[1]


def image_op(fn: Callable[..., tf.Tensor], *, random: bool = False) -> Callable[..., Op]:
  """Wraps ``fn(image, [seed,] *args)`` into an op factory with a `key` argument."""

  def factory(*args, key: str = "image", **kwargs) -> Op:
    def op(features: Features) -> Features:
      features = dict(features)
      if random:
        seed = next_seed(features)
        features[key] = fn(features[key], seed, *args, **kwargs)
      else:
        features[key] = fn(features[key], *args, **kwargs)
      return features

    return op

  factory.__doc__ = fn.__doc__
  return factory


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a float image in [0, 255] units to uint8."""
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)


# ----------------------------------------------------------------------------------------------
# Decoding and geometry.
# ----------------------------------------------------------------------------------------------


def decode(image: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """Decodes JPEG/PNG bytes to uint8 [H, W, channels]; decoded images get their channels fixed."""
  if image.dtype == tf.string:
    return tf.io.decode_image(image, channels=channels, expand_animations=False)
  if image.shape[-1] == channels:
    return image
  if image.shape[-1] == 1 and channels == 3:
    return tf.image.grayscale_to_rgb(image)
  if image.shape[-1] == 3 and channels == 1:
    return to_uint8(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)))
  raise ValueError(f"decode: cannot turn {image.shape[-1]} channels into {channels}")


def _sample_crop(shape, seed, area_min, area_max):
  """Inception crop window (offset [3], size [3]) for an image of `shape` [3]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    area_range=(area_min, area_max),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def inception_crop(
  image, seed, size: int, area_min=0.08, area_max=1.0, method="bicubic", antialias=False
):
  """Random-resized crop (scale area_min..area_max, ratio 3/4..4/3), resized to size×size."""
  begin, crop_size = _sample_crop(tf.shape(image), seed, area_min, area_max)
  crop = tf.slice(image, begin, crop_size)
  out = tf.image.resize(crop, [size, size], method=method, antialias=antialias)
  return to_uint8(out)


def decode_jpeg_and_inception_crop(
  data, seed, size: int, area_min=0.08, area_max=1.0, method="bicubic", antialias=False
):
  """`decode` + `inception_crop`, decoding only the crop window of a JPEG (much faster)."""
  if data.dtype != tf.string:
    return inception_crop(decode(data, 3), seed, size, area_min, area_max, method, antialias)

  def fused():
    shape = tf.image.extract_jpeg_shape(data)
    begin, crop_size = _sample_crop(shape, seed, area_min, area_max)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def generic():  # PNG and other formats.
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    begin, crop_size = _sample_crop(tf.shape(image), seed, area_min, area_max)
    return tf.slice(image, begin, crop_size)

  crop = tf.cond(tf.io.is_jpeg(data), fused, generic)
  out = tf.image.resize(crop, [size, size], method=method, antialias=antialias)
  return to_uint8(out)


def resize(image, size, method="bicubic", antialias=True):
  """Resizes to `size` (int or (h, w))."""
  hw = [size, size] if isinstance(size, int) else list(size)
  return to_uint8(tf.image.resize(image, hw, method=method, antialias=antialias))


def resize_small(image, size: int, method="bicubic", antialias=True):
  """Resizes so the shorter side is `size` (longer side floor-scaled, as torchvision does)."""
  h = tf.cast(tf.shape(image)[0], tf.float64)
  w = tf.cast(tf.shape(image)[1], tf.float64)
  scale = size / tf.minimum(h, w)
  new_h = tf.maximum(tf.cast(tf.floor(h * scale + 1e-6), tf.int32), size)
  new_w = tf.maximum(tf.cast(tf.floor(w * scale + 1e-6), tf.int32), size)
  out = tf.image.resize(image, tf.stack([new_h, new_w]), method=method, antialias=antialias)
  return to_uint8(out)


def central_crop(image, size: int):
  """Crops the central size×size window (the image must be at least that large)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top : top + size, left : left + size]


def pad(image, amount: int, value: int = 0):
  """Pads `amount` pixels on every side of H and W with a constant."""
  paddings = [[amount, amount], [amount, amount], [0, 0]]
  return tf.pad(image, paddings, constant_values=tf.cast(value, image.dtype))


def pad_to(image, size: int, value: int = 0):
  """Pads H and W symmetrically (extra pixel at the bottom/right) up to size×size."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  dh, dw = tf.maximum(size - h, 0), tf.maximum(size - w, 0)
  paddings = [[dh // 2, dh - dh // 2], [dw // 2, dw - dw // 2], [0, 0]]
  return tf.pad(image, paddings, constant_values=tf.cast(value, image.dtype))


def random_crop(image, seed, size: int, pad: int = 0):
  """Zero-pads `pad` pixels per side, then crops a random size×size window."""
  if pad:
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  c = tf.shape(image)[-1]
  return tf.image.stateless_random_crop(image, tf.stack([size, size, c]), seed)


def flip_lr(image, seed, p: float = 0.5):
  """Mirrors left-right with probability p."""
  return tf.cond(_uniform(seed) < p, lambda: image[:, ::-1], lambda: image)


def affine(image, matrix, fill=0, interpolation="BILINEAR"):
  """Applies the output->input pixel map [a0, a1, a2, b0, b1, b2] to an [H, W, C] image.

  Input pixel (x_in, y_in) = (a0 x + a1 y + a2, b0 x + b1 y + b2) for output pixel (x, y);
  pixels that land outside are `fill`.
  """
  transform = tf.concat([tf.cast(matrix, tf.float32), tf.zeros([2], tf.float32)], 0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform,
    output_shape=tf.shape(image)[:2],
    fill_value=tf.cast(fill, tf.float32),
    interpolation=interpolation,
    fill_mode="CONSTANT",
  )
  return out[0]


def rotation_matrix(image, degrees):
  """Output->input map rotating the image by `degrees` about its centre."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1.0) / 2.0, (w - 1.0) / 2.0
  t = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  c, s = tf.cos(t), tf.sin(t)
  # (x_in - cx, y_in - cy) = R(-t) (x - cx, y - cy).
  return tf.stack([c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy])


def shear_x_matrix(image, shear):
  """Output->input map of a horizontal shear x_in = x + shear * (y - cy)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  cy = (h - 1.0) / 2.0
  shear = tf.cast(shear, tf.float32)
  one, zero = tf.constant(1.0), tf.constant(0.0)
  return tf.stack([one, shear, -shear * cy, zero, one, zero])


def random_rotate(image, seed, max_degrees: float, fill=0, interpolation="NEAREST"):
  """Rotates by an angle drawn uniformly from [-max_degrees, max_degrees]."""
  angle = _uniform(seed, minval=-max_degrees, maxval=max_degrees)
  return affine(image, rotation_matrix(image, angle), fill, interpolation)


def random_shear(image, seed, max_degrees: float, fill=0, interpolation="NEAREST"):
  """Horizontal shear by an angle uniform in [-max_degrees, max_degrees] (torchvision style)."""
  angle = _uniform(seed, minval=-max_degrees, maxval=max_degrees)
  shear = tf.tan(angle * (math.pi / 180.0))
  return affine(image, shear_x_matrix(image, shear), fill, interpolation)


# ----------------------------------------------------------------------------------------------
# Value ops.
# ----------------------------------------------------------------------------------------------


def normalize(image, mean="imagenet", std=None):
  """float32 (image/255 - mean)/std; `mean` is a name in `MEAN_STD` or per-channel values."""
  scale, offset = normalize_constants(mean, std)
  if image.shape[-1] is not None and len(scale) not in (1, image.shape[-1]):
    raise ValueError(f"normalize: {len(scale)} channel statistics for {image.shape[-1]} ch")
  scale, offset = tf.constant(scale, tf.float32), tf.constant(offset, tf.float32)
  return tf.cast(image, tf.float32) * scale + offset


register("decode")(image_op(decode))
register("inception_crop")(image_op(inception_crop, random=True))
register("decode_jpeg_and_inception_crop")(image_op(decode_jpeg_and_inception_crop, random=True))
register("resize")(image_op(resize))
register("resize_small")(image_op(resize_small))
register("central_crop")(image_op(central_crop))
register("pad")(image_op(pad))
register("pad_to")(image_op(pad_to))
register("random_crop")(image_op(random_crop, random=True))
register("flip_lr")(image_op(flip_lr, random=True))
register("random_rotate")(image_op(random_rotate, random=True))
register("random_shear")(image_op(random_shear, random=True))
register("normalize")(image_op(normalize))


@register("keep")
def keep(*keys: str) -> Op:
  """Drops every feature except `keys` (and the per-example seed)."""

  def op(features):
    missing = [k for k in keys if k not in features]
    if missing:
      raise KeyError(f"keep: features {missing} not present (have {sorted(features)})")
    return {k: v for k, v in features.items() if k in keys or k == RNG_KEY}

  return op
