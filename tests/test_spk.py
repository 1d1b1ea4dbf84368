"""Tests for the SPK blocks (DESIGN.md §3)."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import spk_config
from spikeatconv_jax.snn import SPK, SPK_KINDS, collect_rates, lif_multistep, make_spk

T, B, H, W, C = 2, 2, 6, 6, 8
SHAPE = (T, B, H, W, C)

# (kind, extra module attributes): every kind and option the spec names.
CONFIGS = {
  "sl": ("sl", {}),
  "rl": ("rl", {}),
  "rl_literal": ("rl", {"rl_mode": "literal"}),
  "mbpl_dwconv": ("mbpl", {}),
  "mbpl_sum": ("mbpl", {"mbpl_merge": "sum"}),
  "mbpl_convnext": ("mbpl", {"mbpl_merge": "convnext"}),
  "hsl": ("hsl", {}),
  "dcl": ("dcl", {}),
  "dcl_norm": ("dcl", {"dcl_norm": True}),
  "none": ("none", {}),
  "none_gelu": ("none", {"none_act": "gelu"}),
}

K = 4  # MBPL branches, thresholds (0.2, 1, 2, 4)
# Parameters per site, DESIGN.md §3.
PARAM_COUNTS = {
  "sl": 0,
  "rl": 0,
  "rl_literal": 0,
  "mbpl_dwconv": (49 * K + 4) * C,
  "mbpl_sum": 0,
  # K depthwise 7x7 + bias, LN, C->4C and 4C->C linears with biases, layer scale.
  "mbpl_convnext": 49 * K * C + C + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C) + C,
  "hsl": 0,
  "dcl": 9 * C * C // 2 + 25 * C * C // 2 + C,  # = 17 C^2 + C
  "dcl_norm": 9 * C * C // 2 + 25 * C * C // 2 + C + 2 * C,  # + BN scale and bias per half
  "none": 0,
  "none_gelu": 0,
}


def _x(seed=0, scale=4.0):
  # Mean 1, std 4: every branch up to θ=4 (input threshold τθ = 8 at t=1) fires somewhere.
  return 1.0 + scale * jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32)


def _module(name, **kw):
  kind, attrs = CONFIGS[name]
  return SPK(kind=kind, **{**attrs, **kw})


@functools.cache
def _result(name):
  """For CONFIGS[name] on _x(): one jitted init, then one jitted forward + backward in train
  mode with loss sum(w * y). Returns (y, variables, sown spikes, param grads, input grad).

  Shared by the tests below so each configuration compiles only twice.
  """
  x = _x()
  spk = _module(name)
  variables = jax.jit(functools.partial(spk.init, train=True))(jax.random.key(1), x)
  params = variables.get("params", {})
  # init sows too; drop it so the apply's "spikes" holds exactly one entry per site.
  rest = {k: v for k, v in variables.items() if k not in ("params", "spikes")}
  w = jax.random.normal(jax.random.key(2), SHAPE, jnp.float32)

  def loss(params, x):
    y, state = spk.apply(
      {"params": params, **rest}, x, train=True, mutable=["spikes", "batch_stats"]
    )
    return jnp.sum(w * y), (y, state.get("spikes", {}))

  (_, (y, sown)), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
    params, x
  )
  return y, variables, sown, gp, gx


def _n_params(variables):
  return sum(p.size for p in jax.tree_util.tree_leaves(variables.get("params", {})))


def _values(y):
  return set(np.unique(np.asarray(y, np.float32)).tolist())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_dtype_and_values(name):
  x = _x()
  y, _, _, _, _ = _result(name)
  assert y.shape == SHAPE and y.dtype == x.dtype
  vals = _values(y)
  if name in ("sl", "hsl", "dcl", "dcl_norm", "rl_literal"):
    assert vals == {0.0, 1.0}
  elif name == "rl":
    assert vals == {0.0, 1.0, 2.0}
  elif name == "mbpl_sum":
    assert vals <= {0.0, 1.0, 2.0, 3.0, 4.0} and {0.0, 4.0} <= vals
  elif name.startswith("mbpl"):
    # At init the output is the spike count plus a 1e-6 layer-scale term.
    count = jax.jit(_module("mbpl_sum").apply)({}, x)
    dev = np.abs(np.asarray(y - count))
    # LN output is at most sqrt(C) in size; + half a float32 ulp at a count of 4 for rounding.
    bound = 1e-6 * (math.sqrt(C) if name == "mbpl_dwconv" else 100.0) + 2.5e-7
    assert 0.0 < dev.max() <= bound, dev.max()
    np.testing.assert_array_equal(np.round(np.asarray(y)), np.asarray(count))
  elif name == "none":
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  elif name == "none_gelu":
    np.testing.assert_allclose(
      np.asarray(y), np.asarray(jax.nn.gelu(x, approximate=False)), rtol=2e-6, atol=2e-6
    )


def test_rl_literal_is_degenerate_and_cascade_is_not():
  # DESIGN.md §3: a θ=2, τ=2 LIF driven by binary input never fires, so literal RL equals SL.
  x = _x()
  sl = _module("sl").apply({}, x)
  np.testing.assert_array_equal(np.asarray(_module("rl_literal").apply({}, x)), np.asarray(sl))
  s1 = lif_multistep(x, v_threshold=1.0)
  s2 = lif_multistep(x + s1, v_threshold=2.0)
  np.testing.assert_array_equal(np.asarray(_module("rl").apply({}, x)), np.asarray(s1 + s2))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count(name):
  _, variables, _, _, _ = _result(name)
  assert _n_params(variables) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_reach_every_parameter_and_the_input(name):
  _, variables, _, gp, gx = _result(name)
  if CONFIGS[name][0] != "none":
    assert np.any(np.asarray(gx) != 0.0), "no surrogate gradient reaches the input"
  flat = {"/".join(k): v for k, v in _flatten(gp).items()}
  assert len(flat) == len(jax.tree_util.tree_leaves(variables.get("params", {})))
  for path, g in flat.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0.0), f"parameter {path} gets no gradient"


def _flatten(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _branches(name, x):
  """The spikes each LIF branch emits, computed directly with lif_multistep."""
  kind, attrs = CONFIGS[name]
  if kind == "sl":
    return [lif_multistep(x, v_threshold=1.0)]
  if kind == "rl":
    s1 = lif_multistep(x, v_threshold=1.0)
    return [s1, lif_multistep(x + s1 if not attrs else s1, v_threshold=2.0)]
  if kind == "mbpl":
    return [lif_multistep(x, v_threshold=th) for th in (0.2, 1.0, 2.0, 4.0)]
  if kind == "hsl":
    return [
      lif_multistep(x[..., : C // 2], v_threshold=1.0),
      lif_multistep(x[..., C // 2 :], v_threshold=2.0),
    ]
  raise AssertionError(name)


@pytest.mark.parametrize(
  "name", ["sl", "rl", "rl_literal", "mbpl_dwconv", "mbpl_sum", "mbpl_convnext", "hsl"]
)
def test_sown_rate_is_the_mean_spike_rate_per_branch_and_step(name):
  x = _x()
  _, _, sown, _, _ = _result(name)
  (rate,) = sown["rate"]
  expected = np.stack([np.asarray(s).mean(axis=(1, 2, 3, 4)) for s in _branches(name, x)])
  assert rate.shape == expected.shape == (len(expected), T) and rate.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(rate), expected, rtol=1e-6)
  # Every branch fires here, except literal RL's second one, which never can (see above).
  firing = expected[:1] if name == "rl_literal" else expected
  assert np.all(firing[:, 0] > 0)


@pytest.mark.parametrize("name", ["dcl", "dcl_norm"])
def test_sown_rate_of_dcl_matches_its_output_halves(name):
  y, _, sown, _, _ = _result(name)
  (rate,) = sown["rate"]
  expected = [
    np.asarray(y[..., : C // 2]).mean((1, 2, 3, 4)),
    np.asarray(y[..., C // 2 :]).mean((1, 2, 3, 4)),
  ]
  assert rate.shape == (2, T)
  np.testing.assert_allclose(np.asarray(rate), np.stack(expected), rtol=1e-6)


def test_none_sows_nothing_and_collect_rates_flattens_paths():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = SPK(kind="sl", name="a")(x)
      y = SPK(kind="none", name="n")(y)
      return SPK(kind="mbpl", mbpl_merge="sum", name="b")(y + x)

  x = _x()
  _, state = Two().apply({}, x, mutable=["spikes"])
  rates = collect_rates(state["spikes"])
  assert sorted(rates) == ["a", "b"]
  assert rates["a"].shape == (1, T) and rates["b"].shape == (K, T)


@pytest.mark.parametrize("kind", ["sl", "rl", "hsl"])
def test_effective_threshold_at_t1(kind):
  # decay_input=True at T=1: a θ=1, τ=2 neuron fires exactly when x >= 2. In RL the θ=2 branch
  # sees x + S1 <= 3.001 < 4 and in HSL the θ=2 half sees x < 4, so neither adds a spike.
  x = jnp.broadcast_to(jnp.array([1.999, 2.0, 2.001], jnp.float32)[:, None], (1, 1, 1, 3, 2))
  y = np.asarray(SPK(kind=kind).apply({}, x))[0, 0, 0]  # [3, 2]
  np.testing.assert_array_equal(y[:, 0], [0, 1, 1])
  np.testing.assert_array_equal(y[:, 1], [0, 0, 0] if kind == "hsl" else [0, 1, 1])


def test_effective_thresholds_of_mbpl_at_t1():
  # Branch k fires iff x >= τ θ_k = 0.4, 2, 4, 8.
  xs = [0.399, 0.4, 1.999, 2.0, 3.999, 4.0, 7.999, 8.0]
  x = jnp.array(xs, jnp.float32).reshape(1, 1, 1, 1, -1)
  y = SPK(kind="mbpl", mbpl_merge="sum").apply({}, x)
  np.testing.assert_array_equal(np.asarray(y).ravel(), [0, 1, 1, 2, 2, 3, 3, 4])


def test_threshold_scale_halves_thresholds():
  x = jnp.array([0.999, 1.0, 1.001], jnp.float32).reshape(1, 1, 1, 1, 3)
  np.testing.assert_array_equal(
    np.asarray(SPK(kind="sl", threshold_scale=0.5).apply({}, x)).ravel(), [0, 1, 1]
  )
  np.testing.assert_array_equal(np.asarray(SPK(kind="sl").apply({}, x)).ravel(), [0, 0, 0])
  xr = _x()
  half = SPK(kind="mbpl", mbpl_merge="sum", threshold_scale=0.5).apply({}, xr)
  explicit = SPK(kind="mbpl", mbpl_merge="sum", thresholds=(0.1, 0.5, 1.0, 2.0)).apply({}, xr)
  np.testing.assert_array_equal(np.asarray(half), np.asarray(explicit))
  assert np.any(np.asarray(half) != np.asarray(SPK(kind="mbpl", mbpl_merge="sum").apply({}, xr)))


@pytest.mark.parametrize("kind", ["sl", "rl", "hsl", "mbpl"])
def test_bfloat16_input(kind):
  x = _x()
  xb = x.astype(jnp.bfloat16)
  spk = SPK(kind=kind, mbpl_merge="sum")
  y = spk.apply({}, xb)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(y.astype(jnp.float32)), np.asarray(spk.apply({}, xb.astype(jnp.float32)))
  )


def test_bad_options_raise_clear_errors():
  x = _x()
  with pytest.raises(ValueError, match="unknown SPK kind 'ssl'.*sl, rl, mbpl"):
    jax.eval_shape(SPK(kind="ssl").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown rl_mode 'serial'.*cascade, literal"):
    jax.eval_shape(SPK(kind="rl", rl_mode="serial").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown mbpl_merge 'concat'.*dwconv, sum, convnext"):
    jax.eval_shape(SPK(kind="mbpl", mbpl_merge="concat").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown none_act 'relu'"):
    jax.eval_shape(SPK(kind="none", none_act="relu").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown SPK kind"):
    make_spk(spk_config("ssl")).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="odd channel count"):
    jax.eval_shape(SPK(kind="hsl").init, jax.random.key(0), x[..., :7])
  with pytest.raises(ValueError, match="odd channel count"):
    jax.eval_shape(SPK(kind="dcl").init, jax.random.key(0), x[..., :7])
  with pytest.raises(ValueError, match=r"\[T, B, H, W, C\]"):
    jax.eval_shape(SPK(kind="dcl").init, jax.random.key(0), x[:, :, 0])
  with pytest.raises(ValueError, match="needs"):
    jax.eval_shape(SPK(kind="mbpl").init, jax.random.key(0), x[:, :, 0])
  # A threshold tuple of the wrong length for the kind is an error, not silently truncated.
  with pytest.raises(ValueError, match="thresholds"):
    jax.eval_shape(SPK(kind="rl", thresholds=(1.0,)).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="thresholds"):
    jax.eval_shape(SPK(kind="sl", thresholds=(0.2, 1.0, 2.0, 4.0)).init, jax.random.key(0), x)


@pytest.mark.parametrize("kind", sorted(SPK_KINDS))
def test_make_spk_from_config_builds_the_same_module(kind):
  built = make_spk(spk_config(kind), name="spk")
  direct = SPK(kind=kind, name="spk")
  for f in dataclasses.fields(SPK):
    if f.name in ("parent", "name"):
      continue
    a, b = getattr(built, f.name), getattr(direct, f.name)
    if f.name == "thresholds":
      a, b = tuple(a) or None, tuple(b) or None
      b = b or a  # SPK's default () means the kind's default, which the config spells out
    assert a == b, (f.name, a, b)
  x = _x()
  init = lambda m: jax.eval_shape(m.init, jax.random.key(0), x)
  assert jax.tree_util.tree_structure(init(built)) == jax.tree_util.tree_structure(init(direct))
  if kind not in ("mbpl", "dcl"):  # parameter-free: cheap to run eagerly
    np.testing.assert_array_equal(np.asarray(built.apply({}, x)), np.asarray(direct.apply({}, x)))
  # The options travel: a soft-reset, literal-RL config changes the module accordingly.
  cfg = spk_config("rl", rl_mode="literal", tau=3.0, surrogate="sigmoid", detach_reset=False)
  cfg.v_reset = None
  m = make_spk(cfg, threshold_scale=0.5)
  assert (m.rl_mode, m.tau, m.surrogate, m.detach_reset, m.v_reset, m.threshold_scale) == (
    "literal",
    3.0,
    "sigmoid",
    False,
    None,
    0.5,
  )


def test_neuron_time_mode_outputs_the_mean_rate_of_repeated_steps():
  # DESIGN.md §1 time_mode='neuron': a T=1 input repeated n=3 times inside the LIF (τ=2, θ=1,
  # hard reset). x=1.2 charges 0.6, 0.9, 1.05 and fires once; x=2.0 fires every step;
  # x=0.5 tends to 0.5 and never fires; x=0.9 reaches 0.45, 0.675, 0.7875: never.
  x = jnp.array([0.5, 0.9, 1.2, 2.0, 4.5]).reshape(1, 1, 5)
  y = SPK(kind="sl", neuron_timesteps=3).apply({}, x)
  np.testing.assert_allclose(np.asarray(y)[0, 0], [0.0, 0.0, 1 / 3, 1.0, 1.0], rtol=1e-6)
  # The same as running the repeated input through the multi-step LIF and averaging it.
  ref = lif_multistep(jnp.broadcast_to(x, (3, 1, 5))).mean(axis=0, keepdims=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref))
  # MBPL with the sum merge: the spike counts of K branches, each averaged over n steps.
  y = SPK(kind="mbpl", mbpl_merge="sum", neuron_timesteps=2).apply({}, x)
  ref = sum(
    lif_multistep(jnp.broadcast_to(x, (2, 1, 5)), v_threshold=th).mean(axis=0, keepdims=True)
    for th in (0.2, 1.0, 2.0, 4.0)
  )
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6)
  with pytest.raises(ValueError, match="T=1"):
    SPK(kind="sl", neuron_timesteps=3).apply({}, jnp.ones((2, 1, 5)))


def test_neuron_time_mode_mbpl_merge_is_the_same_in_every_table():
  # The merge conv's inputs are integer-valued by contract (the XLA:CPU table reads them as
  # int8), so under neuron_timesteps n the merge convolves the spike counts and divides by n:
  # a rate of 1/2 reaches it whole instead of truncated to 0.
  from spikeatconv_jax.layers import ops
  from spikeatconv_jax.xla_cpu import native

  if not native.available():
    pytest.skip(f"native CPU library unavailable: {native.unavailable_reason()}")
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 6, 6, 8)) * 2
  m = SPK(kind="mbpl", neuron_timesteps=2)
  v = m.init(jax.random.PRNGKey(1), x)
  v = {"params": {**v["params"], "merge_gamma": jnp.ones((8,))}}  # the merge shows in the output
  outs = {}
  for table in ("xla", "xla_cpu"):
    with ops.use(table):
      outs[table], _ = m.apply(v, x, mutable=["spikes"])
  rates = SPK(kind="mbpl", mbpl_merge="sum", neuron_timesteps=2).apply({}, x)
  assert np.any(np.asarray(rates) % 1 == 0.5)  # half-integer rates reach the merge
  np.testing.assert_allclose(outs["xla_cpu"], outs["xla"], rtol=1e-5, atol=1e-5)
