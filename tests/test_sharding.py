"""Mesh construction and sharding rules on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from spikeatconv_jax import sharding


def test_mesh_sizes():
  assert jax.device_count() == 8
  m = sharding.make_mesh((("data", -1), ("fsdp", 1)))
  assert dict(m.shape) == {"data": 8, "fsdp": 1}
  m = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  assert dict(m.shape) == {"data": 4, "fsdp": 2}
  m = sharding.make_mesh((("data", -1),), jax.devices()[:1])
  assert dict(m.shape) == {"data": 1}
  assert sharding.batch_size_per_step(sharding.make_mesh((("data", 2), ("fsdp", 4)))) == 8


@pytest.mark.parametrize(
  "spec, match",
  [
    ((("data", -1), ("model", 2)), "unknown axis"),
    ((("fsdp", 8),), "must have a 'data' axis"),
    ((("data", -1), ("fsdp", -1)), "at most one axis"),
    ((("data", 3), ("fsdp", 1)), "does not divide"),
    ((("data", 2), ("fsdp", 2)), "has 4 devices, but 8"),
  ],
)
def test_mesh_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(spec)


def test_batch_sharding_splits_over_data_and_fsdp():
  m = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  sh = sharding.batch_sharding(m)
  assert sh.spec == P(("data", "fsdp"))
  x = jax.device_put(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), sh)
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
  assert len({s.index[0].start for s in x.addressable_shards}) == 8  # 8 distinct row slices


def test_fsdp_rule_shards_big_params_and_moments_only():
  state = {
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "params": {
      "big": jax.ShapeDtypeStruct((256, 96), jnp.float32),  # 96 = 2 * 48: dim 0 is largest
      "odd": jax.ShapeDtypeStruct((255, 129), jnp.float32),  # both dimensions odd
      "small": jax.ShapeDtypeStruct((16,), jnp.float32),
    },
    "opt_state": {"mu": {"big": jax.ShapeDtypeStruct((256, 96), jnp.float32)}},
    "batch_stats": {"mean": jax.ShapeDtypeStruct((4096, 8), jnp.float32)},
  }
  m = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  sh = sharding.state_shardings(state, m)
  assert sh["params"]["big"].spec == P("fsdp", None)
  assert sh["params"]["odd"].spec == P()  # 255 and 129 are odd: replicated
  assert sh["params"]["small"].spec == P()  # below min_size
  assert sh["opt_state"]["mu"]["big"].spec == P("fsdp", None)
  assert sh["batch_stats"]["mean"].spec == P()  # statistics stay replicated
  assert sh["step"].spec == P()
  # Without an fsdp axis of size > 1 everything is replicated.
  rep = sharding.state_shardings(state, sharding.make_mesh((("data", -1), ("fsdp", 1))))
  assert all(s.spec == P() for s in jax.tree.leaves(rep))
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    sharding.state_shardings(state, m, strategy="zero")


def test_fsdp_sharded_array_holds_a_slice_per_device():
  m = sharding.make_mesh((("data", -1), ("fsdp", 4)))
  state = {"params": {"w": jax.ShapeDtypeStruct((64, 512), jnp.float32)}}
  sh = sharding.state_shardings(state, m)["params"]["w"]
  assert sh.spec == P(None, "fsdp")  # the largest dimension
  x = jax.device_put(jnp.ones((64, 512)), sh)
  assert {s.data.shape for s in x.addressable_shards} == {(64, 128)}
