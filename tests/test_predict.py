"""predict.py on test images written as PNG files: the eval step's top-1 labels, the table, the
JSON, the spike-map picture and one-line errors."""

import json
import os
import subprocess
import sys

import inference_utils
import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
import train_utils

from spikeatconv_jax import inference
from spikeatconv_jax import sharding as sharding_lib
from spikeatconv_jax.data import pipeline
from spikeatconv_jax.data.builders import fashion_mnist
from spikeatconv_jax.train import evaluate

N = 24  # the synthetic test split's size; real Fashion-MNIST has more


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return inference_utils.trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def pngs(workdir, tmp_path_factory):
  config = inference.load(workdir).config
  images, labels = inference_utils.test_images(config, N)
  directory = tmp_path_factory.mktemp("pngs")
  for i, image in enumerate(images):
    inference_utils.write_png(str(directory / f"{i:03d}.png"), image)
  return str(directory), labels


def _predict(*args):
  return subprocess.run(
    [sys.executable, "predict.py", *args],
    cwd=train_utils.REPO,
    env=train_utils.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.fixture(scope="module")
def predicted(workdir, pngs, tmp_path_factory):
  out = tmp_path_factory.mktemp("predict")
  r = _predict("--workdir", workdir, pngs[0], "--top", "3", "--output", str(out / "pred.json"),
               "--spike_maps", str(out / "spikes.png"), "--batch_size", "8")  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout, json.load(open(out / "pred.json")), str(out / "spikes.png")


def test_top1_equals_the_eval_step_on_the_same_images(workdir, pngs, predicted):
  _, res, _ = predicted
  labels = pngs[1]
  files = [p["file"] for p in res["predictions"]]
  assert [os.path.basename(f) for f in files] == [f"{i:03d}.png" for i in range(N)]
  top1 = np.array([p["top"][0]["class"] for p in res["predictions"]])
  top3 = np.array([[t["class"] for t in p["top"]] for p in res["predictions"]])
  probs3 = np.array([[t["prob"] for t in p["top"]] for p in res["predictions"]])
  assert np.ptp(probs3[:, 0]) > 1e-3, "every image gets the same output: nothing compared"

  # The eval pipeline's images of the same examples through the restored model.
  loaded = inference.load(workdir)
  config = loaded.config
  split = f"test[:{N}]"
  mesh = sharding_lib.make_mesh(config.mesh)
  eval_probs = []
  apply = jax.jit(lambda v, x: jax.nn.softmax(loaded.model.apply(v, x, train=False)))
  for batch in pipeline.eval_iterator(
    config.dataset, split=split, global_batch_size=8, sharding=sharding_lib.batch_sharding(mesh)
  ):
    images = np.asarray(jax.device_get(batch["image"]))
    mask = np.asarray(jax.device_get(batch["mask"])) > 0
    eval_probs.append(np.asarray(apply(loaded.variables, images))[mask])
  eval_probs = np.concatenate(eval_probs)
  np.testing.assert_array_equal(top1, np.argmax(eval_probs, -1))
  np.testing.assert_array_equal(top3, np.argsort(-eval_probs, -1)[:, :3])
  np.testing.assert_allclose(probs3, np.take_along_axis(eval_probs, top3, -1), rtol=1e-4)

  # And the eval step's accuracy (evaluate_checkpoint, as eval.py runs it) is theirs.
  res_eval = evaluate.evaluate_checkpoint(config, workdir, split=split)
  assert res_eval["num_examples"] == N
  assert res_eval["top1"] == pytest.approx(np.mean(top1 == labels), abs=1e-9)


def test_table_and_json(predicted):
  stdout, res, _ = predicted
  lines = stdout.splitlines()
  assert lines[0].split()[:5] == ["file", "top-1", "top-2", "top-3", "rate"]
  assert res["step"] == 40 and res["pp_eval"] == inference_utils.PP_EVAL
  for p in res["predictions"]:
    assert len(p["top"]) == 3
    probs = [t["prob"] for t in p["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert p["top"][0]["name"] == fashion_mnist._LABEL_NAMES[p["top"][0]["class"]]
    assert 0 < p["firing_rate"] < 1
    assert set(p["firing_rates_per_stage"]) == {"stem", "stage0", "stage1", "stage2", "stage3"}
    row = next(ln for ln in lines if os.path.basename(p["file"]) in ln)
    assert p["top"][0]["name"] in row and f"{p['firing_rate']:.4f}" in row


def test_spike_maps_png(predicted):
  _, _, path = predicted
  image = plt.imread(path)
  assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]  # one row: input + 5 sites


def test_one_line_errors(workdir, tmp_path):
  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  missing = _predict("--workdir", workdir, str(tmp_path / "nothing.png"))
  assert missing.returncode == 1 and "does not exist" in missing.stderr.strip().splitlines()[-1]
  config = inference.load(workdir).config
  with pytest.raises(ValueError, match="notes.png: cannot decode"):
    inference.preprocess([bad], config.dataset)
  big = tmp_path / "big.png"
  inference_utils.write_png(str(big), np.zeros((40, 40), np.uint8))
  with pytest.raises(ValueError, match="big.png is 40x40 after the eval preprocessing .* on 28x28"):
    inference.preprocess([big], config.dataset)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    inference.image_files([str(tmp_path / "empty")])
