"""Energy accounting (DESIGN.md §10): a hand count on nano at 8 px, the paper-scale GMACs."""

import numpy as np
import pytest

from configs.common import model_config
from spikeatconv_jax import energy

T = 2


def _nano8(spk="sl", **kw):
  cfg = model_config(variant="nano", spk=spk, num_classes=10, timesteps=T, **kw)
  cfg.attention.partition = 4
  return cfg


def _hand_count():
  """Dense MACs per step of nano at 8 px, written out from the architecture.

  Stem: 8 px -> conv1 3x3/2 3->16 on a 4x4 map -> conv2 3x3 16->32 on 4x4. Stage maps 2/1/1/1
  (stride-2 SAME on a 1x1 map stays 1x1), widths 32/64/128/256, one block each.
  Per block with n output positions, width C, partition P_s = min(4, map), N = P_s² tokens per
  group: dw n·C·49; conv fc1+fc2 2·n·C·4C; q,k,v,proj 4·n·C²; FFN 2·n·C·4C; attention
  (QKᵀ and A·V over n/N groups, C/32 heads of d=32) 2·n·N·C. Shortcut 1x1 C_in->C when widths
  differ; head 256->10.
  """
  stem_once = 4 * 4 * 16 * (9 * 3) + 4 * 4 * 32 * (9 * 16)
  ac, shortcut = 0, 0
  c_in = 32
  for c, m in [(32, 2), (64, 1), (128, 1), (256, 1)]:
    n, big_n = m * m, min(4, m) ** 2
    ac += n * c * 49 + 2 * n * c * 4 * c + 4 * n * c * c + 2 * n * c * 4 * c + 2 * n * big_n * c
    if c != c_in:
      shortcut += n * c_in * c
    c_in = c
  head = 256 * 10
  return stem_once, shortcut + head, ac


def _uniform_rates(rep_sites, per_step):
  return {s: np.asarray([per_step], np.float32) for s in rep_sites}


def _sites(cfg):
  tr = energy._trace(cfg, 8)
  return [p for p, s in tr["spks"].items() if s["kind"] != "none"]


def test_nano_hand_count_sl():
  cfg = _nano8("sl")
  once, mac_t, ac = _hand_count()
  rates = _uniform_rates(_sites(cfg), [0.1, 0.3])  # fr = 0.2, the mean over the 2 steps
  rep = energy.report(cfg, 8, rates)
  assert rep["dense_gmacs_per_step"] * 1e9 == pytest.approx(once + mac_t + ac)
  expected_pj = energy.E_MAC_PJ * once + energy.E_MAC_PJ * T * mac_t + energy.E_AC_PJ * T * 0.2 * ac
  assert rep["total_energy_mj"] == pytest.approx(expected_pj * 1e-9, rel=1e-6)
  rows = {r["name"]: r for r in rep["rows"]}
  assert rows["stem/conv1"]["counted_as"] == energy.MAC_ONCE
  assert rows["stem/conv2"]["counted_as"] == energy.MAC_ONCE  # GELU input, computed once
  assert rows["stage1/block0/conv/shortcut"]["counted_as"] == energy.MAC_T
  assert rows["head"]["counted_as"] == energy.MAC_T
  assert rows["stage0/block0/grid_attn/core"]["counted_as"] == energy.AC_T
  assert rep["rates_measured"] and "measured" in " ".join(rep["notes"])
  assert f"T={T}" in rep["notes"][0]


def test_layers_take_the_rate_of_the_site_that_feeds_them():
  cfg = _nano8("sl")
  sites = _sites(cfg)
  rates = {s: np.full((1, T), 0.01 * (i + 1), np.float32) for i, s in enumerate(sites)}
  rep = energy.report(cfg, 8, rates)
  rows = {r["name"]: r for r in rep["rows"]}
  pre = "stage2/block0/"
  for layer, site in [
    ("conv/dw", "conv/spk_in"),
    ("conv/fc1", "conv/spk_dw"),
    ("conv/fc2", "conv/spk_fc1"),
    ("grid_attn/q", "grid_attn/spk_in"),
    ("grid_attn/proj", "grid_attn/spk_out"),
    ("grid_ffn/fc2", "grid_ffn/spk_hidden"),
  ]:
    assert rows[pre + layer]["rate"] == pytest.approx(float(rates[pre + site].mean()))
    assert rows[pre + layer]["input"] == pre + site
  core = rows[pre + "grid_attn/core"]
  fr_q, fr_v = (float(rates[pre + f"grid_attn/spk_{n}"].mean()) for n in "qv")
  # SISA: N²d·(fr_Q + fr_V) per head and step; at 1x1 maps N = 1, C = 128 -> 4 heads of 32.
  assert core["ops"] == pytest.approx(T * 4 * 32 * (fr_q + fr_v))


