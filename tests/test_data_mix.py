"""Mixup / CutMix: label mass, image = mixing weights, CutMix box area = label weight."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikeatconv_jax.data.mix import cutmix_box, mix_batch

B, H, W, C, K = 6, 16, 20, 3, 10


def batch(seed=0):
  images = jax.random.uniform(jax.random.key(seed), (B, H, W, C)) + 1.0  # no exact ties
  labels = jax.nn.one_hot(jnp.arange(B) % K, K)  # distinct classes, partners differ
  return images, labels


@functools.partial(jax.jit, static_argnames=("mixup_alpha", "cutmix_alpha"))
def _MIX(keys, images, labels, mixup_alpha, cutmix_alpha, switch_prob=0.5):  # noqa: N802
  def one(key):
    return mix_batch(
      key, images, labels, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      switch_prob=switch_prob,
    )  # fmt: skip

  return jax.vmap(one)(keys)


N = 200  # draws per call: one compile per (mixup_alpha, cutmix_alpha); compiles are slow here


def mixed_many(n, labels=None, switch_prob=0.5, **kw):
  """The first n of N independent draws."""
  images, onehot = batch()
  labels = onehot if labels is None else labels
  keys = jax.random.split(jax.random.key(42), N)
  out_images, out_labels = jax.tree.map(
    lambda a: a[:n], _MIX(keys, images, labels, switch_prob=switch_prob, **kw)
  )
  return np.asarray(images), np.asarray(labels), np.asarray(out_images), np.asarray(out_labels)


def own_weight(labels_out):
  # Example i's own class is i; its partner (the reversed batch) is B-1-i.
  return np.array([labels_out[i, i] for i in range(B)])


def is_cutmix(images, out):
  """Every pixel comes unchanged from the image or its partner (an empty box included)."""
  own = np.isclose(out, images).all(-1)
  partner = np.isclose(out, images[::-1]).all(-1)
  return bool((own | partner).all())


@pytest.mark.parametrize("kw", [
  dict(mixup_alpha=0.8, cutmix_alpha=0.0),
  dict(mixup_alpha=0.0, cutmix_alpha=1.0),
  dict(mixup_alpha=0.8, cutmix_alpha=1.0),
])  # fmt: skip
def test_label_mass_is_one(kw):
  _, _, _, out_labels = mixed_many(8, **kw)
  np.testing.assert_allclose(out_labels.sum(-1), 1.0, rtol=1e-6)
  assert (out_labels >= 0).all()


def test_mixup_image_equals_label_weights():
  images, _, outs, outs_labels = mixed_many(5, mixup_alpha=0.8, cutmix_alpha=0.0)
  for out, out_labels in zip(outs, outs_labels, strict=True):
    lam = own_weight(out_labels)
    assert np.allclose(lam, lam[0])  # one weight per batch
    want = lam[0] * images + (1 - lam[0]) * images[::-1]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_labels[np.arange(B), B - 1 - np.arange(B)], 1 - lam[0])


def test_cutmix_box_area_equals_label_weight():
  seen_partial = 0
  images, _, outs, outs_labels = mixed_many(10, mixup_alpha=0.0, cutmix_alpha=1.0)
  for out, out_labels in zip(outs, outs_labels, strict=True):
    partner = np.isclose(out, images[::-1]).all(-1)  # [B, H, W]
    own = np.isclose(out, images).all(-1)
    assert (partner | own).all()  # every pixel is from one of the two images
    lam = own_weight(out_labels)
    for i in range(B):
      area = partner[i].mean()
      assert lam[i] == pytest.approx(1 - area, abs=1e-6)
      if partner[i].any():
        rows, cols = np.where(partner[i])
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == partner[i].sum()  # a rectangle
        seen_partial += 0 < area < 1
  assert seen_partial > 0


def test_cutmix_box_geometry():
  # lam = 0.75 -> side fractions sqrt(0.25) = 0.5: an 8x10 box when it is not clipped.
  sizes = set()
  for seed in range(50):
    box = cutmix_box(jax.random.key(seed), H, W, jnp.float32(0.75))
    top, bottom, left, right = (int(v) for v in box)
    assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
    sizes.add((bottom - top, right - left))
  assert (8, 10) in sizes and all(h <= 8 and w <= 10 for h, w in sizes)


def test_switch_probability():
  for p, lo, hi in ((0.0, 0, 0), (1.0, 200, 200), (0.5, 70, 130)):
    images, _, outs, _ = mixed_many(200, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=p)
    n_cut = sum(is_cutmix(images, o) for o in outs)
    assert lo <= n_cut <= hi, (p, n_cut)


def test_disabled_and_soft_labels():
  images, labels = batch()
  out_images, out_labels = mix_batch(
    jax.random.key(0), images, labels, mixup_alpha=0.0, cutmix_alpha=0.0
  )
  np.testing.assert_array_equal(out_images, images)
  np.testing.assert_array_equal(out_labels, labels)
  smooth = labels * 0.9 + 0.1 / K  # label-smoothed input keeps unit mass
  _, _, _, out_labels = mixed_many(N, labels=smooth, mixup_alpha=0.8, cutmix_alpha=1.0)
  np.testing.assert_allclose(out_labels.sum(-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match=">= 0"):
    mix_batch(jax.random.key(0), images, labels, mixup_alpha=-1.0, cutmix_alpha=1.0)
  with pytest.raises(ValueError, match="expected images"):
    mix_batch(jax.random.key(0), images[0], labels, mixup_alpha=0.8, cutmix_alpha=1.0)


def test_bfloat16_images_keep_dtype():
  images, labels = batch()
  out = jax.eval_shape(
    lambda r, x: mix_batch(r, x, labels, mixup_alpha=0.8, cutmix_alpha=1.0)[0],
    jax.random.key(0),
    images.astype(jnp.bfloat16),
  )
  assert out.dtype == jnp.bfloat16 and out.shape == images.shape


def test_partners_stay_within_their_group():
  # 3 groups of 2 (the device shards of a batch sharded 3 ways): i pairs with the other example
  # of its own group, never with the reversed global batch's B-1-i.
  images, labels = batch()
  out_images, out_labels = mix_batch(
    jax.random.key(1), images, labels, mixup_alpha=0.8, cutmix_alpha=0.0, num_groups=3
  )
  lam = own_weight(np.asarray(out_labels))[0]
  partner = np.array([1, 0, 3, 2, 5, 4])
  np.testing.assert_allclose(np.asarray(out_labels)[np.arange(B), partner], 1 - lam, rtol=1e-5)
  want = lam * np.asarray(images) + (1 - lam) * np.asarray(images)[partner]
  np.testing.assert_allclose(out_images, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="groups"):
    mix_batch(jax.random.key(1), images, labels, mixup_alpha=0.8, cutmix_alpha=1.0, num_groups=4)


def _compiled_mix_hlo(num_groups):
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(
    functools.partial(mix_batch, mixup_alpha=0.8, cutmix_alpha=1.0, num_groups=num_groups),
    in_shardings=(replicated, sharded, sharded),
    out_shardings=(sharded, sharded),
  )
  images = jax.ShapeDtypeStruct((16, H, W, C), jnp.float32)
  labels = jax.ShapeDtypeStruct((16, K), jnp.float32)
  return fn.lower(jax.random.key(0), images, labels).compile().as_text()


def test_mixing_per_shard_moves_nothing_between_devices():
  collectives = ("collective-permute", "all-to-all", "all-gather", "all-reduce")
  per_shard = _compiled_mix_hlo(num_groups=8)
  assert not [c for c in collectives if c in per_shard]
  # The check can fail: pairing across the whole batch exchanges the shards.
  assert [c for c in collectives if c in _compiled_mix_hlo(num_groups=1)]
