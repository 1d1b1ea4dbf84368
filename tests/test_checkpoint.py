"""Checkpointer: restore onto another mesh, keep-N, config/shape mismatch errors, unreadable
checkpoints, URL directories, the SIGTERM flag."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import model_config
from spikeatconv_jax import checkpoint, sharding
from spikeatconv_jax.train.state import TrainState, abstract_with_shardings


def _state(scale=1.0, width=512):
  params = {"dense": {"kernel": scale * jnp.arange(64.0 * width).reshape(64, width)}}
  params["dense"]["bias"] = jnp.full((width,), scale)
  tx = optax.adam(1e-3)
  return TrainState(
    step=jnp.asarray(3, jnp.int32),
    params=params,
    batch_stats={"bn": {"mean": jnp.ones(width)}},
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(7),
  )


def _put(state, mesh):
  sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, min_size=1024)
  return jax.device_put(state, sh), sh


def test_restore_onto_another_mesh(tmp_path):
  fsdp = sharding.make_mesh((("data", -1), ("fsdp", 4)))
  state, sh = _put(_state(), fsdp)
  assert state.params["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2)
  meta = {"step": 3, "data_position": 3, "model_config": checkpoint.config_to_dict(model_config())}
  ck.save(3, state, meta)
  ck.wait()
  for target_mesh in (
    sharding.make_mesh((("data", -1),), jax.devices()[:1]),
    sharding.make_mesh((("data", -1), ("fsdp", 2))),
  ):
    shapes = jax.eval_shape(lambda: _state())
    tsh = sharding.state_shardings(shapes, target_mesh, min_size=1024)
    restored, rmeta = ck.restore(3, abstract_with_shardings(shapes, tsh), model_config())
    assert rmeta == meta
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(tsh)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == s  # lands on the current mesh with the current rules
  ck.close()


def test_keep_n_and_latest(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), every=1, keep=2)
  state = _state(width=8)
  for step in (1, 2, 3, 4):
    ck.save(step, state, {"step": step})
  ck.wait()
  assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
  ck.close()


def test_model_config_mismatch_is_a_clear_error(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
  saved = model_config(variant="nano", spk="mbpl")
  ck.save(1, _state(width=8), {"model_config": checkpoint.config_to_dict(saved)})
  ck.wait()
  other = model_config(variant="tiny", spk="sl", timesteps=2)
  with pytest.raises(ValueError) as e:
    ck.check_model_config(1, other)
  msg = str(e.value)
  assert "different model config" in msg
  for line in (
    "model.variant: checkpoint 'nano' != config 'tiny'",
    "model.spk.kind: checkpoint 'mbpl' != config 'sl'",
    "model.timesteps: checkpoint 1 != config 2",
  ):
    assert line in msg, msg
  # Compute dtype, remat and drop_path may change between save and restore.
  same = model_config(variant="nano", spk="mbpl")
  same.dtype, same.remat, same.drop_path, same.scan_blocks = "bfloat16", True, 0.3, True
  ck.check_model_config(1, same)
  ck.close()


def test_config_saved_before_new_fields_matches_their_defaults():
  """A checkpoint's config written before time_mode / spk_after_branch_out / scan_blocks
  existed restores under a config holding their defaults, and only under those."""
  current = checkpoint.config_to_dict(model_config(variant="nano", spk="mbpl"))
  old = {k: v for k, v in current.items() if k not in checkpoint.ADDED_FIELD_DEFAULTS}
  assert len(old) == len(current) - len(checkpoint.ADDED_FIELD_DEFAULTS)
  assert checkpoint.model_config_diff(old, current) == []
  changed = dict(current, time_mode="neuron")
  assert checkpoint.model_config_diff(old, changed) == [
    "model.time_mode: checkpoint 'network' != config 'neuron'"
  ]


def test_shape_mismatch_is_a_clear_error(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, _state(width=8), {"step": 1})
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"))  # a fresh manager, as after a restart
  shapes = jax.eval_shape(lambda: _state(width=16))
  mesh = sharding.make_mesh((("data", -1),))
  target = abstract_with_shardings(shapes, sharding.state_shardings(shapes, mesh))
  with pytest.raises(ValueError, match=r"does not fit the current model") as e:
    ck.restore(1, target)
  assert "params/dense/kernel: checkpoint (64, 8) != model (64, 16)" in str(e.value)
  assert "(7 arrays differ)" in str(e.value)  # kernel, bias, mu and nu of each, BN mean
  ck.close()


def test_stop_signal_sets_a_flag_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.StopSignal() as stop:
    assert not stop
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop and stop.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == before


def _abstract_target(width=8):
  shapes = jax.eval_shape(lambda: _state(width=width))
  mesh = sharding.make_mesh((("data", -1),))
  return abstract_with_shardings(shapes, sharding.state_shardings(shapes, mesh))


def damage_largest_file(step_dir) -> str:
  """Overwrites the largest file under `step_dir` with random bytes of the same size."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.RandomState(0).bytes(size))
  return path


