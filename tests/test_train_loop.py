"""train_and_evaluate on 8 fake devices: outputs, resume == straight, NaN stop, config mismatch.

All runs use the same nano program (tests/train_utils.py `tiny_config`: batch 8, 32 px, SL,
T=1, 4 steps, checkpoints every 2), compiled once thanks to the shared compilation cache.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import train_utils

from spikeatconv_jax import checkpoint, models, optim, sharding
from spikeatconv_jax.train import loop
from spikeatconv_jax.train import state as state_lib

train_utils.enable_compile_cache()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("loop"))


@pytest.fixture(scope="module")
def straight(root):
  """4 steps in one go."""
  workdir = os.path.join(root, "straight")
  final = loop.train_and_evaluate(train_utils.tiny_config(root), workdir)
  return workdir, final


@pytest.fixture(scope="module")
def resumed(root, straight):
  """2 steps, a stop (as on SIGTERM: save, return), then a restart that runs steps 3-4."""
  workdir = os.path.join(root, "resumed")
  first = loop.train_and_evaluate(train_utils.tiny_config(root), workdir, stop_after_steps=2)
  assert first == {"stopped": 2, "checkpoint_dir": os.path.join(workdir, "checkpoints")}
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  final = loop.train_and_evaluate(train_utils.tiny_config(root), workdir)
  return workdir, final


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _restore(root, workdir, step):
  config = train_utils.tiny_config(root)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config, total_steps=4, steps_per_epoch=8)
  mesh = sharding.make_mesh(config.mesh)
  shapes = state_lib.abstract_state(model, tx, (32, 32, 1))
  target = state_lib.abstract_with_shardings(shapes, sharding.state_shardings(shapes, mesh))
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state, meta = ck.restore(step, target, config.model)
  ck.close()
  return jax.device_get(state), meta


def test_outputs_of_a_run(straight):
  workdir, final = straight
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["total_steps"] == 4 and config["model"]["variant"] == "nano"
  rows = _rows(workdir)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]  # log_every_steps = 1
  for r in train:
    for key in ("loss", "accuracy", "lr", "grad_norm", "images_per_s", "eta_s", "firing_rate"):
      assert np.isfinite(r[key]), (key, r)
    assert {"firing_rate/stem", "firing_rate/stage0", "firing_rate/stage3"} <= set(r)
  evals = [r for r in rows if "eval/top1" in r]
  assert [r["step"] for r in evals] == [4]
  saved = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert saved["step"] == 4 and saved["num_params"] == final["num_params"] > 0
  ev = saved["eval"]
  assert ev["num_examples"] == 24 and 0 <= ev["top1"] <= ev["top5"] <= 1
  assert np.isfinite(ev["loss"]) and saved["energy_mj_per_image"] > 0
  sites = saved["firing_rates"]
  assert sites and all(
    k.split("/")[0] in ("stem", "stage0", "stage1", "stage2", "stage3") for k in sites
  )
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_resume_equals_straight(root, straight, resumed):
  # Same data, same rng per step, same optimizer state: the restarted run retraces the
  # uninterrupted one. Tolerance 1e-6 (absolute) on parameters and 1e-6 relative on losses;
  # in practice the two are bit-identical (same compiled program, same inputs).
  rows_a = [r for r in _rows(straight[0]) if "loss" in r]
  rows_b = [r for r in _rows(resumed[0]) if "loss" in r]
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in rows_a], [r["loss"] for r in rows_b], rtol=1e-6)
  a, meta_a = _restore(root, straight[0], 4)
  b, meta_b = _restore(root, resumed[0], 4)
  assert meta_a["data_position"] == meta_b["data_position"] == 4
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
  assert resumed[1]["eval"]["top1"] == straight[1]["eval"]["top1"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(root, resumed):
  # Start from the good step-2 checkpoint with lr = inf: step 3 produces inf/NaN parameters.
  workdir = os.path.join(root, "nan")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copytree(
    os.path.join(resumed[0], "checkpoints", "2"), os.path.join(workdir, "checkpoints", "2")
  )
  config = train_utils.tiny_config(root, lr=float("inf"))
  with pytest.raises(loop.NonFiniteLossError, match="non-finite loss") as e:
    loop.train_and_evaluate(config, workdir)
  assert "last good checkpoint is step 2" in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # nothing bad saved


def test_mismatched_model_config_is_a_clear_error(root, straight):
  config = train_utils.tiny_config(root)
  config.model.spk.kind = "mbpl"
  config.model.spk.thresholds = (0.2, 1.0, 2.0, 4.0)
  with pytest.raises(ValueError, match="different model config") as e:
    loop.train_and_evaluate(config, straight[0])
  assert "model.spk.kind: checkpoint 'sl' != config 'mbpl'" in str(e.value)
  assert "model.spk.thresholds" in str(e.value)
