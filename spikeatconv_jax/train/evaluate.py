"""Evaluation as a library: eval batches, compile-ahead, one pass over a split, the energy of
measured rates, and `evaluate_checkpoint` (the library side of eval.py).

The training loop imports this module for its periodic and final evaluations; nothing here
imports the loop. A checkpoint is restored onto the mesh of the *current* devices, whatever mesh
it was trained on: the restore target is the abstract TrainState carrying the current shardings.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from orbax.checkpoint import multihost

from spikeatconv_jax import checkpoint as ckpt_lib
from spikeatconv_jax import energy as energy_lib
from spikeatconv_jax import files, models, optim
from spikeatconv_jax import metrics as metrics_lib
from spikeatconv_jax import sharding as sharding_lib
from spikeatconv_jax.data import pipeline
from spikeatconv_jax.train import checks
from spikeatconv_jax.train import state as state_lib
from spikeatconv_jax.train import step as step_lib


def eval_batches(config, mesh, split: str):
  """The pipeline's eval iterator for `split`, sharded over the mesh's batch axes."""
  batch_size = config.get("eval_batch_size") or config.batch_size
  checks.check_batch(batch_size, mesh, what="eval_batch_size")
  return pipeline.eval_iterator(
    config.dataset,
    split=split,
    global_batch_size=batch_size,
    sharding=sharding_lib.batch_sharding(mesh),
  )


def eval_example(config, mesh) -> dict:
  """The abstract shape of an eval batch (read from the pipeline's first batch)."""
  batch = next(iter(eval_batches(config, mesh, config.dataset.eval_split)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)


def compile_ahead(**steps) -> dict:
  """Compiles each `name=(jitted, args)` before its first run; with several processes, waits
  for all of them at a coordination-service barrier. Returns {name: compiled step}.

  Every process must enter a new collective program within the CPU collectives' (gloo) 30 s
  timeout of the others, and compiles on loaded hosts can differ by more than that. Compiling
  ahead and meeting at a barrier with a long timeout removes that skew. It also puts the compile
  time in the log and fails on a compile error before any step runs.
  """
  compiled = {}
  for name, (fn, args) in steps.items():
    t0 = time.time()
    compiled[name] = fn.lower(*args).compile()
    logging.info("compiled the %s in %.1f s", name.replace("_", " "), time.time() - t0)
  if jax.process_count() > 1:
    multihost.sync_global_processes("spikeatconv_compiled_" + "_".join(steps), timeout=3600)
  return compiled


def evaluate(eval_step, state, config, mesh, split: str, batches=None) -> dict[str, Any]:
  """One pass over `split`: top-1/top-5/loss, per-site rates [K, T], images/s.

  images/s leaves out the first batch, which includes the compile (unless it is the only one).
  `batches` may pass an already created `eval_batches` iterator.
  """
  if batches is None:
    batches = eval_batches(config, mesh, split)
  acc = metrics_lib.EvalAccumulator()
  t0, timed_from, n_timed = time.time(), None, 0
  for batch in batches:
    out = eval_step(state, batch)
    if timed_from is None:
      jax.block_until_ready(out)
      timed_from = time.time()
    else:
      n_timed += int(batch["image"].shape[0])
    acc.add(out)
  res = acc.result()
  elapsed = time.time() - (timed_from if n_timed else t0)
  res["images_per_s"] = (n_timed or res["num_examples"]) / max(elapsed, 1e-9)
  res["split"] = split
  return res


def energy_of(config, rates: dict[str, np.ndarray]) -> float:
  """Energy per image in mJ of `config.model` with the measured rates {site: [K, T]}."""
  report = energy_lib.report(config.model, config.dataset.image_size, firing_rates=rates)
  return energy_mj(report)


def energy_mj(report: dict[str, Any]) -> float:
  """The total energy (mJ per image) of an `energy.report` result."""
  return float(report["total_energy_mj"])


def optimizer_for_structure(config):
  """An optimizer with the run's state structure, for a restore target outside training.

  The optimizer state's structure (not its values) is part of the restore target; the
  schedule's length does not change it, so any valid length will do.
  """
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
  `split`. `workdir` may be a local path or a URL (gs://...).

  Returns:
    A JSON-ready dict: step, split, num_examples, top1, top5, loss, firing_rate (mean),
    firing_rates (per site: per branch and time step), firing_rates_per_stage,
    firing_rates_note, energy_mj_per_image, images_per_s, num_params, checkpoint.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in the workdir.
    ValueError: a bad config; the checkpoint was made with another model config or other
      shapes, or it cannot be read (`checkpoint.CheckpointUnreadableError`, a one-line message).
  """
  workdir = files.resolve_dir(workdir)
  split = split or config.dataset.eval_split
  checks.check_config(config)
  directory = files.join(workdir, "checkpoints")
  if not files.exists(directory):
    raise FileNotFoundError(f"no checkpoints directory in {workdir}")
  mesh = sharding_lib.make_mesh(config.mesh)
  ckpt = ckpt_lib.Checkpointer(
    directory, read_only=True, asynchronous=False, devices=mesh.devices.flat
  )
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
  ckpt.check_model_config(max(steps) if step is None else step, config.model)

  model = models.build(config.model, platform=mesh.devices.flat[0].platform)
  batches = eval_batches(config, mesh, split)
  first = next(batches)
  image_shape = tuple(first["image"].shape[1:])  # [H, W, C]
  tx = optimizer_for_structure(config)
  # step None: the newest readable checkpoint (a warning names each newer one that cannot be read)
  state, shardings, step, _ = state_lib.build_or_restore(
    model, tx, image_shape, mesh, seed=config.seed, ckpt=ckpt, step=step
  )
  ckpt.close()

  eval_step = step_lib.make_eval_step(model, config.model.num_classes, mesh, shardings)
  eval_step = compile_ahead(eval_step=(eval_step, (state, first)))["eval_step"]

  def all_batches():
    yield first
    yield from batches

  res = evaluate(eval_step, state, config, mesh, split, batches=all_batches())
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
    "energy_mj_per_image": energy_of(config, rates),
    "images_per_s": res["images_per_s"],
    "num_params": state_lib.param_count(state.params),
    "num_devices": jax.device_count(),
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "checkpoint": files.join(directory, str(step)),
    "model": f"{config.model.name}/{config.model.variant}",
  }


def result_filename(workdir: str, split: str, step: int) -> str:
  """WORKDIR/eval_<split>_<step>.json, the split made filename-safe ("test[:64]" -> test_64)."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", split).strip("_")
  return files.join(files.resolve_dir(workdir), f"eval_{safe}_{step}.json")


def _rate(rate: float | None) -> str:
  """A mean firing rate for the table: "n/a" for a spike-free model (no SPK sites)."""
  return f"{'n/a':>8}" if rate is None else f"{rate:8.4f}"


def table(res: dict[str, Any]) -> str:
  """A readable summary: the headline numbers, then per-stage and per-site rates."""
  energy = res["energy_mj_per_image"]
  lines = [
    f"{res['model']} step {res['step']} on {res['split']} ({res['num_examples']} images, "
    f"{res['num_devices']} devices)",
    f"  {'top-1':<24}{res['top1'] * 100:8.2f} %",
    f"  {'top-5':<24}{res['top5'] * 100:8.2f} %",
    f"  {'loss':<24}{res['loss']:8.4f}",
    f"  {'mean firing rate':<24}{_rate(res['firing_rate'])}",
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
