"""The hook table and the platform switch (`layers.ops`, `models.build(platform=)`).

A CPU host asked for the portable table traces and compiles no XLA:CPU custom call; the XLA:CPU
table does use them; "auto" follows the target platform; the parameter tree is the same
whatever the table (checkpoints move between backends).
"""

import re

import hlo_utils
import jax
import jax.numpy as jnp
import pytest

from configs.common import model_config
from spikeatconv_jax import models
from spikeatconv_jax.layers import common, ops
from spikeatconv_jax.xla_cpu import native

WING_TARGET = re.compile(r'custom_call_target="(spikeatconv_[a-z_]+)"')


def _nano(kernels="auto", spk="mbpl", attention="sisa"):
  cfg = model_config(variant="nano", spk=spk, attention=attention, num_classes=10)
  cfg.attention.partition = 4
  cfg.kernels = kernels
  return cfg


def _train_step(cfg, platform=None):
  """The lowered train-mode forward+backward (loss and all gradients) on this host."""
  loss, v = hlo_utils.train_mode_loss(models.build(cfg, platform=platform))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(v["params"], v["batch_stats"])


def test_portable_table_compiles_no_cpu_custom_call_on_a_cpu_host():
  assert WING_TARGET.findall(_train_step(_nano("xla")).compile().as_text()) == []
  # "auto" for a GPU mesh traces the same portable program (lowered only: compiling it on a CPU
  # host is the check above).
  lowered = _train_step(_nano(), platform="gpu").as_text()
  assert "custom_call" not in lowered and "stablehlo.convolution" in lowered


@pytest.mark.parametrize("timesteps, kernel", [(1, "lif_merge_norm"), (2, "spike_merge")])
def test_tpu_table_traces_the_pallas_merge(timesteps, kernel):
  # Traced only: a CPU host cannot lower Mosaic calls (tests/test_compile_tpu.py compiles them
  # for a TPU slice). At T=1 the LIF, the merge, its LayerNorm and the count are one pair of
  # kernels; at T>1 the merge kernels take spikes.
  cfg = _nano()
  cfg.timesteps = timesteps
  loss, v = hlo_utils.train_mode_loss(models.build(cfg, platform="tpu"))
  jaxpr = str(
    jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(v["params"], v["batch_stats"])
  )
  assert f"{kernel}_fwd" in jaxpr and f"{kernel}_bwd" in jaxpr
  others = {"lif_merge_norm", "lif_merge", "spike_merge"} - {kernel}
  assert not [k for k in others if f"{k}_fwd" in jaxpr]


def test_cpu_table_uses_the_native_kernels_and_barriers():
  if not native.available():
    pytest.skip(f"native CPU library unavailable: {native.unavailable_reason()}")
  compiled = _train_step(_nano(), platform="cpu").compile().as_text()
  targets = set(WING_TARGET.findall(compiled))
  assert {"spikeatconv_dwconv_barrier", "spikeatconv_dwconv_fwd"} <= targets, targets
  assert {"spikeatconv_dwconv_bwd_input", "spikeatconv_dwconv_bwd_kernel"} <= targets, targets


@pytest.mark.parametrize(
  "kernels,platform,want",
  [
    ("auto", "tpu", "pallas_tpu"),
    ("auto", "gpu", "xla"),
    ("auto", "cpu", "xla_cpu"),
    ("xla", "cpu", "xla"),  # a CPU host may run the portable forms
    ("xla", "tpu", "xla"),  # an explicit choice is honoured
  ],
)
def test_build_resolves_kernels_from_the_platform(kernels, platform, want):
  m = models.build(_nano(kernels), platform=platform)
  assert m.cfg.kernels == want
  r = models.build(
    model_config(name="resnet18_cifar", num_classes=10, kernels=kernels), platform=platform
  )
  assert r.cfg.kernels == want


@pytest.mark.parametrize("kernels,platform", [("xla_cpu", "tpu"), ("pallas_tpu", "gpu")])
def test_a_table_for_another_platform_is_a_one_line_error(kernels, platform):
  with pytest.raises(ValueError, match=rf"^model.kernels='{kernels}' runs on \w+, not {platform}$"):
    models.build(_nano(kernels), platform=platform)


def test_auto_without_a_platform_follows_the_default_devices():
  want = "xla_cpu" if jax.devices()[0].platform == "cpu" else "xla"
  assert models.build(_nano()).cfg.kernels == want
  assert models.build(model_config(variant="nano", num_classes=10)).cfg.kernels == want


def test_unknown_kernels_is_a_one_line_error():
  with pytest.raises(
    ValueError, match=r"unknown model.kernels 'cuda'; known: auto, xla, xla_cpu, pallas_tpu$"
  ):
    models.build(_nano("cuda"))
  with pytest.raises(ValueError, match="unknown model.kernels 'native_cpu'"):
    ops.resolve("native_cpu", "cpu")


@pytest.mark.parametrize("name", ["spikeatconv", "resnet18_cifar"])
def test_same_parameter_tree_for_every_table(name):
  def tree(kernels):
    if name == "resnet18_cifar":
      cfg = model_config(name=name, spk="mbpl", num_classes=10, kernels=kernels)
    else:
      cfg = _nano(kernels)
    m = models.build(cfg)
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    return jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), v)

  assert tree("xla") == tree("xla_cpu")


def test_use_activates_a_table_while_tracing_and_restores_the_previous():
  assert ops.current().name == "xla"  # outside any block: portable
  with ops.use("xla_cpu") as table:
    assert ops.current() is table and table.name == "xla_cpu"
    with ops.use("xla"):
      assert ops.current().name == "xla"
    assert ops.current().name == "xla_cpu"
  assert ops.current().name == "xla"
  with pytest.raises(ValueError, match="unknown model.kernels"):
    with ops.use("gpu"):
      pass


def test_a_hook_keeps_its_tables_backward_outside_the_block():
  # The backward is fixed when the forward is traced: a gradient taken after the `use` block
  # (as jax.grad's transpose runs) still uses the table that traced the forward.
  if not native.available():
    pytest.skip(f"native CPU library unavailable: {native.unavailable_reason()}")
  x = jnp.ones((2, 3))

  def f(x):
    with ops.use("xla_cpu"):
      y = common.materialize_cotangent(x)
    return jnp.sum(jnp.sin(y))

  hlo = jax.jit(jax.grad(f)).lower(x).as_text()
  assert "spikeatconv_dwconv_barrier" in hlo
  assert (
    "spikeatconv_dwconv_barrier"
    not in jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(x)))).lower(x).as_text()
  )
