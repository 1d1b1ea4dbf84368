"""AutoAugment: the policy table, magnitude mapping, PIL-equivalent ops, applied probabilities."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from spikeatconv_jax.data import autoaugment as aa

# Cubuk et al. 2019, appendix, "Policy on ImageNet": 25 sub-policies, (op, probability,
# magnitude) x 2, transcribed independently of the implementation's table.
PAPER_TABLE = """
Posterize 0.4 8 | Rotate 0.6 9
Solarize 0.6 5 | AutoContrast 0.6 5
Equalize 0.8 8 | Equalize 0.6 3
Posterize 0.6 7 | Posterize 0.6 6
Equalize 0.4 7 | Solarize 0.2 4
Equalize 0.4 4 | Rotate 0.8 8
Solarize 0.6 3 | Equalize 0.6 7
Posterize 0.8 5 | Equalize 1.0 2
Rotate 0.2 3 | Solarize 0.6 8
Equalize 0.6 8 | Posterize 0.4 6
Rotate 0.8 8 | Color 0.4 0
Rotate 0.4 9 | Equalize 0.6 2
Equalize 0.0 7 | Equalize 0.8 8
Invert 0.6 4 | Equalize 1.0 8
Color 0.6 4 | Contrast 1.0 8
Rotate 0.8 8 | Color 1.0 2
Color 0.8 8 | Solarize 0.8 7
Sharpness 0.4 7 | Invert 0.6 8
ShearX 0.6 5 | Equalize 1.0 9
Color 0.4 0 | Equalize 0.6 3
Equalize 0.4 7 | Solarize 0.2 4
Solarize 0.6 5 | AutoContrast 0.6 5
Invert 0.6 4 | Equalize 1.0 8
Color 0.6 4 | Contrast 1.0 8
Equalize 0.8 8 | Equalize 0.6 3
"""


def paper_policy():
  policy = []
  for line in PAPER_TABLE.strip().splitlines():
    sub = []
    for part in line.split("|"):
      name, prob, level = part.split()
      sub.append((name, float(prob), int(level)))
    policy.append(tuple(sub))
  return tuple(policy)


def image(h=24, w=24, seed=0):
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 200 / w + 20, yy * 180 / h + 40, (xx + yy) * 3.0 + 10], -1)
  return np.clip(base + rng.randint(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def test_policy_table_matches_paper():
  assert aa.IMAGENET_POLICY == paper_policy()
  op_ids, probs, levels = aa.policy_tensors(aa.IMAGENET_POLICY)
  for i, sub in enumerate(paper_policy()):
    for j, (name, prob, level) in enumerate(sub):
      assert aa.OP_NAMES[int(op_ids[i, j])] == name
      assert math.isclose(float(probs[i, j]), prob, rel_tol=1e-6) and float(levels[i, j]) == level


# The paper's ranges (Table of operations), magnitudes 0..10 mapped linearly; Posterize keeps
# 4..8 bits, Solarize threshold 0..256.
@pytest.mark.parametrize(
  "name,level,want",
  [
    ("Rotate", 9, 27.0), ("Rotate", 10, 30.0), ("Rotate", 3, 9.0),
    ("ShearX", 5, 0.15), ("ShearX", 10, 0.3),
    ("Solarize", 5, 128), ("Solarize", 3, 76), ("Solarize", 0, 0), ("Solarize", 10, 256),
    ("Posterize", 8, 7), ("Posterize", 5, 6), ("Posterize", 0, 4), ("Posterize", 10, 8),
    ("Color", 0, 0.1), ("Color", 10, 1.9), ("Contrast", 8, 1.54), ("Sharpness", 7, 1.36),
    ("Brightness", 5, 1.0),
  ],
)  # fmt: skip
def test_level_to_arg(name, level, want):
  got = aa.level_to_arg(name, level)
  assert float(got) == pytest.approx(want, abs=1e-5)


def test_level_to_arg_unknown_and_parameterless():
  assert aa.level_to_arg("Equalize", 7) is None
  with pytest.raises(ValueError, match="unknown AutoAugment operation"):
    aa.level_to_arg("Cutout", 3)


PIL_OPS = {
  "AutoContrast": (lambda im, m: ImageOps.autocontrast(im), 0),
  "Equalize": (lambda im, m: ImageOps.equalize(im), 0),
  "Invert": (lambda im, m: ImageOps.invert(im), 0),
  "Solarize": (lambda im, m: ImageOps.solarize(im, int(m / 10 * 256)), 0),
  "Posterize": (lambda im, m: ImageOps.posterize(im, int(m / 10 * 4) + 4), 0),
  "Color": (lambda im, m: ImageEnhance.Color(im).enhance(m / 10 * 1.8 + 0.1), 1),
  "Contrast": (lambda im, m: ImageEnhance.Contrast(im).enhance(m / 10 * 1.8 + 0.1), 1),
  "Brightness": (lambda im, m: ImageEnhance.Brightness(im).enhance(m / 10 * 1.8 + 0.1), 1),
  "Sharpness": (lambda im, m: ImageEnhance.Sharpness(im).enhance(m / 10 * 1.8 + 0.1), 1),
}


@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_pixel_ops_match_pil(name):
  pil_fn, tol = PIL_OPS[name]
  for seed, level in ((0, 0), (1, 3), (2, 7), (3, 9)):
    x = image(20, 28, seed)
    want = np.asarray(pil_fn(Image.fromarray(x), level)).astype(int)
    got = aa.apply_operation(tf.constant(x), name, level).numpy().astype(int)
    assert np.abs(got - want).max() <= tol, (name, level)


def _bright_point_angle(out):
  ys, xs = np.where(out[..., 0] > 128)
  cy = cx = (out.shape[0] - 1) / 2
  return math.degrees(math.atan2(-(ys.mean() - cy), xs.mean() - cx))


@pytest.mark.parametrize("level", [3, 8, 9])
def test_rotate_magnitude_is_the_angle(level):
  x = np.zeros([41, 41, 3], np.uint8)
  x[19:22, 34:37] = 255  # a dot 15 px right of the centre, at angle 0
  angles = [
    _bright_point_angle(aa.apply_operation(tf.constant(x), "Rotate", level, s).numpy())
    for s in (1.0, -1.0)
  ]
  assert sorted(abs(a) for a in angles) == pytest.approx([3.0 * level] * 2, abs=2.5)
  assert angles[0] * angles[1] < 0  # the sign flips the direction
  corner = aa.apply_operation(tf.constant(x), "Rotate", level).numpy()[0, 0]
  assert (corner == aa.FILL).all()  # uncovered pixels are grey


def test_shear_magnitude_is_the_slope():
  x = np.zeros([40, 40, 3], np.uint8)
  x[:, 20] = 255
  out = aa.apply_operation(tf.constant(x), "ShearX", 5, 1.0).numpy()  # shear 0.15
  cols = [np.where(out[y, :, 0] == 255)[0].mean() for y in (0, 20, 39)]
  np.testing.assert_allclose(cols, [20, 20 - 0.15 * 20, 20 - 0.15 * 39], atol=1.0)


def _candidates(x, sub):
  """Every possible outcome of a sub-policy with its probability (identical outcomes merged)."""
  outcomes = [(x, 1.0)]
  for name, prob, level in sub:
    signs = (1.0, -1.0) if name in aa.SIGNED else (1.0,)
    nxt = []
    for img, p in outcomes:
      nxt.append((img, p * (1 - prob)))
      for s in signs:
        out = aa.apply_operation(tf.constant(img), name, level, s).numpy()
        nxt.append((out, p * prob / len(signs)))
    outcomes = nxt
  merged = []
  for img, p in outcomes:
    for k, (m, q) in enumerate(merged):
      if np.array_equal(m, img):
        merged[k] = (m, q + p)
        break
    else:
      merged.append((img, p))
  return merged


def test_each_subpolicy_applies_its_ops_with_their_probabilities():
  x = image()
  n = 200
  op_ids, probs, levels = aa.policy_tensors(aa.IMAGENET_POLICY)
  sub_index = np.repeat(np.arange(len(aa.IMAGENET_POLICY)), n)
  ds = tf.data.Dataset.from_tensor_slices((sub_index, np.arange(sub_index.size))).map(
    lambda k, i: aa.apply_subpolicy_tensors(
      tf.constant(x), tf.stack([i, i * 7 + 1]), op_ids[k], probs[k], levels[k]
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  outs = np.stack(list(ds.as_numpy_iterator())).reshape(len(aa.IMAGENET_POLICY), n, *x.shape)
  for k, sub in enumerate(aa.IMAGENET_POLICY):
    candidates = _candidates(x, sub)
    counts = np.zeros(len(candidates))
    for out in outs[k]:
      match = [i for i, (c, _) in enumerate(candidates) if np.array_equal(c, out)]
      assert match, f"sub-policy {k} {sub}: output is no combination of its ops"
      counts[match[0]] += 1
    for (_, p), c in zip(candidates, counts, strict=True):
      tol = 4 * math.sqrt(p * (1 - p) / n) + 1.5 / n
      assert abs(c / n - p) <= tol, (k, sub, p, c / n)


def test_autoaugment_applies_the_chosen_subpolicy():
  x = tf.constant(image())
  chosen = []
  for seed in range(12):
    key = tf.constant([seed, 5], tf.int64)
    s_choose, s_apply = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    k = int(aa.choose_subpolicy(s_choose, 25))
    chosen.append(k)
    want = aa.apply_subpolicy(x, s_apply, aa.IMAGENET_POLICY[k])
    np.testing.assert_array_equal(aa.autoaugment(x, key).numpy(), want.numpy())
  assert len(set(chosen)) > 5


def test_subpolicy_choice_is_uniform():
  ds = tf.data.Dataset.range(5000).map(lambda i: aa.choose_subpolicy(tf.stack([i, i * 0]), 25))
  counts = np.bincount(np.fromiter(ds.as_numpy_iterator(), int), minlength=25)
  assert counts.min() > 200 - 4 * 14 and counts.max() < 200 + 4 * 14  # sd = sqrt(5000*.04*.96)


def test_autoaugment_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    aa.autoaugment(tf.zeros([8, 8, 3], tf.float32), tf.constant([0, 0], tf.int64))
  with pytest.raises(ValueError, match="unknown AutoAugment policy"):
    aa.autoaugment(tf.zeros([8, 8, 3], tf.uint8), tf.constant([0, 0], tf.int64), "cifar")
