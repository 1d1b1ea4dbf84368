"""The train step: 1 device == 8 devices, gradient accumulation == one big batch, bf16 compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils

from spikeatconv_jax import models, optim, sharding
from spikeatconv_jax.train import state as state_lib
from spikeatconv_jax.train import step as step_lib

train_utils.enable_compile_cache()


def _batch(mesh, n=8, seed=0, size=32):
  rng = np.random.RandomState(seed)
  sh = sharding.batch_sharding(mesh)
  return {
    "image": jax.device_put(rng.randn(n, size, size, 1).astype(np.float32), sh),
    "label": jax.device_put(rng.randint(0, 10, n).astype(np.int32), sh),
  }


def _run(config, model, devices, steps=2, image_shape=(32, 32, 1)):
  mesh = sharding.make_mesh(config.mesh, devices)
  tx, sched = optim.make_optimizer(config, total_steps=10, steps_per_epoch=4)
  lrs = optim.schedule_table(sched, 10)
  state, shardings = state_lib.create_train_state(model, tx, image_shape, mesh, config.seed)
  step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  losses = []
  for i in range(steps):
    state, m = step(state, _batch(mesh, config.batch_size, seed=i, size=image_shape[0]), lrs[i])
    losses.append(float(m["loss"]))
  return jax.device_get(state), losses, jax.device_get(m)


@pytest.mark.slow
def test_one_device_equals_eight_devices(tmp_path):
  # Tolerance: the 8-way program reduces BatchNorm statistics and gradients in another order,
  # so values differ by float32 rounding (~1e-7 relative). Adam's first steps divide by
  # sqrt(v) ~ |g|, which turns a rounding difference of a near-zero gradient into a parameter
  # difference of up to ~lr; we therefore compare parameters with atol = 0.5 * lr and require
  # the mean difference to be tiny, and compare losses to 1e-5 relative.
  config = train_utils.tiny_config(str(tmp_path))
  model = models.build(config.model)
  one, loss1, m1 = _run(config, model, jax.devices()[:1])
  eight, loss8, m8 = _run(config, model, jax.devices())
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(m1["firing_rate"], m8["firing_rate"], rtol=1e-4, atol=1e-6)
  lr = float(m1["lr"])
  diffs = []
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, atol=0.5 * lr, rtol=0)
    diffs.append(np.abs(a - b).ravel())
  assert np.concatenate(diffs).mean() < 1e-3 * lr
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert int(one.step) == int(eight.step) == 2


class _Net(nn.Module):
  """A BatchNorm-free stand-in, so one big batch and two micro-batches see the same math."""

  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, *, train):
    del train
    x = nn.Conv(4, (3, 3), dtype=self.dtype, name="conv")(x)
    x = nn.Dense(10, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2)))
    return x.astype(jnp.float32)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  # Two micro-batches of 8 average to the gradient of the 16-example batch: the states agree
  # to float32 rounding (1e-5 relative).
  base = train_utils.tiny_config(str(tmp_path), batch_size=16, label_smoothing=0.1)
  accum = train_utils.tiny_config(
    str(tmp_path), batch_size=16, label_smoothing=0.1, grad_accum_steps=2
  )
  a, la, ma = _run(base, _Net(), jax.devices(), image_shape=(8, 8, 1))
  b, lb, mb = _run(accum, _Net(), jax.devices(), image_shape=(8, 8, 1))
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  np.testing.assert_allclose(ma["accuracy"], mb["accuracy"], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_float32_state(tmp_path):
  config = train_utils.tiny_config(str(tmp_path))
  state, losses, m = _run(config, _Net(dtype="bfloat16"), jax.devices(), image_shape=(8, 8, 1))
  assert np.isfinite(losses).all() and m["finite"] == 1.0
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_fsdp_sharded_step_equals_one_device(tmp_path):
  # FSDP shards the conv/head weights and their Adam moments over "fsdp" (min_size lowered so
  # the small stand-in's weights qualify); the update matches the 1-device one to rounding.
  config = train_utils.tiny_config(str(tmp_path), batch_size=16)
  config.mesh = (("data", -1), ("fsdp", 2))
  model = _Net()
  tx, sched = optim.make_optimizer(config, total_steps=10, steps_per_epoch=4)
  lrs = optim.schedule_table(sched, 10)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(config.mesh if len(devices) > 1 else (("data", 1),), devices)
    shapes = state_lib.abstract_state(model, tx, (8, 8, 1))
    shardings = sharding.state_shardings(shapes, mesh, min_size=32)
    state = jax.jit(state_lib.init_fn(model, tx, (8, 8, 1)), out_shardings=shardings)(
      jax.random.PRNGKey(0)
    )
    if len(devices) > 1:
      spec = state.params["head"]["kernel"].sharding.spec
      assert "fsdp" in tuple(spec), spec  # [4, 10]: the 10 columns split in 2
    step = step_lib.make_train_step(model, tx, config, mesh, shardings)
    for i in range(2):
      state, m = step(state, _batch(mesh, 16, seed=i, size=8), lrs[i])
    results.append((jax.device_get(state.params), float(m["loss"])))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
