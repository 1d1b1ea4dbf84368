"""train_and_evaluate: one linear loop, in the order the recipe reads.

  config checks -> mesh -> data position (latest checkpoint) -> model, optimizer -> state
  (`state.build_or_restore`) -> compiled steps -> loop {step, log, checkpoint, eval, stop?}
  -> final checkpoint, eval (`evaluate`), energy, summary.

Outputs in the workdir, a local path or a URL such as gs://bucket/run (process 0 writes the
files, every process takes part in saves and evals):
  config.json          the full config of the latest start
  metrics.jsonl        one JSON object per log step ("step", "loss", ...) and per eval
  events.out.*         TensorBoard scalars (clu SummaryWriter)
  checkpoints/<step>/  Orbax checkpoints (state + meta)
  final_metrics.json   the final eval, firing rates, energy, parameter count, wall time
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers

from spikeatconv_jax import checkpoint as ckpt_lib
from spikeatconv_jax import files, models, optim
from spikeatconv_jax import metrics as metrics_lib
from spikeatconv_jax import sharding as sharding_lib
from spikeatconv_jax.data import pipeline
from spikeatconv_jax.train import checks
from spikeatconv_jax.train import evaluate as eval_lib
from spikeatconv_jax.train import state as state_lib
from spikeatconv_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient / parameter norm) became NaN or Inf; the run stopped."""


def meta_for(step: int, config) -> dict:
  return {
    "step": int(step),
    "data_position": int(step),  # global batches consumed; train_iterator(start_step=step)
    "model_config": ckpt_lib.config_to_dict(config.model),
    "seed": int(config.seed),
    "batch_size": int(config.batch_size),
  }


@jax.jit
def _accumulate(acc: dict, m: dict) -> dict:
  """Running sums of the step measurements plus an "all finite so far" flag, on device."""
  out = {k: acc[k] + m[k] for k in acc if k != "finite"}
  out["finite"] = acc["finite"] * m["finite"]
  return out


def _zeros_like_measurements(m: dict) -> dict:
  out = {k: jnp.zeros_like(v) for k, v in m.items()}
  out["finite"] = jnp.ones_like(m["finite"])
  return out


