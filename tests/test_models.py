"""SpikeAtConv and ResNet-18: parameter counts, nano forward/backward, remat, T, dtype, validate.

Full-size models only go through `jax.eval_shape` (no compile). The compiled tests run nano at
32 px with a small batch, share one parameter init (SL, MBPL-`sum` and spike-free nets have the
same parameter tree), and use lax's depthwise conv: it compiles faster than the CPU shift-sum
one, and tests/test_dwconv.py checks that the two agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from spikeatconv_jax import models
from spikeatconv_jax.layers import dwconv
from spikeatconv_jax.snn.spk import SPK, collect_rates

B, SIZE, CLASSES = 4, 32, 10


@pytest.fixture(autouse=True)
def lax_dwconv(monkeypatch):
  monkeypatch.setattr(dwconv, "depthwise_conv2d", dwconv.depthwise_conv2d_lax)


def _n_params(cfg, size):
  m = models.build(cfg)
  v = jax.eval_shape(
    lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v["params"]))


# DESIGN.md §7 (SpikeAtConv, 1000 classes) and §8 (ResNet-18, 100 classes), in millions.
@pytest.mark.parametrize(
  "variant,spk,attention,expected",
  [
    ("tiny", "sl", "sisa", 15.1),
    ("tiny", "mbpl", "sisa", 23.0),
    ("tiny", "mbpl", "bdsa", 19.4),
    ("base", "sl", "sisa", 116.1),
    ("base", "mbpl", "sisa", 147.9),
    ("base", "mbpl", "bdsa", 124.9),
    ("large", "sl", "sisa", 213.8),
    ("large", "mbpl", "sisa", 261.8),
    ("large", "mbpl", "bdsa", 221.2),
  ],
)
def test_spikeatconv_param_counts(variant, spk, attention, expected):
  cfg = model_config(variant=variant, spk=spk, attention=attention, num_classes=1000)
  n = _n_params(cfg, 224)
  assert abs(n / 1e6 - expected) / expected < 0.01, n


def test_window_attention_param_count():
  cfg = model_config(variant="base", spk="sl", num_classes=1000)
  cfg.attention.block_attention = True
  assert abs(_n_params(cfg, 224) / 1e6 - 184.4) / 184.4 < 0.01


@pytest.mark.parametrize(
  "spk,expected", [("none", 11.22), ("sl", 11.22), ("mbpl", 12.00), ("dcl", 34.97)]
)
def test_resnet18_param_counts(spk, expected):
  cfg = model_config(name="resnet18_cifar", spk=spk, num_classes=100)
  n = _n_params(cfg, 32)
  assert abs(n / 1e6 - expected) / expected < 0.01, n


def _nano(**kw):
  spk = kw.pop("spk", "sl")
  cfg = model_config(variant="nano", spk=spk, num_classes=CLASSES, drop_path=0.1, **kw)
  cfg.attention.partition = 4  # stage maps 8/4/2/1 at 32 px
  # Pre-SPK norms at γ = 3 and θ = 0.3 so that every SPK fires at init and every weight sees
  # spikes: with the defaults (θ = 1, γ = 1) a unit-variance input fires ~2 % of the time at T=1,
  # and the 1×1 stage-3 attention output (no norm before it) never reaches its threshold.
  cfg.spk.norm_init_scale = 3.0
  if spk == "sl":
    cfg.spk.thresholds = (0.3,)
  return cfg


@pytest.fixture(scope="module")
def nano():
  """One init, one jitted train-mode forward+backward of nano SL at T=1."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(dwconv, "depthwise_conv2d", dwconv.depthwise_conv2d_lax)
    cfg = _nano()
    models.validate(cfg, SIZE)
    m = models.build(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, SIZE, SIZE, 3))
    variables = jax.jit(lambda x: m.init(jax.random.PRNGKey(1), x, train=False))(x)
    w = jax.random.normal(jax.random.PRNGKey(2), (B, CLASSES))
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def loss(params):
      out, mut = m.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        rngs=rngs,
        mutable=["batch_stats", "spikes", "intermediates"],
        capture_intermediates=lambda mdl, name: isinstance(mdl, SPK) and name == "__call__",
      )
      return jnp.sum(out * w), (out, mut)

    grads, (out, mut) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  return dict(cfg=cfg, x=x, variables=variables, rngs=rngs, grads=grads, out=out, mut=mut)


def _forward(cfg, nano):
  m = models.build(cfg)
  fn = jax.jit(
    lambda v, x: m.apply(v, x, train=True, rngs=nano["rngs"], mutable=["batch_stats", "spikes"])
  )
  v = nano["variables"]
  # Not the init's own sown "spikes": sow appends, so they would mix into this run's rates.
  return fn({"params": v["params"], "batch_stats": v["batch_stats"]}, nano["x"])


def test_nano_output_and_every_param_gets_gradient(nano):
  out = nano["out"]
  assert out.shape == (B, CLASSES) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  zero = [
    jax.tree_util.keystr(k)
    for k, g in jax.tree_util.tree_flatten_with_path(nano["grads"])[0]
    if not np.any(np.asarray(g) != 0)
  ]
  assert not zero, f"parameters without gradient: {zero}"
  rel = nano["grads"]["stage0"]["block0"]["grid_attn"]["rel_pos"]["table"]
  assert np.any(np.asarray(rel) != 0)


