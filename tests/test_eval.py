"""eval.py on a checkpoint of a short run: every reported field, the JSON files, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import train_utils

from spikeatconv_jax.train import evaluate, loop

train_utils.enable_compile_cache()

FIELDS = ("step", "split", "num_examples", "top1", "top5", "loss", "firing_rates")
FIELDS += ("energy_mj_per_image", "images_per_s", "firing_rates_per_stage", "firing_rates_note")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("eval"))
  workdir = os.path.join(root, "run")
  loop.train_and_evaluate(train_utils.tiny_config(root), workdir)
  return root, workdir


def _eval(args):
  return subprocess.run(
    [sys.executable, "eval.py", *args],
    cwd=train_utils.REPO,
    env=train_utils.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_eval_reports_every_field(run):
  root, workdir = run
  cfg = train_utils.write_config_file(root)
  out = os.path.join(root, "out", "eval.json")
  r = _eval(["--config", cfg, "--workdir", workdir, "--step", "2", "--split", "test[:16]",
             "--output", out])  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(out))
  assert set(FIELDS) <= set(res), sorted(res)
  assert res["step"] == 2 and res["split"] == "test[:16]" and res["num_examples"] == 16
  assert 0 <= res["top1"] <= res["top5"] <= 1 and np.isfinite(res["loss"])
  assert res["energy_mj_per_image"] > 0 and res["images_per_s"] > 0
  assert set(res["firing_rates_per_stage"]) == {"stem", "stage0", "stage1", "stage2", "stage3"}
  for site, rates in res["firing_rates"].items():
    k, t = np.shape(rates["per_branch_per_t"])
    assert (k, t) == (1, 1), site  # SL: one branch; T = 1
    assert len(rates["per_branch"]) == k and len(rates["per_t"]) == t
    assert 0 <= rates["mean"] <= 1
  beside = os.path.join(workdir, "eval_test_16_2.json")
  assert json.load(open(beside)) == res
  assert "top-1" in r.stdout and "firing rate per stage" in r.stdout


def test_eval_latest_matches_the_final_training_eval(run):
  root, workdir = run
  cfg = train_utils.write_config_file(root)
  r = _eval(["--config", cfg, "--workdir", workdir])
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(os.path.join(workdir, "eval_test_4.json")))
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert res["step"] == 4 and res["top1"] == final["eval"]["top1"]
  np.testing.assert_allclose(res["loss"], final["eval"]["loss"], rtol=1e-5)


def test_eval_errors(run):
  root, workdir = run
  other = train_utils.write_config_file(root, "other.py", **{"model.timesteps": 2})
  r = _eval(["--config", other, "--workdir", workdir])
  assert r.returncode == 1 and "model.timesteps: checkpoint 1 != config 2" in r.stderr
  cfg = train_utils.write_config_file(root)
  r = _eval(["--config", cfg, "--workdir", workdir, "--step", "3"])
  assert r.returncode == 1 and "no checkpoint for step 3" in r.stderr


@pytest.mark.parametrize("rate, shown", [(0.0, "0.0000"), (0.0123, "0.0123"), (None, "n/a")])
def test_table_shows_a_silent_network_as_zero_and_a_spike_free_one_as_na(rate, shown):
  res = {
    "model": "spikeatconv/nano",
    "step": 2,
    "split": "test",
    "num_examples": 8,
    "num_devices": 1,
    "top1": 0.5,
    "top5": 1.0,
    "loss": 1.0,
    "firing_rate": rate,
    "energy_mj_per_image": None,
    "images_per_s": 10.0,
    "num_params": 100,
    "firing_rates_per_stage": {},
    "firing_rates": {},
  }
  line = next(ln for ln in evaluate.table(res).splitlines() if "mean firing rate" in ln)
  assert line.split()[-1] == shown
