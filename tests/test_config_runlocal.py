"""Every config file's runlocal preset trains and evaluates as given (train_and_evaluate).

The datasets are stand-ins: Fashion-MNIST from synthetic IDX files through the real local
builder, CIFAR-100 from tfds mock data. Nothing else is overridden. The ImageNet preset runs
through train.py and eval.py in tests/test_imagenet_presets.py.
"""

import json
import os

import pytest
import tensorflow_datasets as tfds
import train_utils

from configs import cifar100_resnet18, default, imagenet
from spikeatconv_jax.train import loop

train_utils.enable_compile_cache()


def _check(workdir, config):
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert final["step"] == config.total_steps
  assert final["energy_mj_per_image"] > 0 and final["eval"]["num_examples"] > 0
  return final


def test_default_runlocal(tmp_path):
  config = default.get_config("runlocal=1")
  config.dataset.source_dir = train_utils.make_idx_dir(str(tmp_path / "idx"), 256, 64)
  config.dataset.data_dir = str(tmp_path / "tfds")
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir)
  assert _check(workdir, config)["eval"]["num_examples"] == 64


def test_cifar100_runlocal(tmp_path):
  config = cifar100_resnet18.get_config("runlocal=1")
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=64):  # every split; mock data ignores slices
    loop.train_and_evaluate(config, workdir)
  assert _check(workdir, config)["eval"]["num_examples"] == 64


@pytest.mark.parametrize("module", [default, cifar100_resnet18, imagenet])
def test_runlocal_schedules_fit(module):
  """The learning-rate schedule of each runlocal preset accepts its step count."""
  from spikeatconv_jax import optim
  from spikeatconv_jax.train import checks

  c = module.get_config("runlocal=1")
  checks.check_config(c)
  n = int(c.dataset.train_split.split("[:")[1].rstrip("]"))
  steps_per_epoch, total = checks.schedule_lengths(c, n)
  assert 0 <= optim.warmup_steps(c, steps_per_epoch) < total
  optim.make_schedule(c, total_steps=total, steps_per_epoch=steps_per_epoch)