def _console(step, total, values, ips, eta_s):
  rates = " ".join(
    f"{k.split('/', 1)[1]}={v:.3f}" for k, v in values.items() if k.startswith("firing_rate/")
  )
  logging.info(
    "step %d/%d (%.1f%%) | loss %.4f | acc %.3f | lr %.3g | |g| %.3g | fr %.3f [%s] | "
    "%.0f img/s | ETA %s",
    step, total, 100.0 * step / total, values["loss"], values["accuracy"], values["lr"],
    values["grad_norm"], values.get("firing_rate", float("nan")), rates, ips,
    metrics_lib.format_duration(eta_s),
  )  # fmt: skip


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

  Args:
    config: the top-level config (configs/default.py names).
    workdir: output directory, a local path or a URL (gs://...); the same workdir resumes.
    stop_after_steps: test hook: behave as if SIGTERM arrived after this many steps of this
      invocation (save, wait, return).

  Returns:
    The final metrics dict (also in workdir/final_metrics.json), or {"stopped": step, ...}
    when a signal or preemption stopped the run.

  Raises:
    NonFiniteLossError: the loss went NaN/Inf; the last good checkpoint is kept.
    ValueError: a bad config or an incompatible checkpoint, before any training.
  """
  wall_start = time.time()
  workdir = files.resolve_dir(workdir)
  is_main = jax.process_index() == 0
  checks.check_config(config)

  # Mesh and the data position.
  mesh = sharding_lib.make_mesh(config.mesh)
  checks.check_batch(config.batch_size, mesh, config.grad_accum_steps)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  num_train = pipeline.num_examples(config.dataset, config.dataset.train_split)
  steps_per_epoch, total_steps = checks.schedule_lengths(config, num_train)
  ckpt = ckpt_lib.Checkpointer(
    files.join(workdir, "checkpoints"),
    every=config.checkpoint_every_steps,
    keep=config.keep_checkpoints,
    devices=mesh.devices.flat,
  )
  start_step = ckpt.latest_step() or 0
  if start_step:
    ckpt.check_model_config(start_step, config.model)  # before any data or compile
  if is_main:
    config_dict = ckpt_lib.config_to_dict(config)
    files.write_json(files.join(workdir, "config.json"), config_dict)
  logging.info(
    "mesh %s | %d processes | global batch %d | %d train examples, %d steps/epoch, %d steps | %s",
    dict(mesh.shape), jax.process_count(), config.batch_size, num_train, steps_per_epoch,
    total_steps, f"latest checkpoint: step {start_step}" if start_step else "no checkpoint yet",
  )  # fmt: skip

  # Model, optimizer, state.
  model = models.build(config.model, platform=mesh.devices.flat[0].platform)
  tx, schedule = optim.make_optimizer(
    config, total_steps=total_steps, steps_per_epoch=steps_per_epoch
  )

  def batches_from(start_step):
    batches = pipeline.train_iterator(
      config.dataset,
      global_batch_size=config.batch_size,
      sharding=batch_sharding,
      seed=config.seed,
      start_step=start_step,
    )
    first = next(batches)
    return first, itertools.chain([first], batches)

  first, train_iter = batches_from(start_step)
  image_shape = tuple(first["image"].shape[1:])  # [H, W, C]
  # Restores the newest checkpoint that can be read (a warning names each one that cannot).
  state, shardings, restored, meta = state_lib.build_or_restore(
    model, tx, image_shape, mesh, seed=config.seed, ckpt=ckpt if start_step else None,
    model_config=config.model,
  )  # fmt: skip
  if restored != start_step:
    start_step = restored
    first, train_iter = batches_from(start_step)
  logging.info(f"resuming from step {start_step}" if start_step else "training from scratch")
  if meta.get("data_position", start_step) != start_step:
    raise ValueError(f"checkpoint {start_step} has data_position {meta['data_position']}")
  num_params = state_lib.param_count(state.params)
  logging.info("model %s/%s: %d parameters", config.model.name, config.model.variant, num_params)

  lrs = optim.schedule_table(schedule, total_steps)  # [total_steps + 1] on the host
  train_step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  eval_step = step_lib.make_eval_step(model, config.model.num_classes, mesh, shardings)
  steps = dict(eval_step=(eval_step, (state, eval_lib.eval_example(config, mesh))))
  if start_step < total_steps:  # a finished run only evaluates again
    steps["train_step"] = (train_step, (state, first, lrs[start_step]))
  compiled = eval_lib.compile_ahead(**steps)
  eval_step, train_step = compiled["eval_step"], compiled.get("train_step")
  writer = (
    metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))  # tf.io.gfile: URLs too
    if is_main
    else metric_writers.MultiWriter([])
  )
  jsonl = files.JsonlWriter(files.join(workdir, "metrics.jsonl"), enabled=is_main)

  def log_eval(step, res):
    scalars = {f"eval/{k}": v for k, v in res.items() if isinstance(v, float)}
    writer.write_scalars(step, scalars)
    jsonl.write(step, scalars)
    logging.info(
      "eval %s @ step %d: top-1 %.4f | top-5 %.4f | loss %.4f | fr %.4f | %d images, %.0f img/s",
      res["split"], step, res["top1"], res["top5"], res["loss"], res.get("firing_rate", math.nan),
      res["num_examples"], res["images_per_s"],
    )  # fmt: skip

  step = start_step
  last_saved = start_step if start_step else None
  train_values: dict[str, float] = {}
  eval_res: dict[str, Any] | None = None
  stopped = None
  with ckpt_lib.StopSignal() as signal_flag:
    acc, window, t_window = None, 0, time.time()
    while step < total_steps:
      state, m = train_step(state, next(train_iter), lrs[step])
      step += 1
      if acc is None:
        # The first step's warm-up stays in the first window's images/s.
        jax.block_until_ready(m)
        logging.info("first step took %.1f s", time.time() - t_window)
        acc, window, paused = _zeros_like_measurements(m), 0, 0.0
      acc = _accumulate(acc, m)
      window += 1
      is_log = step % config.log_every_steps == 0 or step == total_steps
      is_save = step % config.checkpoint_every_steps == 0 or step == total_steps
      is_eval = step % config.eval_every_steps == 0 and step != total_steps
      # SIGTERM or a preemption notice: the same step on every process (checked every step).
      stop = signal_flag.should_stop(step) or (
        stop_after_steps is not None and step - start_step >= stop_after_steps
      )
      if not (is_log or is_save or is_eval or stop):
        continue
      host = jax.device_get(acc)
      if host["finite"] < 1:
        ckpt.wait()  # the last good checkpoint (saved before the bad step) stays
        good = [s for s in ckpt.all_steps() if s <= step]
        raise NonFiniteLossError(
          f"non-finite loss (or gradient/parameter norm) between steps {step - window + 1} and "
          f"{step}: last loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}; stopping. "
          + (f"The last good checkpoint is step {max(good)} in {ckpt.directory}." if good else
             "No checkpoint was saved.")
        )  # fmt: skip
      if is_log:
        elapsed = time.time() - t_window - paused  # eval time left out
        train_values = {k: float(v) / window for k, v in host.items() if k != "finite"}
        last = jax.device_get(m)
        train_values["lr"] = float(last["lr"])
        train_values["param_norm"] = float(last["param_norm"])
        ips = window * config.batch_size / max(elapsed, 1e-9)
        eta = (total_steps - step) * elapsed / window
        train_values.update({"images_per_s": ips, "eta_s": eta, "epoch": step / steps_per_epoch})
        writer.write_scalars(step, {f"train/{k}": v for k, v in train_values.items()})
        jsonl.write(step, train_values)
        if is_main:
          _console(step, total_steps, train_values, ips, eta)
        acc, window, t_window, paused = _zeros_like_measurements(m), 0, time.time(), 0.0
      if is_save or stop:
        ckpt.save(step, state, meta_for(step, config), force=True)
        last_saved = step
      if is_eval:
        t_eval = time.time()
        eval_res = eval_lib.evaluate(eval_step, state, config, mesh, config.dataset.eval_split)
        log_eval(step, eval_res)
        paused += time.time() - t_eval
      if stop:
        stopped = step
        break

  if stopped is not None:
    ckpt.wait()
    logging.info(
      "stopped at step %d (%s); checkpoint saved in %s. Run again with the same --workdir "
      "to resume.",
      stopped, signal_flag.stopped_by or "stop request", ckpt.directory,
    )  # fmt: skip
    writer.flush()
    ckpt.close()
    return {"stopped": stopped, "checkpoint_dir": ckpt.directory}

  if last_saved != step:
    ckpt.save(step, state, meta_for(step, config), force=True)
  eval_res = eval_lib.evaluate(eval_step, state, config, mesh, config.dataset.eval_split)
  log_eval(step, eval_res)
  ckpt.close()
  writer.flush()
  writer.close()

  rates = eval_res.pop("rates")
  energy = eval_lib.energy_of(config, rates)
  wall = time.time() - wall_start
  final = {
    "step": step,
    "eval": eval_res,
    "train": train_values,
    "firing_rates": metrics_lib.rates_table(rates),
    "firing_rates_note": metrics_lib.RATES_NOTE,
    "energy_mj_per_image": energy,
    "num_params": num_params,
    "wall_time_s": wall,
    "workdir": workdir,
    "checkpoint_dir": ckpt.directory,
    "metrics_file": files.join(workdir, "metrics.jsonl"),
  }
  if is_main:
    files.write_json(files.join(workdir, "final_metrics.json"), final)
    print(summary_text(config, final), flush=True)
  return final


def summary_text(config, final: dict) -> str:
  ev = final["eval"]
  energy = final["energy_mj_per_image"]
  fr = ev.get("firing_rate", math.nan)
  lines = [
    "=" * 72,
    f"SpikeAtConv {config.model.variant} ({config.model.name}) on {config.dataset.name}: "
    f"{final['step']} steps",
    f"  {ev['split']} top-1      {ev['top1'] * 100:.2f} %   (top-5 {ev['top5'] * 100:.2f} %, "
    f"loss {ev['loss']:.4f}, {ev['num_examples']} images)",
    f"  mean firing rate  {fr:.4f} (per site and time step, mean over sites)"
    if math.isfinite(fr)
    else "  mean firing rate  n/a (no SPK sites: a spike-free model)",
    f"  energy per image  {'n/a' if energy is None else f'{energy:.4f} mJ'} (measured rates)",
    f"  parameters        {final['num_params']:,}",
    f"  wall time         {metrics_lib.format_duration(final['wall_time_s'])}",
    f"  checkpoints       {final['checkpoint_dir']}",
    f"  logs              {final['metrics_file']} (+ TensorBoard events in {final['workdir']})",
    "=" * 72,
  ]
  return "\n".join(lines)
