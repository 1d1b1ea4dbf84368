"""model.remat_policy: what a rematerialised block keeps ("full": its inputs; "save_spikes":
also every SPK output). Same values and gradients; the saved residuals and compiled temporaries
change in the expected order (portable "xla" table, nano MBPL at 32 px)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from spikeatconv_jax import models

B, SIZE, CLASSES = 2, 32, 10
SETTINGS = {"none": (False, "full"), "full": (True, "full"), "save_spikes": (True, "save_spikes")}


def _cfg(remat, policy, variant="nano", scan=False):
  cfg = model_config(variant=variant, spk="mbpl", num_classes=CLASSES)
  cfg.attention.partition = 4  # stage maps 8/4/2/1 at 32 px
  cfg.kernels = "xla"
  cfg.remat, cfg.remat_policy, cfg.scan_blocks = remat, policy, scan
  cfg.spk.norm_init_scale = 3.0  # every SPK fires at init
  return cfg


@pytest.fixture(scope="module")
def runs():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, SIZE, SIZE, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (B, CLASSES))
  base = models.build(_cfg(False, "full"))
  variables = jax.jit(lambda x: base.init(jax.random.PRNGKey(1), x, train=False))(x)
  out = {}
  for name, (remat, policy) in SETTINGS.items():
    m = models.build(_cfg(remat, policy))

    def loss(params, m=m):
      y, _ = m.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        rngs={"dropout": jax.random.PRNGKey(3)},
        mutable=["batch_stats", "spikes"],
      )
      return jnp.sum(y * w)

    vjp_fn = jax.jit(lambda p, loss=loss: jax.vjp(loss, p)[1])(variables["params"])
    inputs = {id(leaf) for leaf in jax.tree_util.tree_leaves(variables)}
    saved = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_fn) if id(leaf) not in inputs)
    grad = jax.jit(jax.value_and_grad(loss))
    compiled = grad.lower(variables["params"]).compile()
    out[name] = dict(
      saved=saved,
      temp=compiled.memory_analysis().temp_size_in_bytes,
      value_grad=grad(variables["params"]),
    )
  return out


def test_same_values_and_gradients(runs):
  ref = runs["none"]["value_grad"]
  # Gradients that are zero up to rounding (e.g. a bias right before a norm) are compared on
  # the scale of the largest gradient.
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree_util.tree_leaves(ref[1]))
  for name in ("full", "save_spikes"):
    got = runs[name]["value_grad"]
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got), strict=True):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * scale)


def test_policy_changes_the_saved_residuals(runs):
  saved = {k: v["saved"] for k, v in runs.items()}
  temp = {k: v["temp"] for k, v in runs.items()}
  # Full remat keeps the least, saving the spikes more, no remat the most.
  assert saved["full"] < saved["save_spikes"] < saved["none"], saved
  assert temp["full"] < temp["none"] and temp["save_spikes"] < temp["none"], temp


def test_policy_traces_with_scanned_blocks():
  # tiny scans blocks 1..depth-1 of its 3- and 6-block stages under nn.remat with the policy.
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  m = models.build(_cfg(True, "save_spikes", variant="tiny", scan=True))
  v = jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(1), x, train=False), x)

  def loss(p, stats, x):
    y, _ = m.apply(
      {"params": p, "batch_stats": stats},
      x,
      train=True,
      rngs={"dropout": jax.random.PRNGKey(3)},
      mutable=["batch_stats", "spikes"],
    )
    return jnp.sum(y)

  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(v["params"], v["batch_stats"], x))
  # The scanned blocks are checkpointed with the policy, and the SPK outputs carry its name.
  assert "scan[" in jaxpr and "remat2[" in jaxpr and "name=spikes" in jaxpr
  assert "SaveOnlyTheseNames(saveable_names=frozenset({'spikes'}))" in jaxpr


def test_unknown_policy_is_one_line_error():
  with pytest.raises(ValueError, match=r"unknown model.remat_policy 'some'; known: full, "):
    models.build(_cfg(True, "some"))
