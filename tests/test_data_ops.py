"""Tests of the registered preprocessing ops: eager == tf.data, shapes, dtypes, ranges, maths."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from spikeatconv_jax.data import autoaugment, ops

del autoaugment  # imported to register the "autoaugment" op


def jpeg_bytes(h=40, w=56, seed=0):
  rng = np.random.RandomState(seed)
  # Smooth content plus noise: JPEG-like statistics, and crops/flips visibly change it.
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
  image = np.clip(base + rng.randint(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=95)
  return buf.getvalue(), image


def png_gray_bytes():
  image = (np.arange(28 * 28).reshape(28, 28) % 251).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue(), image


JPEG, RAW = jpeg_bytes()
PNG, GRAY = png_gray_bytes()

# (pp string, input image, expected output shape, expected dtype, (min, max) allowed values)
CASES = {
  "decode": ("decode", JPEG, (40, 56, 3), tf.uint8, (0, 255)),
  "decode_gray": ("decode(1)", PNG, (28, 28, 1), tf.uint8, (0, 255)),
  "decode_jpeg_and_inception_crop": (
    "decode_jpeg_and_inception_crop(24)", JPEG, (24, 24, 3), tf.uint8, (0, 255)),
  "inception_crop": ("decode|inception_crop(24)", JPEG, (24, 24, 3), tf.uint8, (0, 255)),
  "resize": ("decode|resize(20)", JPEG, (20, 20, 3), tf.uint8, (0, 255)),
  "resize_small": ("decode|resize_small(20)", JPEG, (20, 28, 3), tf.uint8, (0, 255)),
  "central_crop": ("decode|central_crop(16)", JPEG, (16, 16, 3), tf.uint8, (0, 255)),
  "pad": ("decode(1)|pad(2)", PNG, (32, 32, 1), tf.uint8, (0, 255)),
  "pad_to": ("decode(1)|pad_to(31)", PNG, (31, 31, 1), tf.uint8, (0, 255)),
  "random_crop": ("decode(1)|random_crop(28, pad=4)", PNG, (28, 28, 1), tf.uint8, (0, 255)),
  "flip_lr": ("decode|flip_lr", JPEG, (40, 56, 3), tf.uint8, (0, 255)),
  "random_rotate": ("decode|random_rotate(30)", JPEG, (40, 56, 3), tf.uint8, (0, 255)),
  "random_shear": ("decode|random_shear(10)", JPEG, (40, 56, 3), tf.uint8, (0, 255)),
  "normalize": ("decode|normalize('imagenet')", JPEG, (40, 56, 3), tf.float32, (-2.2, 2.7)),
  "autoaugment": ("decode|autoaugment", JPEG, (40, 56, 3), tf.uint8, (0, 255)),
  "keep": ("decode|keep('image', 'label')", JPEG, (40, 56, 3), tf.uint8, (0, 255)),
}  # fmt: skip


def test_every_registered_op_is_tested():
  tested = {c[0].split("|")[-1].split("(")[0] for c in CASES.values()}
  assert tested >= set(ops.registered_ops()), set(ops.registered_ops()) - tested


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_equals_tf_data(name):
  pp, data, shape, dtype, (lo, hi) = CASES[name]
  fn = ops.get_preprocess_fn(pp)
  features = {"image": tf.constant(data), "label": tf.constant(3, tf.int64)}
  seeds = range(4)
  # One dataset (one trace) for all seeds.
  ds = tf.data.Dataset.from_tensor_slices(list(seeds)).map(
    lambda s: fn(ops.with_rng(features, tf.cast(s, tf.int64)))
  )
  for seed, graph in zip(seeds, ds, strict=True):
    eager = fn(ops.with_rng(features, seed))
    assert eager["label"] == 3 and graph["label"] == 3
    eager, graph = eager["image"], graph["image"]
    assert eager.dtype == dtype and graph.dtype == dtype
    assert tuple(eager.shape) == shape and tuple(graph.shape) == shape
    np.testing.assert_array_equal(eager.numpy(), graph.numpy())
    assert lo <= float(tf.reduce_min(eager)) and float(tf.reduce_max(eager)) <= hi


def run(pp, image, seed=0):
  return ops.get_preprocess_fn(pp)(ops.with_rng({"image": tf.constant(image)}, seed))["image"]


def test_pp_string_errors():
  with pytest.raises(ValueError, match="unknown preprocessing op"):
    ops.get_preprocess_fn("decode|nope(3)")
  with pytest.raises(ValueError, match="literals"):
    ops.get_preprocess_fn("pad(x)")
  with pytest.raises(KeyError, match="_rng"):
    ops.get_preprocess_fn("flip_lr")({"image": tf.zeros([4, 4, 3], tf.uint8)})
  with pytest.raises(ValueError, match="runs on the device"):
    run("random_erase(1.0)", np.zeros([8, 8, 3], np.float32))


def test_decode_matches_pil():
  np.testing.assert_array_equal(run("decode(1)", PNG).numpy()[..., 0], GRAY)
  decoded = run("decode", JPEG).numpy().astype(int)
  # libjpeg builds differ in IDCT/upsampling details; the pixels agree closely on average.
  assert np.abs(decoded - np.asarray(Image.open(io.BytesIO(JPEG)))).mean() < 2.0


def test_flip_lr_probability():
  image = RAW
  outs = [run("flip_lr(0.5)", image, s).numpy() for s in range(200)]
  flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs, strict=True))
  assert 0.38 < np.mean(flipped) < 0.62
  assert np.array_equal(run("flip_lr(1.0)", image).numpy(), image[:, ::-1])
  assert np.array_equal(run("flip_lr(0.0)", image).numpy(), image)


def test_pad_to():
  padded = run("pad_to(31)", GRAY[..., None]).numpy()
  np.testing.assert_array_equal(padded[1:29, 1:29, 0], GRAY)
  assert not padded[0].any() and not padded[29:].any()


def test_random_crop_is_a_window_of_the_padded_image():
  padded = np.pad(RAW, [(4, 4), (4, 4), (0, 0)])
  for seed in range(5):
    out = run("random_crop(32, pad=4)", RAW, seed).numpy()
    hits = [
      (i, j)
      for i in range(padded.shape[0] - 31)
      for j in range(padded.shape[1] - 31)
      if np.array_equal(padded[i : i + 32, j : j + 32], out)
    ]
    assert hits


def test_inception_crop_full_area_is_a_resize():
  square = RAW[:40, :40]
  out = run("inception_crop(20, area_min=1.0, area_max=1.0, method='bilinear')", square)
  want = tf.image.resize(square, [20, 20], method="bilinear")
  assert np.abs(out.numpy().astype(float) - want.numpy()).max() <= 0.5 + 1e-4


def test_inception_crop_area_and_ratio():
  # The sampled window (before resizing) respects scale 0.08..1 and ratio 3/4..4/3.
  for seed in range(30):
    s = tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), 2)[1]
    _, size = ops._sample_crop(tf.constant([300, 400, 3]), s, 0.08, 1.0)
    h, w = int(size[0]), int(size[1])
    assert 0.08 * 0.9 <= h * w / 120_000 <= 1.0
    assert (h == 300 and w == 400) or 0.7 <= w / h <= 1.4


def test_resize_small_and_central_crop():
  image = np.zeros([100, 200, 3], np.uint8)
  assert tuple(run("resize_small(235)", image).shape) == (235, 470, 3)
  image = np.arange(10 * 12).reshape(10, 12, 1).astype(np.uint8)
  np.testing.assert_array_equal(run("central_crop(4)", image).numpy(), image[3:7, 4:8])


def test_normalize_values():
  image = np.full([2, 2, 3], 255, np.uint8)
  out = run("normalize('imagenet')", image).numpy()
  mean, std = ops.MEAN_STD["imagenet"]
  np.testing.assert_allclose(out[0, 0], (1 - np.array(mean)) / np.array(std), rtol=1e-5)
  out = run("normalize((0.5,), (0.25,))", np.zeros([2, 2, 1], np.uint8)).numpy()
  np.testing.assert_allclose(out, -2.0, rtol=1e-6)
  out = run("normalize('cifar100')", np.full([2, 2, 3], 77, np.uint8)).numpy()
  mean, std = ops.MEAN_STD["cifar100"]
  np.testing.assert_allclose(out[1, 1], (77 / 255 - np.array(mean)) / np.array(std), rtol=1e-5)
  with pytest.raises(ValueError, match="channel statistics"):
    run("normalize('cifar100')", np.zeros([2, 2, 1], np.uint8))


def test_rotation_and_shear_geometry():
  image = np.random.RandomState(0).randint(0, 255, (9, 9, 1)).astype(np.uint8)
  rotated = ops.affine(tf.constant(image), ops.rotation_matrix(image, 90.0), 0, "NEAREST")
  assert any(np.array_equal(rotated.numpy(), np.rot90(image, k)) for k in (1, 3))
  np.testing.assert_array_equal(run("random_rotate(0)", image).numpy(), image)
  # A vertical line sheared by 0.25 moves by 0.25 pixel per row from the centre row.
  line = np.zeros([9, 9, 1], np.uint8)
  line[:, 4] = 255
  sheared = ops.affine(tf.constant(line), ops.shear_x_matrix(line, 0.25), 0, "NEAREST").numpy()
  for y in (0, 4, 8):
    assert sheared[y, 4 - (y - 4) // 4, 0] == 255


def test_random_rotate_stays_in_range():
  # Any angle within ±30°: the central pixel never moves, corners fill with 0 sometimes.
  image = np.full([21, 21, 1], 200, np.uint8)
  outs = np.stack([run("random_rotate(30)", image, s).numpy() for s in range(20)])
  assert (outs[:, 10, 10] == 200).all()
  assert (outs[:, 0, 0] == 0).any() and (outs[:, 0, 0] == 200).any()
