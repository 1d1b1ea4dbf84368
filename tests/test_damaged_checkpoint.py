"""A damaged latest checkpoint: train.py and eval.py fall back to the newest readable one.

The run (tests/train_utils.py `tiny_config`, 6 steps, checkpoints every 2) stops after step 4;
the largest file of checkpoint 4 is then overwritten with random bytes, as a truncated or
corrupted upload would leave it.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_utils
from test_checkpoint import damage_largest_file

from spikeatconv_jax import checkpoint, models, optim, sharding
from spikeatconv_jax.train import loop
from spikeatconv_jax.train import state as state_lib

train_utils.enable_compile_cache()

STEPS = {"total_steps": 6}
NOISE = ("Traceback", "Event loop is closed", "Exception ignored")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="module")
def damaged(root):
  """A workdir whose checkpoints are 2 and 4, 4 unreadable."""
  workdir = os.path.join(root, "damaged")
  config = train_utils.tiny_config(root, **STEPS)
  assert loop.train_and_evaluate(config, workdir, stop_after_steps=4)["stopped"] == 4
  damage_largest_file(os.path.join(workdir, "checkpoints", "4"))
  return workdir


def _run(script, *args):
  return subprocess.run(
    [sys.executable, script, *args],
    cwd=train_utils.REPO,
    env=train_utils.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )


def _warnings(stderr):
  return [ln for ln in stderr.splitlines() if ln.startswith("W") and "cannot be read" in ln]


def _restore(root, workdir, step):
  config = train_utils.tiny_config(root, **STEPS)
  model = models.build(config.model)
  tx, _ = optim.make_optimizer(config, total_steps=6, steps_per_epoch=8)
  mesh = sharding.make_mesh(config.mesh)
  shapes = state_lib.abstract_state(model, tx, (32, 32, 1))
  target = state_lib.abstract_with_shardings(shapes, sharding.state_shardings(shapes, mesh))
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state, _ = ck.restore(step, target, config.model)
  ck.close()
  return jax.device_get(state)


@pytest.mark.slow
def test_eval_falls_back_or_stops_with_one_line(root, damaged):
  cfg = train_utils.write_config_file(root, "six.py", **STEPS)
  r = _run("eval.py", "--config", cfg, "--workdir", damaged, "--step", "4")
  assert r.returncode == 1, r.stderr[-3000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
  assert len(lines) == 1 and "checkpoints/4 cannot be read: " in lines[0], r.stderr[-3000:]
  assert not any(n in r.stderr + r.stdout for n in NOISE), r.stderr[-3000:]

  r = _run("eval.py", "--config", cfg, "--workdir", damaged)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = _warnings(r.stderr)
  assert len(warnings) == 1 and "checkpoints/4 cannot be read: " in warnings[0], r.stderr
  assert "using step 2 instead" in warnings[0] and "moved" not in warnings[0]
  assert not any(n in r.stderr + r.stdout for n in NOISE), r.stderr[-3000:]
  assert json.load(open(os.path.join(damaged, "eval_test_2.json")))["step"] == 2
  # eval reads only: the damaged checkpoint is where it was.
  assert sorted(os.listdir(os.path.join(damaged, "checkpoints"))) == ["2", "4"]


@pytest.mark.slow
def test_train_resumes_from_the_newest_readable_checkpoint(root, damaged):
  workdir = os.path.join(root, "resumed")
  shutil.copytree(damaged, workdir)
  cfg = train_utils.write_config_file(root, "six.py", **STEPS)
  r = _run("train.py", "--config", cfg, "--workdir", workdir)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = _warnings(r.stderr)
  assert len(warnings) == 1, r.stderr[-3000:]
  assert "checkpoints/4 cannot be read: " in warnings[0] and "using step 2 instead" in warnings[0]
  assert not any(n in r.stderr + r.stdout for n in NOISE), r.stderr[-3000:]
  # Nothing deleted: the unreadable step is set aside, and training wrote step 4 again.
  assert os.listdir(os.path.join(workdir, "checkpoints.unreadable")) == ["4"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3-4 trained again from step 2

  # The same parameters as a run that was never interrupted.
  straight = os.path.join(root, "straight")
  loop.train_and_evaluate(train_utils.tiny_config(root, **STEPS), straight)
  a, b = _restore(root, straight, 6), _restore(root, workdir, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
