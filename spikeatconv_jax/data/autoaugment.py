"""AutoAugment (Cubuk et al., CVPR 2019) with the paper's ImageNet policy, in plain tf.

The policy is the paper's table of 25 sub-policies, each two (operation, probability,
magnitude) triples. Per image one sub-policy is drawn uniformly, and each of its two
operations is applied with its probability, in order.

Magnitudes are the paper's integers 0..9 on a scale whose maximum is 10 (as in the TPU and timm
implementations), mapped linearly onto the paper's ranges (`level_to_arg`): Rotate ±30°,
ShearX/Y ±0.3, Solarize threshold 0..256, Posterize 4..8 bits, Color/Contrast/Brightness/
Sharpness factor 0.1..1.9. Rotate and Shear take a random sign. Pixel-level ops follow PIL's
definitions (ImageOps / ImageEnhance), which the paper's implementation used; geometric ops
use nearest-neighbour sampling and fill uncovered pixels with grey (128), as the TPU code does.

Everything runs on uint8 [H, W, 3] images with stateless randomness; no Keras layers.
"""

from __future__ import annotations

import tensorflow as tf

from spikeatconv_jax.data import ops

MAX_LEVEL = 10.0
FILL = 128
# Nearest neighbour, as the TPU implementation: bilinear costs ~5x more per image in tf.
INTERPOLATION = "NEAREST"