def _saved(directory, steps, width=64):
  ck = checkpoint.Checkpointer(directory, keep=5)
  for step in steps:
    ck.save(step, _state(scale=float(step), width=width), {"step": step})
  ck.close()


# The abandoned reads of a failed restore must not print tracebacks.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_latest_falls_back_to_the_newest_readable(tmp_path, caplog):
  directory = str(tmp_path / "ck")
  _saved(directory, (1, 2, 3))
  damage_largest_file(os.path.join(directory, "3"))
  ck = checkpoint.Checkpointer(directory, keep=5)
  target = _abstract_target(width=64)
  with pytest.raises(checkpoint.CheckpointUnreadableError, match=r"ck/3 cannot be read: ") as e:
    ck.restore(3, target)
  assert len(str(e.value).splitlines()) == 1
  caplog.clear()
  step, state, meta = ck.restore_latest_readable(target)
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state.params["dense"]["bias"]), np.full(64, 2.0))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings
  assert "ck/3 cannot be read: " in warnings[0] and "using step 2 instead" in warnings[0]
  # Moved aside, not deleted, so that step 3 can be written again.
  assert ck.all_steps() == [1, 2]
  assert os.path.isdir(str(tmp_path / "ck.unreadable" / "3"))
  ck.save(3, _state(scale=5.0, width=64), {"step": 3}, force=True)
  ck.close()
  ck = checkpoint.Checkpointer(directory, read_only=True)
  assert ck.restore_latest_readable(target)[0] == 3


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_read_only_fallback_moves_nothing_and_no_readable_one_is_an_error(tmp_path, caplog):
  directory = str(tmp_path / "ck")
  _saved(directory, (1, 2))
  damage_largest_file(os.path.join(directory, "2"))
  target = _abstract_target(width=64)
  ck = checkpoint.Checkpointer(directory, read_only=True)
  assert ck.restore_latest_readable(target)[0] == 1
  assert ck.all_steps() == [1, 2] and not os.path.exists(str(tmp_path / "ck.unreadable"))
  damage_largest_file(os.path.join(directory, "1"))
  with pytest.raises(checkpoint.CheckpointUnreadableError, match=r"no checkpoint in .* can be"):
    ck.restore_latest_readable(target)
  ck.close()
  assert checkpoint.Checkpointer(str(tmp_path / "empty")).restore_latest_readable(target) is None


def test_damaged_metadata_is_unreadable_not_a_mismatch(tmp_path):
  directory = str(tmp_path / "ck")
  saved = model_config(variant="nano", spk="mbpl")
  ck = checkpoint.Checkpointer(directory, keep=5)
  for step in (1, 2):
    ck.save(step, _state(width=8), {"step": step, "model_config": checkpoint.config_to_dict(saved)})
  ck.close()
  with open(os.path.join(directory, "2", "meta", "metadata"), "w") as f:
    f.write("{not json")
  ck = checkpoint.Checkpointer(directory, keep=5)
  with pytest.raises(checkpoint.CheckpointUnreadableError):
    ck.meta(2)
  ck.check_model_config(2, saved)  # the restore reports it, not the config check
  assert ck.restore_latest_readable(_abstract_target(), saved)[0] == 1
  # A readable checkpoint of another model is still a clear mismatch, never skipped.
  other = model_config(variant="tiny", spk="sl", timesteps=2)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="different model config"):
    ck.restore_latest_readable(_abstract_target(), other)
  ck.close()


def test_url_directory_is_not_made_local():
  url = checkpoint.as_path("gs://bucket/run/checkpoints")
  assert str(url) == "gs://bucket/run/checkpoints" and str(url / "3") == url.as_posix() + "/3"
  assert str(checkpoint.as_path("rel/ck")) == os.path.join(os.getcwd(), "rel", "ck")
