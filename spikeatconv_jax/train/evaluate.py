"""Evaluate a saved checkpoint on a tfds split (the library side of eval.py).

The checkpoint is restored onto the mesh of the *current* devices, whatever mesh it was
trained on: the restore target is the abstract TrainState carrying the current shardings.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from spikeatconv_jax import checkpoint as ckpt_lib
from spikeatconv_jax import metrics as metrics_lib
from spikeatconv_jax import models, optim
from spikeatconv_jax import sharding as sharding_lib
from spikeatconv_jax.train import loop
from spikeatconv_jax.train import state as state_lib
from spikeatconv_jax.train import step as step_lib


def _optimizer_for_structure(config):
  # The optimizer state's structure (not its values) is part of the restore target; the
  # schedule's length does not change it, so any valid length will do.
  steps_per_epoch = 1
  total = optim.warmup_steps(config, steps_per_epoch) + 1
  return optim.make_optimizer(config, total_steps=total, steps_per_epoch=steps_per_epoch)[0]


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  step: int | None = None,
  split: str | None = None,
) -> dict[str, Any]:
  """Restores checkpoint `step` (the newest readable one when None) of `workdir` and evaluates
  `split`.

  Returns:
    A JSON-ready dict: step, split, num_examples, top1, top5, loss, firing_rate (mean),
    firing_rates (per site: per branch and time step), firing_rates_per_stage,
    firing_rates_note, energy_mj_per_image, images_per_s, num_params, checkpoint.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in the workdir.
    ValueError: the checkpoint was made with another model config or other shapes, or it
      cannot be read (`checkpoint.CheckpointUnreadableError`, a one-line message).
  """
  workdir = os.path.abspath(workdir)
  split = split or config.dataset.eval_split
  models.validate(config.model, config.dataset.image_size)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory in {workdir}")
  ckpt = ckpt_lib.Checkpointer(directory, read_only=True, asynchronous=False)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  latest = step is None
  if latest:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
  ckpt.check_model_config(step, config.model)

  mesh = sharding_lib.make_mesh(config.mesh)
  model = models.build(config.model)
  tx = _optimizer_for_structure(config)
  batches = loop.eval_batches(config, mesh, split)
  first = next(batches)
  image_shape = tuple(first["image"].shape[1:])  # [H, W, C]
  shapes = state_lib.abstract_state(model, tx, image_shape, config.seed)
  shardings = sharding_lib.state_shardings(shapes, mesh)
  target = state_lib.abstract_with_shardings(shapes, shardings)
  if latest:  # the newest readable one (a warning names each newer one that cannot be read)
    step, state, _ = ckpt.restore_latest_readable(target)
  else:
    state, _ = ckpt.restore(step, target)
  ckpt.close()

  eval_step = step_lib.make_eval_step(model, config.model.num_classes, mesh, shardings)
  eval_step = loop.compile_ahead(eval_step=(eval_step, (state, first)))["eval_step"]

  def all_batches():
    yield first
    yield from batches

  res = loop.evaluate(eval_step, state, config, mesh, split, batches=all_batches())
  rates = res.pop("rates")
  stages = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith("firing_rate/")}
  return {
    "step": int(step),
    "split": split,
    "num_examples": res["num_examples"],
    "top1": res["top1"],
    "top5": res["top5"],
    "loss": res["loss"],
    "firing_rate": res.get("firing_rate"),
    "firing_rates_per_stage": stages,
    "firing_rates": metrics_lib.rates_table(rates),
    "firing_rates_note": metrics_lib.RATES_NOTE,
    "energy_mj_per_image": loop.energy_of(config, rates),
    "images_per_s": res["images_per_s"],
    "num_params": state_lib.param_count(state.params),
    "num_devices": jax.device_count(),
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "checkpoint": os.path.join(directory, str(step)),
    "model": f"{config.model.name}/{config.model.variant}",
  }


def result_filename(workdir: str, split: str, step: int) -> str:
  """WORKDIR/eval_<split>_<step>.json, the split made filename-safe ("test[:64]" -> test_64)."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", split).strip("_")
  return os.path.join(os.path.abspath(workdir), f"eval_{safe}_{step}.json")


def table(res: dict[str, Any]) -> str:
  """A readable summary: the headline numbers, then per-stage and per-site rates."""
  energy = res["energy_mj_per_image"]
  lines = [
    f"{res['model']} step {res['step']} on {res['split']} ({res['num_examples']} images, "
    f"{res['num_devices']} devices)",
    f"  {'top-1':<24}{res['top1'] * 100:8.2f} %",
    f"  {'top-5':<24}{res['top5'] * 100:8.2f} %",
    f"  {'loss':<24}{res['loss']:8.4f}",
    f"  {'mean firing rate':<24}{(res['firing_rate'] or float('nan')):8.4f}",
    f"  {'energy per image':<24}{'n/a' if energy is None else f'{energy:8.4f} mJ'}",
    f"  {'images/s':<24}{res['images_per_s']:8.1f}",
    f"  {'parameters':<24}{res['num_params']:8,d}",
  ]
  if res["firing_rates_per_stage"]:
    lines.append("  firing rate per stage:")
    for stage, r in sorted(res["firing_rates_per_stage"].items()):
      lines.append(f"    {stage:<22}{r:8.4f}")
  if res["firing_rates"]:
    lines.append(f"  {'site':<52}{'K':>3}{'T':>3}{'mean':>9}{'count':>9}")
    for site, r in res["firing_rates"].items():
      k, t = np.shape(r["per_branch_per_t"])
      lines.append(f"  {site[:52]:<52}{k:>3}{t:>3}{r['mean']:9.4f}{r['mean_count']:9.4f}")
  return "\n".join(lines)
