"""The ImageNet preset end to end through train.py and eval.py on tfds mock data.

configs/imagenet.py:runlocal=1 as given (scanned blocks, bfloat16, AutoAugment + random
erasing, Mixup/CutMix, the recipe's optimizer) at variant=nano and 56 px, plus two-way gradient
accumulation, on 4 fake devices: training, the final eval, the energy with measured rates,
final_metrics.json, then eval.py's JSON. The energy report with the measured rates is the same
whether the blocks are scanned or not.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import train_utils

from configs import imagenet
from spikeatconv_jax import energy

# nano (one block a stage, still scanned): tiny's train step alone takes minutes to compile on
# XLA:CPU; tests/test_energy.py checks scanned stages of several blocks.
ARG = "variant=nano,image_size=56,runlocal=1"
MOCK_EXAMPLES = 16  # examples of every split (mock data ignores the splits' slices)


def _run(script, *args):
  env = train_utils.subprocess_env(num_devices=4)
  return subprocess.run(
    [sys.executable, os.path.join("tests", "mock_run.py"), str(MOCK_EXAMPLES), script, *args],
    cwd=train_utils.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("imagenet") / "run")
  r = _run(
    "train.py", f"--config=configs/imagenet.py:{ARG}", f"--workdir={workdir}",
    "--config.grad_accum_steps=2",
  )  # fmt: skip
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
  return workdir


def test_the_preset_is_the_recipe():
  c = imagenet.get_config(ARG)
  assert c.model.scan_blocks and c.model.dtype == "bfloat16"
  assert "autoaugment" in c.dataset.pp_train and "random_erase(0.25)" in c.dataset.pp_train
  assert c.mixup == 0.8 and c.cutmix == 1.0 and c.label_smoothing == 0.1
  assert c.dataset.pp_eval.startswith("decode|resize_small(59)|central_crop(56)")


def test_training_writes_its_results(run):
  final = json.load(open(os.path.join(run, "final_metrics.json")))
  assert final["step"] == 2 and final["eval"]["num_examples"] == MOCK_EXAMPLES
  assert final["energy_mj_per_image"] > 0
  assert any(k.startswith("stage2/block0/") for k in final["firing_rates"])  # a scanned block
  config = json.load(open(os.path.join(run, "config.json")))
  assert config["grad_accum_steps"] == 2 and config["model"]["scan_blocks"]
  rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]


def test_energy_with_measured_rates_is_the_same_scanned_or_not(run):
  final = json.load(open(os.path.join(run, "final_metrics.json")))
  rates = {k: np.asarray(v["per_branch_per_t"]) for k, v in final["firing_rates"].items()}
  cfg = imagenet.get_config(ARG).model
  scanned = energy.report(cfg, 56, rates)
  assert scanned["total_energy_mj"] == pytest.approx(final["energy_mj_per_image"], rel=1e-12)
  cfg.scan_blocks = False
  unrolled = energy.report(cfg, 56, rates)
  assert scanned["rows"] == unrolled["rows"]
  assert scanned["total_energy_mj"] == unrolled["total_energy_mj"]
  assert scanned["rates_measured"] and any(r["counted_as"] == energy.AC_T for r in scanned["rows"])


def test_eval_writes_its_json(run):
  out = os.path.join(os.path.dirname(run), "eval.json")
  r = _run("eval.py", f"--config=configs/imagenet.py:{ARG}", f"--workdir={run}", f"--output={out}")
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
  res = json.load(open(out))
  assert res["step"] == 2 and res["split"] == "validation[:8]"
  assert res["num_examples"] == MOCK_EXAMPLES
  assert res["energy_mj_per_image"] > 0 and 0 <= res["top1"] <= res["top5"] <= 1
  final = json.load(open(os.path.join(run, "final_metrics.json")))
  assert res["top1"] == final["eval"]["top1"]
  assert json.load(open(os.path.join(run, "eval_validation_8_2.json"))) == res
