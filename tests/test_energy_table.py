"""scripts/energy_table.py: measured rates carried over to a larger model by site role."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from configs import default
from spikeatconv_jax import energy

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "energy_table.py"
_spec = importlib.util.spec_from_file_location("energy_table", _PATH)
energy_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(energy_table)


def test_transfer_by_role_and_timesteps():
  measured = {
    "stage1/block0/conv/spk_fc1": np.array([[0.4], [0.2]]),
    "stage1/block1/conv/spk_fc1": np.array([[0.9], [0.9]]),  # not the first block: unused
    "stem/spk": np.array([[0.1, 0.3], [0.0, 0.2]]),
  }
  targets = {"stage1/block5/conv/spk_fc1": 2, "stem/spk": 2}
  out = energy_table.transfer(measured, targets, t=2)
  np.testing.assert_allclose(out["stage1/block5/conv/spk_fc1"], [[0.4, 0.4], [0.2, 0.2]])
  np.testing.assert_allclose(out["stem/spk"], measured["stem/spk"])  # same T: kept per step
  with pytest.raises(ValueError, match="no measured site"):
    energy_table.transfer(measured, {"stage2/block0/attn/spk_q": 2}, t=1)
  with pytest.raises(ValueError, match="K=4 branches"):
    energy_table.transfer(measured, {"stem/spk": 4}, t=1)


def test_script_on_the_default_model(tmp_path, capsys):
  cfg = default.get_config()
  sites = energy_table.target_sites(cfg.model, 28)
  assert len(sites) == 41 and set(sites.values()) == {4}
  rng = np.random.default_rng(0)
  rates = {s: rng.uniform(0, 0.5, (4, 1)) for s in sites}
  table = {s: {"per_branch_per_t": r.tolist()} for s, r in rates.items()}
  path = tmp_path / "final_metrics.json"
  path.write_text(json.dumps({"firing_rates": table}))
  argv = ["--rates", str(path), "--config", "configs/default.py", "--image-size", "28"]
  assert energy_table.main(argv + ["--set", "model.spk.mbpl_merge=dwconv"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  cfg.model.spk.mbpl_merge = "dwconv"
  want = energy.report(cfg.model, 28, firing_rates=rates)["total_energy_mj"]
  assert out["sites"] == 41 and out["total_energy_mj"] == pytest.approx(want)
  assert sum(out["per_module_mj"].values()) == pytest.approx(want)