def test_nano_spikes_are_binary_and_sown_paths(nano):
  outs = jax.tree_util.tree_leaves(nano["mut"]["intermediates"])
  assert len(outs) == 41  # stem + 4 stages × (3 conv + 5 attention + 2 FFN) SPK sites
  for s in outs:
    assert set(np.unique(np.asarray(s)).tolist()) <= {0.0, 1.0}
  rates = collect_rates(nano["mut"]["spikes"])
  assert "stem/spk" in rates and "stage1/block0/conv/spk_dw" in rates
  assert "stage3/block0/grid_attn/spk_out" in rates
  assert all(r.shape == (1, 1) and 0.0 <= float(r[0, 0]) <= 1.0 for r in rates.values())
  assert any(float(r[0, 0]) > 0 for r in rates.values())


def test_nano_remat_same_params_and_output(nano):
  cfg = _nano(remat=True)
  m, m0 = models.build(cfg), models.build(nano["cfg"])
  x = nano["x"]
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(1), x, train=False))
  shapes0 = jax.eval_shape(lambda: m0.init(jax.random.PRNGKey(1), x, train=False))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(shapes0)
  out, _ = _forward(cfg, nano)
  np.testing.assert_allclose(out, nano["out"], rtol=1e-5, atol=1e-6)


def test_nano_two_timesteps_differ(nano):
  cfg = _nano(timesteps=2)
  out, mut = _forward(cfg, nano)
  assert out.shape == (B, CLASSES) and np.all(np.isfinite(out))
  assert not np.allclose(out, nano["out"])
  rates = collect_rates(mut["spikes"])
  assert rates["stem/spk"].shape == (1, 2)


def test_nano_bfloat16_close_to_float32(nano):
  out, _ = _forward(_nano(dtype="bfloat16"), nano)
  assert out.dtype == jnp.float32
  ref = np.asarray(nano["out"])
  # bf16 flips a few spikes near threshold, so compare at the scale of the logits.
  assert np.max(np.abs(np.asarray(out) - ref)) < 0.1 * np.max(np.abs(ref)) + 1e-3


def test_nano_spike_free_runs(nano):
  cfg = _nano(spk="none", attention="softmax")
  out, mut = _forward(cfg, nano)
  assert out.shape == (B, CLASSES) and np.all(np.isfinite(out))
  assert not collect_rates(mut.get("spikes", {}))  # no LIF anywhere
  assert not np.allclose(out, nano["out"])


def test_resnet18_runs_over_time():
  cfg = model_config(name="resnet18_cifar", spk="sl", num_classes=CLASSES, timesteps=2)
  cfg.spk.norm_init_scale = 3.0
  m = models.build(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  v = jax.jit(lambda x: m.init(jax.random.PRNGKey(1), x, train=False))(x)
  out, mut = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats", "spikes"]))(
    v, x
  )
  assert out.shape == (2, CLASSES) and out.dtype == jnp.float32
  rates = collect_rates(mut["spikes"])
  assert len(rates) == 17 and "stem/spk" in rates and "stage3/block1/spk2" in rates
  assert all(r.shape == (1, 2) for r in rates.values())


def test_validate_errors():
  cfg = model_config(variant="nano")
  models.validate(cfg, 28)  # stage maps 7/4/2/1 with P=7
  models.validate(cfg, 224)
  with pytest.raises(ValueError, match=r"image size 32.*work with P=7.*partition sizes that work"):
    models.validate(cfg, 32)
  with pytest.raises(ValueError, match="unknown model.variant"):
    models.validate(model_config(variant="huge"), 224)
  bad = model_config(variant="nano")
  bad.spk.kind = "xyz"
  with pytest.raises(ValueError, match="unknown model.spk.kind"):
    models.validate(bad, 28)
  with pytest.raises(ValueError, match="unknown model.attention.kind"):
    models.build(model_config(attention="linear"))
  with pytest.raises(ValueError, match="timesteps"):
    models.build(model_config(timesteps=0))
  with pytest.raises(ValueError, match="unknown model.name"):
    models.build(model_config(name="vit"))
  assert 224 in models.valid_image_sizes(7) and 32 not in models.valid_image_sizes(7)
  assert 32 in models.valid_image_sizes(4)


def _shapes(tree):
  return jax.tree_util.tree_map_with_path(lambda p, x: (jax.tree_util.keystr(p), x.shape), tree)


