"""spikeatconv_jax.load: a workdir, a checkpoints directory or a step directory, onto one device;
clear errors; per-image rates that agree with the sown batch rates."""

import os

import inference_utils
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import spikeatconv_jax
from spikeatconv_jax import inference, metrics
from spikeatconv_jax.data.builders import fashion_mnist


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return inference_utils.trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(workdir):
  return spikeatconv_jax.load(workdir)


def _sown_batch_rates(model, variables, x):
  """Each site's batch firing rate from the model's sown "spikes" collection (not inference's)."""
  _, sown = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["spikes"]))(variables, x)
  return metrics.site_rates(sown["spikes"])


def test_load_restores_the_saved_variables_on_one_device(workdir, loaded):
  model, variables, config, step = loaded
  assert step == 40
  assert set(variables) == {"params", "batch_stats"}
  assert config.model.spk.kind == "mbpl" and config.dataset.pp_eval == inference_utils.PP_EVAL
  # Trained on the 8 test devices, loaded onto one.
  assert jax.device_count() == 8
  assert {d for x in jax.tree.leaves(variables) for d in x.devices()} == {jax.local_devices()[0]}
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "40", "state"))
  for name in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables[name]), saved[name])
  assert model.cfg.spk.kind == "mbpl"


def test_load_a_step_and_a_step_directory(workdir, loaded):
  by_flag = inference.load(workdir, step=20)
  by_dir = inference.load(os.path.join(workdir, "checkpoints", "20"))
  by_ckpt_dir = inference.load(os.path.join(workdir, "checkpoints"))
  assert by_flag.step == by_dir.step == 20 and by_ckpt_dir.step == 40
  jax.tree.map(np.testing.assert_array_equal, by_flag.variables, by_dir.variables)
  first = jax.tree.leaves(by_flag.variables["params"])[0]
  assert not np.array_equal(first, jax.tree.leaves(loaded.variables["params"])[0])


def test_load_errors(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*have \[20, 40\]"):
    inference.load(workdir, step=7)
  with pytest.raises(ValueError, match="is the checkpoint of step 20, not of step 40"):
    inference.load(os.path.join(workdir, "checkpoints", "20"), step=40)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.load(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    inference.load(tmp_path)
  other = inference.load(workdir).config
  other.model.spk.mbpl_merge = "dwconv"
  with pytest.raises(ValueError, match=r"spk.mbpl_merge: checkpoint 'sum' != config 'dwconv'"):
    inference.load(workdir, config=other)


def test_per_image_rates_average_to_the_sown_batch_rates(loaded, tmp_path):
  model, variables, config, _ = loaded
  images, _ = inference_utils.test_images(config, 6)
  files = [str(tmp_path / f"{i}.png") for i in range(len(images))]
  for path, image in zip(files, images):
    inference_utils.write_png(path, image)
  x = inference.preprocess(files, config.dataset)
  out = inference.predict(model, variables, x, batch_size=4)  # a padded last batch
  batch = {k: np.asarray(v) for k, v in _sown_batch_rates(model, variables, x).items()}
  assert set(out["site_rates"]) == set(batch) and len(batch) > 10
  for site, r in out["site_rates"].items():
    assert r.shape == (6, 4, 1), site  # [N, K, T]: MBPL's four branches, T = 1
    np.testing.assert_allclose(r.mean(axis=0), batch[site], rtol=1e-5, atol=1e-6, err_msg=site)
  assert np.all((out["firing_rate"] > 0) & (out["firing_rate"] < 1))
  np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
  assert len(set(np.round(out["firing_rate"], 6))) > 1  # the rates are per image


def test_spike_maps_first_site_per_stage_in_network_order(loaded):
  model, variables, config, _ = loaded
  x = np.zeros((28, 28, 1), np.float32) + np.linspace(-1, 2, 28)[:, None, None]
  maps = inference.spike_maps(model, variables, x)
  assert list(maps) == [
    "stem/spk", "stage0/block0/conv/spk_in", "stage1/block0/conv/spk_in",
    "stage2/block0/conv/spk_in", "stage3/block0/conv/spk_in",
  ]  # fmt: skip
  assert maps["stem/spk"].shape == (1, 14, 14, 32)  # [T, H, W, C]
  assert maps["stage3/block0/conv/spk_in"].shape == (1, 2, 2, 128)  # stage 2's output
  for site, m in maps.items():
    assert np.all(m == np.round(m)) and m.min() >= 0 and m.max() <= 4, site  # 0..K branches


def test_class_names_from_tfds_metadata(loaded):
  assert inference.class_names(loaded.config) == fashion_mnist._LABEL_NAMES


@pytest.mark.parametrize("kind,time_mode", [("mbpl", "neuron"), ("rl", "network")])
def test_per_image_rates_of_other_kinds_and_time_modes(kind, time_mode):
  from configs import default as default_config

  c = default_config.get_config(f"spk={kind}").model
  c.time_mode, c.timesteps = time_mode, 2
  model = inference.build_model(c)
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1)) * 2.0
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  out = inference.predict(model, variables, np.asarray(x), batch_size=3)
  batch = _sown_batch_rates(model, variables, x)
  assert set(out["site_rates"]) == set(batch)
  for site, r in out["site_rates"].items():
    np.testing.assert_allclose(r.mean(axis=0), batch[site], rtol=1e-5, atol=1e-6, err_msg=site)
  # An untrained net may leave an image silent; a rate is a mean of spikes, so it lies in [0, 1].
  assert out["firing_rate"].shape == (x.shape[0],)
  assert np.all((out["firing_rate"] >= 0) & (out["firing_rate"] <= 1))
