"""Shared helpers of the tests that lower, trace or read compiled XLA programs."""

from __future__ import annotations

import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp

_COMPUTATION = re.compile(r"^%([\w.\-]+) ([^\n]*)\{\n(.*?)\n\}", re.M | re.S)


def computations(compiled) -> Iterator[tuple[str, str, str]]:
  """(name, signature, body) of every non-entry computation of a compiled executable: the
  signature is "(params) -> result " and the body its instruction lines."""
  for m in _COMPUTATION.finditer(compiled.as_text()):
    yield m.group(1), m.group(2), m.group(3)


def equations(jaxpr) -> Iterator:
  """Every equation of a jaxpr (or ClosedJaxpr), those of its nested jaxprs included (scan and
  cond bodies, custom-VJP functions, pjit calls)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, tuple | list) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from equations(inner)


def train_mode_loss(model, image_shape=(2, 32, 32, 3)):
  """(loss, abstract variables) of `model` in train mode on zeros: loss(params, batch_stats) is
  the sum of squared logits, for tests that lower or trace a forward+backward."""
  x = jnp.zeros(image_shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))

  def loss(params, stats):
    out, _ = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      train=True,
      rngs={"dropout": jax.random.PRNGKey(1)},
      mutable=["batch_stats", "spikes"],
    )
    return jnp.sum(out**2)

  return loss, variables
