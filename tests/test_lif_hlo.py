"""The LIF adds no layout copies around its scan inside model branches (issue 7).

The spiking ConvNeXt branch followed by an FFN (every SPK kind's sites on the [T, B, H, W, C]
map layout) is compiled twice for a train-mode forward+backward: once as built, once with every
LIF replaced by an elementwise stand-in of the same shape and dtype (a Heaviside with a
straight-through gradient, no scan). Any transpose or copy that the multi-step LIF forces
around its scan (a [T, ...] <-> [..., T] layout change, a per-step slice copy) would show up as
extra `transpose`/`copy` instructions, fused or not, in the first optimized HLO.

Everything is traced with the XLA:CPU table (`ops.use("xla_cpu")`), whose layouts these tests
guard. Attention blocks are compared on transposes only. Their q/k/v and output SPKs meet the
grid or block partition's transposes; the table's `materialize` keeps every SPK value and
cotangent out of them, so the LIF and the stand-in leave the same transposes. Without the
cotangent held too, MBPL's LIF backward absorbed the un-partition transposes into its fusions
and read through them. Copies are not compared there: the LIF backward's [T, ...] concatenation
is a same-layout `copy` root that the stand-in does not need.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from configs.common import model_config
from spikeatconv_jax.layers import ops
from spikeatconv_jax.layers.attention import FFN, Attention
from spikeatconv_jax.layers.convnext import ConvBranch
from spikeatconv_jax.snn import spk as spk_module
from spikeatconv_jax.xla_cpu import dwconv as cpu_dwconv
from spikeatconv_jax.xla_cpu import native

LAYOUT_OPS = re.compile(r"=\s*\S+\s+(transpose|copy)\(")


def _elementwise_lif(x, *, v_threshold=1.0, **_):
  h = x.astype(jnp.float32) - v_threshold
  s = jnp.where(h >= 0, 1.0, 0.0)
  return (h + jax.lax.stop_gradient(s - h)).astype(x.dtype)


def _elementwise_lifs(x, *, v_thresholds, **_):
  return tuple(_elementwise_lif(x, v_threshold=th) for th in v_thresholds)


def _hlo(kind: str, t: int) -> str:
  cfg = model_config(variant="nano", spk=kind, num_classes=10, timesteps=t)
  cfg.attention.partition = 4
  conv, ffn = ConvBranch(32, 1, cfg.spk), FFN(cfg.spk)
  x = jax.random.normal(jax.random.PRNGKey(0), (t, 2, 8, 8, 32))
  variables = {
    "conv": conv.init(jax.random.PRNGKey(1), x, train=False),
    "ffn": ffn.init(jax.random.PRNGKey(2), x, train=False),
  }

  def loss(params, x):
    mut = ["batch_stats", "spikes"]
    y, _ = conv.apply({**variables["conv"], "params": params["conv"]}, x, train=True, mutable=mut)
    y, _ = ffn.apply({**variables["ffn"], "params": params["ffn"]}, y, train=True, mutable=mut)
    return jnp.sum(y**2)

  params = {k: v["params"] for k, v in variables.items()}

  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()


def _layout_ops(kind: str, t: int) -> tuple[int, int]:
  ops = LAYOUT_OPS.findall(_hlo(kind, t))
  return ops.count("transpose"), ops.count("copy")


@pytest.mark.parametrize("kind", ["sl", "rl", "mbpl"])
def test_lif_adds_no_transposes_or_copies(kind, monkeypatch):
  with ops.use("xla_cpu"), cpu_dwconv.using("lax"):  # lax's depthwise conv compiles fastest
    with_lif = _layout_ops(kind, 2)
    monkeypatch.setattr(spk_module, "lif_multithreshold", _elementwise_lifs)
    without = _layout_ops(kind, 2)
  assert with_lif == without, f"(transposes, copies) with LIF {with_lif}, stand-in {without}"


def _attention_transposes(kind: str, partition: str, t: int) -> int:
  cfg = model_config(variant="nano", spk=kind, num_classes=10, timesteps=t)
  att = Attention("sisa", partition, 4, head_dim=8, scale=0.125, spk=cfg.spk)
  x = jax.random.normal(jax.random.PRNGKey(0), (t, 2, 8, 8, 32))
  v = att.init(jax.random.PRNGKey(1), x, train=False)

  def loss(params, x):
    y, _ = att.apply({**v, "params": params}, x, train=True, mutable=["batch_stats", "spikes"])
    return jnp.sum(y**2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(v["params"], x).compile().as_text()
  return LAYOUT_OPS.findall(hlo).count("transpose")


@pytest.mark.parametrize("kind,partition", [("sl", "grid"), ("mbpl", "grid"), ("mbpl", "block")])
def test_lif_adds_no_transposes_in_attention(kind, partition, monkeypatch):
  if not native.available():
    pytest.skip(f"the barriers need the native CPU library: {native.unavailable_reason()}")
  with ops.use("xla_cpu"):
    with_lif = _attention_transposes(kind, partition, 2)
    monkeypatch.setattr(spk_module, "lif_multithreshold", _elementwise_lifs)
    assert with_lif == _attention_transposes(kind, partition, 2)
