"""A workdir that is a URL: training and evaluation write every file through the filesystem
layer (tf.io.gfile, as TensorBoard does; Orbax through etils.epath), never to a local path made
from the URL.

TensorFlow's in-memory filesystem (ram://) stands in for gs:// (no network here). Orbax writes
array data with TensorStore, which reaches only local paths and real object stores, so the
checkpoint manager alone is redirected to a local directory: the test checks that it is handed
the URL unchanged.
"""

import json
import os

import tensorflow as tf
import train_utils

from spikeatconv_jax import checkpoint as ckpt_lib
from spikeatconv_jax import files
from spikeatconv_jax.train import evaluate, loop

train_utils.enable_compile_cache()

URL = "ram://bucket/runs/tiny"


def _redirect_checkpoints(monkeypatch, local_root):
  """Checkpointer(URL/checkpoints) -> Checkpointer(local_root/checkpoints); records the URLs."""
  given = []
  real = ckpt_lib.Checkpointer

  def checkpointer(directory, **kwargs):
    given.append(str(directory))
    assert str(directory).startswith(URL + "/"), directory
    tf.io.gfile.makedirs(str(directory))  # what the manager does at its URL
    return real(os.path.join(local_root, str(directory)[len(URL) + 1 :]), **kwargs)

  monkeypatch.setattr(ckpt_lib, "Checkpointer", checkpointer)
  return given


def test_train_and_eval_write_to_a_url(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a URL mangled into a local path would land here
  root = str(tmp_path / "data")
  given = _redirect_checkpoints(monkeypatch, str(tmp_path / "local"))
  config = train_utils.tiny_config(root)
  final = loop.train_and_evaluate(config, URL)
  assert given == [URL + "/checkpoints"]
  assert final["workdir"] == URL and final["metrics_file"] == URL + "/metrics.jsonl"
  names = {n.rstrip("/") for n in tf.io.gfile.listdir(URL)}
  assert {"config.json", "metrics.jsonl", "final_metrics.json", "checkpoints"} <= names
  assert any(n.startswith("events.out.tfevents") for n in names)
  saved = json.loads(files.read_text(URL + "/final_metrics.json"))
  assert saved["step"] == 4 and saved["energy_mj_per_image"] > 0
  rows = [json.loads(r) for r in files.read_text(URL + "/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert json.loads(files.read_text(URL + "/config.json"))["total_steps"] == 4

  res = evaluate.evaluate_checkpoint(config, URL)
  path = evaluate.result_filename(URL, res["split"], res["step"])
  assert path == URL + "/eval_test_4.json"
  files.write_json(path, res)
  assert json.loads(files.read_text(path))["top1"] == saved["eval"]["top1"]
  assert given[-1] == URL + "/checkpoints" and res["checkpoint"] == URL + "/checkpoints/4"
  assert sorted(os.listdir(tmp_path)) == ["data", "local"]  # nothing written beside them