def test_mbpl_counting_rules():
  # `sum` merge: integer outputs, AC per bit-plane with Σ_k fr_k.
  cfg = _nano8("mbpl", attention="bdsa")
  cfg.spk.mbpl_merge = "sum"
  rates = {s: np.asarray([[0.3] * T, [0.1] * T, [0.05] * T, [0.0] * T]) for s in _sites(cfg)}
  rows = {r["name"]: r for r in energy.report(cfg, 8, rates)["rows"]}
  fc1 = rows["stage0/block0/conv/fc1"]
  assert fc1["counted_as"] == energy.AC_BITPLANE and fc1["rate"] == pytest.approx(0.45)
  assert fc1["energy_pj"] == pytest.approx(energy.E_AC_PJ * T * 0.45 * fc1["dense_macs"])
  core = rows["stage0/block0/grid_attn/core"]  # BDSA: 2N²d·fr_S
  assert core["ops"] == pytest.approx(T * 0.45 * core["dense_macs"])
  # `dwconv` merge (the spec default): real outputs -> MAC×T; the merge convs see spikes (AC).
  cfg = _nano8("mbpl")
  rows = {r["name"]: r for r in energy.report(cfg, 8)["rows"]}
  assert rows["stage0/block0/conv/fc1"]["counted_as"] == energy.MAC_T
  merge = rows["stage0/block0/conv/spk_dw/merge_dw"]
  assert merge["counted_as"] == energy.AC_T and merge["rate"] == energy.DEFAULT_RATE
  rates = {s: np.asarray([[0.4] * 2, [0.2] * 2, [0.1] * 2, [0.1] * 2]) for s in _sites(cfg)}
  merge = {r["name"]: r for r in energy.report(cfg, 8, rates)["rows"]}[merge["name"]]
  assert merge["rate"] == pytest.approx(0.2)  # mean over the four stacked branches
  assert merge["ops"] == pytest.approx(2 * 0.2 * merge["dense_macs"])


def test_default_rate_is_stated_and_missing_sites_fail():
  cfg = _nano8("sl")
  rep = energy.report(cfg, 8)
  assert not rep["rates_measured"]
  assert "DEFAULT_RATE=1.0" in " ".join(rep["notes"])
  assert "energy per image" in energy.format_report(rep)
  with pytest.raises(ValueError, match="no entry for SPK site"):
    energy.report(cfg, 8, {"stem/spk": np.zeros((1, T))})


def test_spike_free_is_all_mac():
  rep = energy.report(_nano8("none", attention="softmax"), 8)
  assert {r["counted_as"] for r in rep["rows"]} <= {energy.MAC_ONCE, energy.MAC_T}


def test_base_dense_gmacs_match_design():
  """The ImageNet preset (scanned blocks, bfloat16) counts all of Base's layers and sites."""
  from configs import imagenet

  cfg = imagenet.get_config("variant=base,spk=sl").model
  assert cfg.scan_blocks
  rep = energy.report(cfg, 224)
  assert abs(rep["dense_gmacs_per_step"] - 24.1) / 24.1 < 0.02
  assert len(energy._trace(cfg, 224)["spks"]) == 221


def test_resnet18_cifar_dense_macs():
  # CIFAR ResNet-18 (100 classes) is 0.557 GMACs per image (the widely quoted 0.56 G).
  rep = energy.report(model_config(name="resnet18_cifar", spk="sl", num_classes=100), 32)
  assert rep["dense_gmacs_per_step"] == pytest.approx(0.557, rel=0.01)
  rows = {r["name"]: r for r in rep["rows"]}
  assert rows["stage1/block0/conv1"]["input"] == "stage0/block1/spk2"
  assert rows["stage1/block0/shortcut_conv"]["input"] == "stage0/block1/spk2"
  assert rows["stem/conv"]["counted_as"] == energy.MAC_ONCE


def test_neuron_time_mode_counts_each_repeated_step_as_a_plane():
  """time_mode='neuron' (DESIGN.md §1): the net runs once (T factor 1); a layer fed by a site
  averaging n LIF steps costs n binary planes: E_AC · n · fr · FL."""
  cfg = _nano8("sl")
  cfg.time_mode = "neuron"
  once, mac_t, ac = _hand_count()
  rates = {s: np.asarray([[0.2]], np.float32) for s in _sites(cfg)}  # [K=1, T=1]
  rep = energy.report(cfg, 8, rates)
  assert rep["timesteps"] == 1
  expected_pj = energy.E_MAC_PJ * (once + mac_t) + energy.E_AC_PJ * T * 0.2 * ac
  assert rep["total_energy_mj"] == pytest.approx(expected_pj * 1e-9, rel=1e-6)
  assert "time_mode='neuron'" in rep["notes"][-1]


def test_scanned_blocks_give_the_same_report():
  """The ImageNet presets scan each stage's repeated blocks (traced once under a stacked name,
  while the sown rates keep per-block names): the report is the one of the unrolled model.
  tests/test_imagenet_presets.py repeats this with rates measured by a scanned model."""
  cfg = model_config(variant="tiny", spk="mbpl", num_classes=10, timesteps=2)
  cfg.attention.partition = 4  # 32 px: stage maps 8/4/2/1
  sites = _sites(cfg)
  assert "stage2/block5/conv/spk_in" in sites
  rng = np.random.default_rng(0)
  rates = {s: rng.uniform(0.0, 0.3, (4, 2)) for s in sites}
  cfg.scan_blocks = True
  assert _sites(cfg) == sites
  for given in (None, rates):
    cfg.scan_blocks = False
    unrolled = energy.report(cfg, 32, given)
    cfg.scan_blocks = True
    scanned = energy.report(cfg, 32, given)
    assert scanned["rows"] == unrolled["rows"]
    for key in ("total_energy_mj", "dense_gmacs_per_step", "ac_energy_mj", "mac_energy_mj"):
      assert scanned[key] == unrolled[key], key
  assert scanned["rates_measured"] and any(
    r["name"] == "stage2/block5/conv/fc1" for r in scanned["rows"]
  )
