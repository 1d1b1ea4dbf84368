"""scripts/plot_rates.py: the PNG from final_metrics.json and an eval JSON, network order of the
sites (checked against the order the forward pass calls them), clear errors."""

import json
import os
import sys

import inference_utils
import matplotlib.pyplot as plt
import pytest
import train_utils

sys.path.insert(0, os.path.join(train_utils.REPO, "scripts"))
import plot_rates  # noqa: E402

from configs import cifar100_resnet18  # noqa: E402
from configs import default as default_config  # noqa: E402
from spikeatconv_jax import inference  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return inference_utils.trained_workdir(tmp_path_factory)


def test_png_from_final_metrics(workdir, tmp_path):
  out = str(tmp_path / "rates.png")
  assert plot_rates.main([os.path.join(workdir, "final_metrics.json"), "--out", out]) == 0
  image = plt.imread(out)
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300
  rates, _ = plot_rates.read_rates(os.path.join(workdir, "final_metrics.json"))
  assert all(len(r) == 4 for r in rates.values())  # MBPL: four bars per site


def test_png_from_an_eval_json(tmp_path):
  res = {
    "step": 3,
    "split": "test",
    "top1": 0.5,
    "firing_rate": 0.2,
    "model": "spikeatconv/nano",
    "firing_rates": {
      s: {"per_branch": [0.1, 0.3]} for s in ("stage0/block0/conv/spk_in", "stem/spk")
    },
  }
  path = tmp_path / "eval.json"
  path.write_text(json.dumps(res))
  assert plot_rates.main([str(path), "--out", str(tmp_path / "e.png")]) == 0
  assert list(plot_rates.read_rates(str(path))[0]) == ["stem/spk", "stage0/block0/conv/spk_in"]


def test_errors(tmp_path, capsys):
  path = tmp_path / "other.json"
  path.write_text(json.dumps({"loss": 1.0}))
  assert plot_rates.main([str(path), "--out", str(tmp_path / "x.png")]) == 1
  assert "has no 'firing_rates'" in capsys.readouterr().err
  path.write_text(json.dumps({"firing_rates": {}}))
  assert plot_rates.main([str(path), "--out", str(tmp_path / "x.png")]) == 1
  assert "no SPK sites" in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()


def _model_config(kind: str):
  if kind == "resnet":
    c = cifar100_resnet18.get_config("runlocal=1")
  else:
    c = default_config.get_config("runlocal=1")
    if kind == "block_attention":
      c.model.attention.block_attention = True
      c.model.stem_act = "spk"
      c.model.spk.kind = "sl"
      c.model.spk.thresholds = (1.0,)
  return c


@pytest.mark.parametrize("kind", ["default", "block_attention", "resnet"])
def test_site_key_is_the_call_order(kind):
  c = _model_config(kind)
  model = inference.build_model(c.model)
  size = c.dataset.image_size
  variables = inference.init_shapes(model, size, 3)
  order = inference.site_order(model, variables, (size, size, 3))
  assert len(order) > 8
  assert sorted(order, key=plot_rates.site_key) == order
  assert sorted(reversed(order), key=plot_rates.site_key) == order
