"""scripts/export.py and export.load_file: one file, the same logits, read without Orbax."""

import json
import os
import subprocess
import sys

import flax
import inference_utils
import jax
import numpy as np
import pytest
import train_utils

import spikeatconv_jax
from spikeatconv_jax import export, inference
from spikeatconv_jax.data.builders import fashion_mnist


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return inference_utils.trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("export") / "model.msgpack")
  r = subprocess.run(
    [sys.executable, "scripts/export.py", "--workdir", workdir, "--step", "20", "--out", path],
    cwd=train_utils.REPO,
    env=train_utils.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"wrote {path}: step 20" in r.stdout
  return path


def test_round_trip_gives_the_same_logits(workdir, exported):
  original = inference.load(workdir, step=20)
  model, variables, config, step = export.load_file(exported)
  assert step == 20
  got = config.to_dict()
  assert got["dataset"].pop("class_names") == fashion_mnist._LABEL_NAMES
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.loads(json.dumps(got)) == json.load(f)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables),
               jax.device_get(original.variables))  # fmt: skip
  images, _ = inference_utils.test_images(config, 8)
  x = images.astype(np.float32) / 64.0 - 1.0  # any input: both models see the same
  a = jax.jit(lambda v, x: original.model.apply(v, x, train=False))(original.variables, x)
  b = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.ptp(np.asarray(a)) > 0
  # spikeatconv_jax.load takes the file in place of a workdir.
  again = spikeatconv_jax.load(exported)
  assert again.step == 20 and inference.class_names(again.config) == fashion_mnist._LABEL_NAMES


def test_loading_needs_neither_orbax_nor_tensorflow(exported):
  code = (
    "import sys\n"
    "from spikeatconv_jax import export\n"
    f"m = export.load_file({exported!r})\n"
    "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'orbax', 'tensorflow'})\n"
    "print('step', m.step, 'heavy', heavy)\n"
  )
  r = subprocess.run(
    [sys.executable, "-c", code],
    cwd=train_utils.REPO,
    env=train_utils.subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == "step 20 heavy []"


def test_bad_files(exported, tmp_path):
  junk = tmp_path / "junk.msgpack"
  junk.write_bytes(b"\x00\x01 not msgpack")
  with pytest.raises(ValueError, match="not an exported model file"):
    export.load_file(junk)
  with pytest.raises(ValueError, match="holds step 20, not step 40"):
    export.load_file(exported, step=40)
  # Variables of another model: every differing array is named.
  payload = export.read(exported)
  payload["config"]["model"]["variant"] = "tiny"
  payload["config"] = json.dumps(payload["config"])
  other = tmp_path / "other.msgpack"
  other.write_bytes(flax.serialization.msgpack_serialize(payload))
  with pytest.raises(ValueError, match=r"the variables do not fit the model .* arrays differ"):
    export.load_file(other)