def test_time_mode_neuron_runs_the_network_at_t1():
  """time_mode='neuron' (DESIGN.md §1): same parameters as T=1; every SPK averages T steps."""
  cfg = _nano(timesteps=3)
  cfg.time_mode = "neuron"
  m = models.build(cfg)
  x = jnp.zeros((2, SIZE, SIZE, 3))
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, train=False))
  ref = models.build(_nano(timesteps=1))
  v1 = jax.eval_shape(lambda: ref.init(jax.random.PRNGKey(0), x, train=False))
  assert _shapes(v["params"]) == _shapes(v1["params"])
  assert models.network_timesteps(cfg) == 1
  assert m.cfg.spk.neuron_timesteps == 3 and m.cfg.timesteps == 1
  out, mut = jax.eval_shape(
    lambda v: m.apply(
      v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["batch_stats", "spikes"]
    ),
    v,
  )
  assert out.shape == (2, CLASSES)
  rates = jax.tree_util.tree_leaves(mut["spikes"])
  assert rates and all(r.shape[-1] == 1 for r in rates)  # [K, T=1] per site
  bad = _nano()
  bad.time_mode = "per_layer"
  with pytest.raises(ValueError, match="time_mode"):
    models.build(bad)


def test_spk_after_branch_out_spikes_the_ffn_output():
  """spk_after_branch_out: W2 (no bias) -> BN -> SPK in every FFN (the literal reading)."""
  cfg = _nano(timesteps=2)
  cfg.spk_after_branch_out = True
  m = models.build(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, train=False))
  ffn = v["params"]["stage1"]["block0"]["grid_ffn"]
  assert "bn_out" in ffn and "bias" not in ffn["fc2"], sorted(ffn)
  n_lit = sum(a.size for a in jax.tree_util.tree_leaves(v["params"]))
  n_ref = _n_params(_nano(timesteps=2), SIZE)
  dims = models.VARIANTS["nano"]["dims"]
  assert n_lit == n_ref + sum(c for c in dims), (n_lit, n_ref)  # +BN (2C) -fc2 bias (C)
  # Compiled on one FFN: the output SPK emits 0/1 spikes, which the layer scale multiplies.
  from spikeatconv_jax.layers.attention import FFN

  ffn_mod = FFN(_nano().spk, spk_out=True)
  h = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 4, 4, 32))
  fv = ffn_mod.init(jax.random.PRNGKey(2), h, train=False)
  _, inter = ffn_mod.apply(
    fv, h, train=True, capture_intermediates=True, mutable=["intermediates", "batch_stats"]
  )
  s = np.asarray(inter["intermediates"]["spk_out"]["__call__"][0])
  assert set(np.unique(s)) <= {0.0, 1.0} and s.max() == 1.0


@pytest.fixture
def deep_variant(monkeypatch):
  """A nano-width variant with a 3-block stage (nano has one block per stage: nothing to scan)."""
  from spikeatconv_jax.models import spikeatconv as sac

  variants = dict(sac.VARIANTS)
  variants["deep"] = dict(dims=(32, 32, 32, 32), depths=(1, 1, 3, 1), stem=(16, 32), drop_path=0)
  monkeypatch.setattr(sac, "VARIANTS", variants)
  monkeypatch.setattr(models, "VARIANTS", variants)


def test_scan_blocks_keeps_names_and_results(deep_variant):
  """model.scan_blocks: the same variable tree, and with the same variables the same logits,
  gradients, BatchNorm updates and sown rates as the unrolled stage (remat on under the scan)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))  # stage maps 4/2/1/1

  def build(scan):
    cfg = _nano(timesteps=2)
    cfg.variant, cfg.drop_path, cfg.scan_blocks, cfg.remat = "deep", 0.0, scan, scan
    return models.build(cfg)

  m0, m1 = build(False), build(True)
  v0 = m0.init(jax.random.PRNGKey(1), x, train=False)
  v1 = jax.eval_shape(lambda: m1.init(jax.random.PRNGKey(1), x, train=False))
  assert _shapes(v0) == _shapes(v1)
  assert "block2" in v0["params"]["stage2"] and "blocks" not in v0["params"]["stage2"]

  def run(m):
    def loss(p):
      out, mut = m.apply(
        {**v0, "params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(5)},
        mutable=["batch_stats", "spikes"],
      )  # fmt: skip
      return out.sum(), (out, mut)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(v0["params"])

  (_, (o0, mut0)), g0 = run(m0)
  (_, (o1, mut1)), g1 = run(m1)
  np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves((g0, mut0)), jax.tree_util.tree_leaves((g1, mut1))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  assert jax.tree_util.tree_structure(mut0) == jax.tree_util.tree_structure(mut1)
  g_bias = g1["stage2"]["block2"]["grid_attn"]["rel_pos"]
  assert float(jnp.abs(jax.tree_util.tree_leaves(g_bias)[0]).sum()) > 0


def test_drop_path_rate_can_be_traced():
  """DropPath with a call-time (traced) rate, as under nn.scan, equals the static rate."""
  from spikeatconv_jax.layers.common import DropPath

  x = jnp.ones((2, 16, 3, 3, 4))
  rngs = {"dropout": jax.random.PRNGKey(0)}
  ref = DropPath(0.5).apply({}, x, train=True, rngs=rngs)
  got = jax.jit(lambda r: DropPath().apply({}, x, train=True, rate=r, rngs=rngs))(0.5)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert 0 < float((ref[0, :, 0, 0, 0] == 0).mean()) < 1  # some samples dropped, not all
