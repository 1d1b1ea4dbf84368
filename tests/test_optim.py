"""Optimizer: weight-decay mask, warmup-cosine schedule values, decoupled decay, clipping."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.default import get_config
from spikeatconv_jax import models, optim


def _config(**kw):
  c = get_config("runlocal=1")
  c.update(kw)
  return c


PARAMS = {
  "stem": {
    "conv1": {"kernel": jnp.ones((3, 3, 1, 4))},
    "bn1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
  },
  "stage0": {
    "block0": {
      "attn": {
        "qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.ones(12)},
        "relative_position_bias_table": jnp.ones((49, 2)),
        "rel_pos": {"table": jnp.ones((3, 3))},
      },
      "ls": {"gamma": jnp.ones(4)},
      "spk": {"merge_gamma": jnp.ones(4), "merge_bias": jnp.ones(4)},
      "ln": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
      "dw": {"kernel": jnp.ones((7, 7, 4, 1))},
    }
  },
  "head": {"kernel": jnp.ones((4, 10)), "bias": jnp.ones(10)},
}  # fmt: skip

DECAYED = {
  ("stem", "conv1", "kernel"),
  ("stage0", "block0", "attn", "qkv", "kernel"),
  ("stage0", "block0", "dw", "kernel"),
  ("head", "kernel"),
}


def test_mask_excludes_exactly_biases_norms_layer_scales_rel_pos():
  mask = flax.traverse_util.flatten_dict(optim.weight_decay_mask(PARAMS))
  assert {p for p, m in mask.items() if m} == DECAYED
  assert len(mask) == 15
  everything = flax.traverse_util.flatten_dict(optim.weight_decay_mask(PARAMS, exclude=False))
  assert all(everything.values()) and len(everything) == 15


def test_mask_on_the_nano_model():
  c = get_config("runlocal=1")
  c.model.attention.partition = 4  # stage maps 8/4/2/1 at 32 px
  c.model.spk.mbpl_merge = "dwconv"  # the spec's merge: a "merge_gamma" layer scale and bias
  model = models.build(c.model)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 1)), train=False)
  )["params"]
  mask = flax.traverse_util.flatten_dict(optim.weight_decay_mask(shapes))
  flat = flax.traverse_util.flatten_dict(shapes)
  for path, decay in mask.items():
    if path[-1] in ("bias", "scale", "gamma", "merge_gamma", "merge_bias") or "rel_pos" in path:
      assert not decay, path
    else:
      # Everything else is a weight matrix or conv kernel (at least 2-D).
      assert decay and flat[path].ndim >= 2, (path, flat[path].shape)
  assert any(mask.values()) and not all(mask.values())
  assert any(p[-1] == "merge_gamma" for p in mask) and any("rel_pos" in p for p in mask)


def test_schedule_values():
  c = _config(lr=2e-3, warmup_init_lr=1e-6, min_lr=1e-5, warmup_epochs=2.0)
  sched = optim.make_schedule(c, total_steps=100, steps_per_epoch=10)  # 20 warmup steps
  np.testing.assert_allclose(sched(0), 1e-6, rtol=1e-4)
  np.testing.assert_allclose(sched(10), (1e-6 + 2e-3) / 2, rtol=1e-4)  # linear
  np.testing.assert_allclose(sched(20), 2e-3, rtol=1e-6)  # warmup end = peak
  np.testing.assert_allclose(sched(60), 1e-5 + (2e-3 - 1e-5) / 2, rtol=1e-4)  # cosine midpoint
  np.testing.assert_allclose(sched(100), 1e-5, rtol=1e-4)  # end of the cosine
  assert float(sched(59)) > float(sched(61))


def test_schedule_rejects_warmup_longer_than_run():
  with pytest.raises(ValueError, match="warmup_epochs"):
    optim.make_schedule(_config(warmup_epochs=10.0), total_steps=50, steps_per_epoch=10)
  with pytest.raises(ValueError, match="grad_clip"):
    optim.make_optimizer(_config(grad_clip=0.0), total_steps=50, steps_per_epoch=10)


def test_decay_applies_only_to_masked_leaves():
  # With zero gradients the Adam direction is 0, so the step is exactly -lr * wd * p on the
  # decayed leaves and 0 elsewhere (AdamW's decoupled, lr-scaled decay).
  c = _config(weight_decay=0.5)
  tx, _ = optim.make_optimizer(c, total_steps=10, steps_per_epoch=1)
  params = jax.tree.map(lambda x: 2.0 * x, PARAMS)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optim.apply_lr(params, updates, 0.1)
  for path, p in flax.traverse_util.flatten_dict(new).items():
    expected = 2.0 - 0.1 * 0.5 * 2.0 if path in DECAYED else 2.0
    np.testing.assert_allclose(p, expected, rtol=1e-6, err_msg=str(path))


def test_equals_optax_adamw():
  # tx + apply_lr(lr=schedule(step)) is optax.adamw(schedule) with the same mask, step by step.
  c = _config(weight_decay=0.05, lr=1e-2, warmup_init_lr=1e-3, warmup_epochs=1.0)
  tx, sched = optim.make_optimizer(c, total_steps=6, steps_per_epoch=2)
  ref = optax.adamw(sched, b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps, weight_decay=0.05,
                    mask=optim.weight_decay_mask)  # fmt: skip
  lrs = optim.schedule_table(sched, 6)
  p1 = p2 = PARAMS
  s1, s2 = tx.init(p1), ref.init(p2)
  for step in range(4):
    g = jax.tree.map(
      lambda x, k=step: jnp.sin(x * (k + 1) + jnp.arange(x.size).reshape(x.shape)), PARAMS
    )
    u1, s1 = tx.update(g, s1, p1)
    p1 = optim.apply_lr(p1, u1, lrs[step])
    u2, s2 = ref.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_grad_clip_bounds_the_first_adam_moment():
  # The first moment after one step is (1 - b1) * g; with clipping g has global norm <= clip.
  c = _config(grad_clip=0.1, weight_decay=0.0)
  tx, _ = optim.make_optimizer(c, total_steps=10, steps_per_epoch=1)
  grads = jax.tree.map(lambda x: 100.0 * x, PARAMS)
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
  mu_norm = float(optax.global_norm(adam[0].mu))
  np.testing.assert_allclose(mu_norm, (1 - c.adam_b1) * 0.1, rtol=1e-5)


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("grad_clip", [0.1, None])
@pytest.mark.parametrize("below", [40, None])
def test_grouped_update_equals_the_plain_one(exclude, grad_clip, below, monkeypatch):
  """optim.update (small leaves updated as concatenated vectors) gives the parameters and
  state of tx.update + apply_lr on the plain trees, for three steps, with and without the
  decay exclusions and the clip, with some leaves kept (below=40) and all grouped (the
  default); the norms are the plain trees' global norms."""
  if below is not None:
    monkeypatch.setattr(optim, "GROUP_BELOW", below)
  c = _config(grad_clip=grad_clip, weight_decay=0.05, weight_decay_exclude=exclude)
  tx, _ = optim.make_optimizer(c, total_steps=10, steps_per_epoch=1)
  params = _random_like(PARAMS, 0)
  plain = grouped = (params, tx.init(params))
  grouped_update = jax.jit(lambda g, s, p: optim.update(tx, g, s, p, 0.01, exclude=exclude))
  for step in range(3):
    grads = jax.tree.map(lambda x: 30.0 * x, _random_like(PARAMS, step + 1))
    updates, state = tx.update(grads, plain[1], plain[0])
    plain = (optim.apply_lr(plain[0], updates, 0.01), state)
    p, s, grad_norm, param_norm = grouped_update(grads, grouped[1], grouped[0])
    grouped = (p, s)
    np.testing.assert_allclose(grad_norm, optax.global_norm(grads), rtol=1e-6)
    np.testing.assert_allclose(param_norm, optax.global_norm(p), rtol=1e-6)
  assert jax.tree.structure(grouped) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(plain)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_leaf_groups_split_by_size_and_decay_class():
  groups = optim.LeafGroups(PARAMS, exclude=True, below=40)
  grouped = groups.group(PARAMS)
  flat = flax.traverse_util.flatten_dict(grouped)
  # Leaves of 40 elements or more stay where they are.
  assert {k for k in flat if k[0] != optim.GROUPED} == {
    ("stage0", "block0", "attn", "qkv", "kernel"),
    ("stage0", "block0", "attn", "relative_position_bias_table"),
    ("stage0", "block0", "dw", "kernel"),
    ("head", "kernel"),
  }
  # The rest by decay class: the stem kernel (36) decays; norms, biases, scales, γs and the
  # rel-pos table (4+4, 12, 9, 4, 4+4, 4+4, 10) do not.
  assert flat[(optim.GROUPED, "float32", "decay")].shape == (36,)
  assert flat[(optim.GROUPED, "float32", "no_decay")].shape == (59,)
  mask = flax.traverse_util.flatten_dict(optim.weight_decay_mask(grouped))
  assert mask[(optim.GROUPED, "float32", "decay")] is True
  assert mask[(optim.GROUPED, "float32", "no_decay")] is False
  assert mask[("head", "kernel")] is True
  back = groups.ungroup(jax.tree.map(lambda x: x + 1, grouped))
  assert jax.tree.structure(back) == jax.tree.structure(PARAMS)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(a, b + 1)
  # Without the exclusions every small leaf is in the one decayed vector.
  flat = flax.traverse_util.flatten_dict(
    optim.LeafGroups(PARAMS, exclude=False, below=40).group(PARAMS)
  )
  assert flat[(optim.GROUPED, "float32", "decay")].shape == (95,)
  assert (optim.GROUPED, "float32", "no_decay") not in flat