# The paper's ImageNet policy (appendix table): (op, probability, magnitude) pairs.
IMAGENET_POLICY = (
  (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
  (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
  (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
  (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
  (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
  (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
  (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
  (("Posterize", 0.8, 5), ("Equalize", 1.0, 2)),
  (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
  (("Equalize", 0.6, 8), ("Posterize", 0.4, 6)),
  (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
  (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
  (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
  (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
  (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
  (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
  (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
  (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
  (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
  (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
  (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
  (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
  (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
  (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
  (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)
POLICIES = {"imagenet": IMAGENET_POLICY}

# Ops whose magnitude is used with a random sign.
SIGNED = ("Rotate", "ShearX", "ShearY")


def level_to_arg(name: str, level):
  """The operation parameter for magnitude `level` (before the random sign); None if unused.

  Works on Python numbers and on tensors (the policy's magnitudes are gathered in-graph).
  """
  frac = tf.cast(level, tf.float32) / MAX_LEVEL
  if name == "Rotate":
    return frac * 30.0  # degrees
  if name in ("ShearX", "ShearY"):
    return frac * 0.3
  if name == "Solarize":
    return tf.cast(tf.floor(frac * 256.0), tf.int32)  # threshold, 0..256
  if name == "Posterize":
    return tf.cast(tf.floor(frac * 4.0), tf.int32) + 4  # bits kept, 4..8
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return frac * 1.8 + 0.1  # enhancement factor
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  raise ValueError(f"unknown AutoAugment operation {name!r}")


# ----------------------------------------------------------------------------------------------
# The operations (uint8 [H, W, 3] in and out), PIL semantics.
# ----------------------------------------------------------------------------------------------


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  d = tf.cast(degenerate, tf.float32)
  return ops.to_uint8(d + factor * (tf.cast(image, tf.float32) - d))


def _grayscale(image):
  """PIL "L" conversion, L = (299 R + 587 G + 114 B) / 1000, kept in float."""
  return tf.tensordot(tf.cast(image, tf.float32), tf.constant([0.299, 0.587, 0.114]), 1)[..., None]


def autocontrast(image):
  """Stretches each channel's [min, max] to [0, 255] (channels with min == max unchanged)."""
  x = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)  # per-channel LUT index
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, None]  # [3, 1]
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, None]
  # PIL's LUT, in float64 as PIL computes it: int(i * scale - lo * scale), clipped.
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  levels = tf.range(256, dtype=tf.float64)[None, :]
  lut = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)
  lut = tf.cast(tf.where(hi > lo, lut, levels), tf.int32)  # [3, 256]
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), x), tf.uint8)


def equalize(image):
  """PIL ImageOps.equalize, per channel, all three channels in one histogram pass."""
  x = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)  # per-channel bins
  hist = tf.reshape(tf.math.bincount(tf.reshape(x, [-1]), minlength=768, maxlength=768), [3, 256])
  # PIL: step = (number of pixels - count of the last non-empty bin) // 255.
  last_bin = 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)
  last_count = tf.gather(hist, last_bin, batch_dims=1)  # [3]
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # [3]
  safe = tf.maximum(step, 1)[:, None]
  lut = tf.minimum((tf.cumsum(hist, axis=1, exclusive=True) + safe // 2) // safe, 255)
  # A channel with step 0 (one or two levels used) is left unchanged, as in PIL.
  lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])  # [3, 256]
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), x), tf.uint8)


def invert(image):
  return 255 - image


def solarize(image, threshold):
  """Inverts pixels >= threshold (threshold 256 leaves the image unchanged)."""
  return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def posterize(image, bits):
  """Keeps the `bits` most significant bits of every value."""
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image, factor):
  return _blend(_grayscale(image), image, factor)


def contrast(image, factor):
  # PIL: the degenerate image is the (rounded) mean of the grayscale image.
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(tf.zeros([], tf.float32), image, factor)


def sharpness(image, factor):
  """PIL: blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13, border kept."""
  x = tf.cast(image, tf.float32)[None]  # [1, H, W, 3]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"))[0]
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  interior = tf.pad(tf.ones([h - 2, w - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior, degenerate, x[0])
  return _blend(degenerate, image, factor)


def rotate(image, degrees):
  return ops.affine(image, ops.rotation_matrix(image, degrees), FILL, INTERPOLATION)


def shear_x(image, shear):
  # PIL/timm convention: x_in = x + shear * y, i.e. sheared about the top row.
  one, zero = tf.constant(1.0), tf.constant(0.0)
  shear = tf.cast(shear, tf.float32)
  return ops.affine(image, tf.stack([one, shear, zero, zero, one, zero]), FILL, INTERPOLATION)


def shear_y(image, shear):
  one, zero = tf.constant(1.0), tf.constant(0.0)
  shear = tf.cast(shear, tf.float32)
  return ops.affine(image, tf.stack([one, zero, zero, shear, one, zero]), FILL, INTERPOLATION)


OPERATIONS = {
  "AutoContrast": lambda image, arg: autocontrast(image),
  "Equalize": lambda image, arg: equalize(image),
  "Invert": lambda image, arg: invert(image),
  "Solarize": solarize,
  "Posterize": posterize,
  "Color": color,
  "Contrast": contrast,
  "Brightness": brightness,
  "Sharpness": sharpness,
  "Rotate": rotate,
  "ShearX": shear_x,
  "ShearY": shear_y,
}


def apply_operation(image, name: str, level: float, sign=1.0):
  """Applies one operation at magnitude `level`; `sign` (±1) for the signed ops."""
  arg = level_to_arg(name, level)
  if name in SIGNED:
    arg = tf.cast(sign, tf.float32) * arg
  return OPERATIONS[name](image, arg)


OP_NAMES = tuple(OPERATIONS)


def policy_tensors(policy) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(op ids int32 [S, 2], probabilities float32 [S, 2], magnitudes float32 [S, 2])."""
  op_ids = [[OP_NAMES.index(name) for name, _, _ in sub] for sub in policy]
  probs = [[p for _, p, _ in sub] for sub in policy]
  levels = [[m for _, _, m in sub] for sub in policy]
  return (
    tf.constant(op_ids, tf.int32),
    tf.constant(probs, tf.float32),
    tf.constant(levels, tf.float32),
  )


def _apply_by_id(image, op_id, level, sign):
  """Runs operation OP_NAMES[op_id] at magnitude `level` (tensors)."""
  branches = [(lambda name=name: apply_operation(image, name, level, sign)) for name in OP_NAMES]
  return _select(op_id, branches)


def apply_subpolicy_tensors(image, seed, op_ids, probs, levels):
  """Applies the sub-policy given as tensors [n] (op id, probability, magnitude), in order."""
  n = op_ids.shape[0]
  u = tf.random.stateless_uniform([2 * n], seed)  # (apply, sign) per operation
  for j in range(n):
    sign = tf.where(u[2 * j + 1] < 0.5, -1.0, 1.0)
    image = tf.cond(
      u[2 * j] < probs[j],
      lambda image=image, j=j, sign=sign: _apply_by_id(image, op_ids[j], levels[j], sign),
      lambda image=image: image,
    )
  return image


def apply_subpolicy(image, seed, subpolicy):
  """Applies each (op, probability, magnitude) of `subpolicy` in order, each with its prob."""
  op_ids, probs, levels = policy_tensors([subpolicy])
  return apply_subpolicy_tensors(image, seed, op_ids[0], probs[0], levels[0])


def choose_subpolicy(seed, num_subpolicies: int) -> tf.Tensor:
  """The uniformly drawn sub-policy index for one image."""
  return tf.random.stateless_uniform([], seed, minval=0, maxval=num_subpolicies, dtype=tf.int32)


def autoaugment(image, seed, policy: str = "imagenet"):
  """AutoAugment on a uint8 [H, W, 3] image (named policy from `POLICIES`).

  The drawn sub-policy's ops are gathered from the policy table in-graph, so the traced
  graph holds each operation once per slot instead of once per sub-policy entry (traces
  and instantiates ~3x faster than a 25-way branch).
  """
  if policy not in POLICIES:
    raise ValueError(f"unknown AutoAugment policy {policy!r}; known: {sorted(POLICIES)}")
  if image.dtype != tf.uint8:
    raise ValueError("autoaugment works on uint8 images; put it before normalize")
  op_ids, probs, levels = policy_tensors(POLICIES[policy])
  s_choose, s_apply = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  index = choose_subpolicy(s_choose, len(POLICIES[policy]))
  return apply_subpolicy_tensors(image, s_apply, op_ids[index], probs[index], levels[index])


def _select(index, branches):
  """Runs branches[index] via a binary tree of tf.cond (only the taken path executes)."""
  if len(branches) == 1:
    return branches[0]()
  mid = len(branches) // 2
  return tf.cond(
    index < mid,
    lambda: _select(index, branches[:mid]),
    lambda: _select(index - mid, branches[mid:]),
  )


ops.register("autoaugment")(ops.image_op(autoaugment, random=True))
