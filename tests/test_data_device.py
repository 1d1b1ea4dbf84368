"""The device part of the pp strings: the host/device cut, normalize's values, random erasing,
and the train step that runs them (with mixup pairs kept on their device)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import train_utils

from configs import cifar100_resnet18, default, imagenet
from spikeatconv_jax import optim, sharding
from spikeatconv_jax.data import device_ops, ops
from spikeatconv_jax.train import state as state_lib
from spikeatconv_jax.train import step as step_lib


def test_split_pp_of_the_configs():
  cases = {
    default: ("decode(1)|flip_lr", "normalize('fashion_mnist')"),
    cifar100_resnet18: (
      "decode|flip_lr|random_rotate(30)|random_shear(10)",
      "normalize('cifar100')",
    ),
    imagenet: (
      "decode_jpeg_and_inception_crop(224)|flip_lr|autoaugment",
      "normalize('imagenet')|random_erase(0.25)",
    ),
  }
  for module, want in cases.items():
    dataset = module.get_config().dataset
    assert device_ops.split_pp(dataset.pp_train) == want
    host, device = device_ops.split_pp(dataset.pp_eval)
    assert device.startswith("normalize(") and "normalize" not in host
  assert device_ops.split_pp("decode|pad(2)") == ("decode|pad(2)", "")


def test_split_pp_errors():
  with pytest.raises(ValueError, match="no device form"):
    device_ops.split_pp("decode|normalize('imagenet')|flip_lr")
  with pytest.raises(ValueError, match="put it after normalize"):
    device_ops.split_pp("decode|random_erase(0.5)|normalize('imagenet')")
  with pytest.raises(ValueError, match="unknown statistics"):
    device_ops.preprocess_fn("normalize('nope')")
  with pytest.raises(ValueError, match="no rng"):
    device_ops.preprocess_fn("random_erase(0.5)")(None, jnp.zeros([1, 4, 4, 3]))


@pytest.mark.parametrize("stats,channels", [("imagenet", 3), ("cifar100", 3), ("fashion_mnist", 1)])
def test_normalize_on_device_equals_the_host_op(stats, channels):
  images = np.random.RandomState(0).randint(0, 256, (4, 9, 7, channels)).astype(np.uint8)
  host = ops.normalize(tf.constant(images), stats).numpy()
  on_device = jax.jit(lambda x: device_ops.apply(f"decode|normalize('{stats}')", x, None))
  got = np.asarray(on_device(images))
  assert got.dtype == np.float32
  # XLA fuses the multiply-add (one rounding) where TF rounds the product first: the two differ
  # by at most that rounding, half an ulp of a product below 8 (2**-21 < 5e-7).
  np.testing.assert_allclose(got, host, rtol=0, atol=5e-7)


def test_without_device_ops_only_a_cast_and_float_batches_pass():
  images = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1).astype(np.uint8)
  out = device_ops.apply("decode(1)|pad(2)", jnp.asarray(images), None)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, images.astype(np.float32))
  floats = jnp.asarray(images, jnp.float32) / 7
  assert device_ops.apply("decode|normalize('imagenet')", floats, None) is floats


def test_random_erase_box_and_probability():
  images = jnp.zeros([400, 40, 40, 3], jnp.float32)
  erase = jax.jit(device_ops.preprocess_fn("random_erase(0.25)"))
  out = np.asarray(erase(jax.random.key(0), images))
  erased = 0
  for image in out:
    changed = np.any(image != 0, axis=-1)
    if changed.any():
      erased += 1
      rows, cols = np.where(changed)
      box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
      assert changed.sum() == box  # one rectangle, all of it noise
      assert 0.02 * 0.7 <= box / 1600 <= 1 / 3 * 1.3
  # Each example draws on its own: about a quarter of the batch is erased.
  assert 0.25 - 0.07 < erased / 400 < 0.25 + 0.07
  noise = out[np.any(out != 0, axis=-1)]
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1


def test_random_erase_follows_normalize_and_keeps_unerased_pixels():
  images = np.random.RandomState(1).randint(0, 256, (16, 12, 12, 3)).astype(np.uint8)
  pp = "decode|normalize('imagenet')|random_erase(0.5)"
  out = np.asarray(device_ops.apply(pp, jnp.asarray(images), jax.random.key(3)))
  normalised = np.asarray(device_ops.apply("normalize('imagenet')", jnp.asarray(images), None))
  kept = np.all(out == normalised, axis=-1)
  assert kept.any() and not kept.all()
  again = np.asarray(device_ops.apply(pp, jnp.asarray(images), jax.random.key(3)))
  np.testing.assert_array_equal(out, again)  # a function of the key


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.Conv(4, (3, 3), name="conv")(x)
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def _step_setup(tmp_path, **overrides):
  config = train_utils.tiny_config(str(tmp_path), **overrides)
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optim.make_optimizer(config, total_steps=10, steps_per_epoch=4)
  state, shardings = state_lib.create_train_state(_Net(), tx, (8, 8, 1), mesh, config.seed)
  step = step_lib.make_train_step(_Net(), tx, config, mesh, shardings)
  return config, mesh, state, step


def test_train_step_normalises_uint8_batches_as_the_host_did(tmp_path):
  config, mesh, state, step = _step_setup(tmp_path)
  rng = np.random.RandomState(0)
  pixels = rng.randint(0, 256, (8, 8, 8, 1)).astype(np.uint8)
  labels = rng.randint(0, 10, 8).astype(np.int32)
  host = ops.normalize(tf.constant(pixels), "fashion_mnist").numpy()
  sh = sharding.batch_sharding(mesh)
  losses = []
  for images in (pixels, host):
    batch = {"image": jax.device_put(images, sh), "label": jax.device_put(labels, sh)}
    losses.append(float(step(jax.tree.map(jnp.copy, state), batch, 1e-3)[1]["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_train_step_with_mixup_exchanges_no_images(tmp_path):
  # With mixup and cutmix on, the step's only cross-device traffic is the gradient and
  # statistics reductions; the old global pairing showed up as a collective-permute.
  config, mesh, state, step = _step_setup(tmp_path, mixup=0.8, cutmix=1.0)
  sh = sharding.batch_sharding(mesh)
  batch = {
    "image": jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.uint8, sharding=sh),
    "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=sh),
  }
  hlo = step.lower(state, batch, 1e-3).compile().as_text()
  assert "collective-permute" not in hlo and "all-to-all" not in hlo
