"""train_and_evaluate: one linear loop, in the order the recipe reads.

  mesh -> data position (latest checkpoint) -> model, optimizer -> abstract state, shardings
  -> restore or init -> jitted steps -> loop {step, log, checkpoint, eval, stop?} -> final
  checkpoint, eval, summary.

Outputs in the workdir (process 0 writes, every process takes part in saves and evals):
  config.json          the full config of the latest start
  metrics.jsonl        one JSON object per log step ("step", "loss", ...) and per eval
  events.out.*         TensorBoard scalars (clu SummaryWriter)
  checkpoints/<step>/  Orbax checkpoints (state + meta)
  final_metrics.json   the final eval, firing rates, energy, parameter count, wall time
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from orbax.checkpoint import multihost

from spikeatconv_jax import checkpoint as ckpt_lib
from spikeatconv_jax import metrics as metrics_lib
from spikeatconv_jax import models, optim
from spikeatconv_jax import sharding as sharding_lib
from spikeatconv_jax.data import pipeline
from spikeatconv_jax.train import state as state_lib
from spikeatconv_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient / parameter norm) became NaN or Inf; the run stopped."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Top-level config checks that need no data or compile (raise ValueError)."""
  positive = ["batch_size", "grad_accum_steps", "log_every_steps", "eval_every_steps"]
  positive += ["checkpoint_every_steps", "keep_checkpoints"]
  for name in positive:
    if not isinstance(config[name], int) or config[name] < 1:
      raise ValueError(f"config.{name} must be an integer >= 1, got {config[name]!r}")
  if config.total_steps is None and not config.num_epochs > 0:
    raise ValueError(f"config.num_epochs must be > 0 (or set total_steps), got {config.num_epochs}")
  if config.total_steps is not None and config.total_steps < 1:
    raise ValueError(f"config.total_steps must be >= 1 or None, got {config.total_steps}")
  for name in ("mixup", "cutmix", "label_smoothing", "weight_decay"):
    if not config[name] >= 0:
      raise ValueError(f"config.{name} must be >= 0, got {config[name]}")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(
      f"config.batch_size {config.batch_size} is not a multiple of "
      f"grad_accum_steps {config.grad_accum_steps}"
    )
  if config.model.num_classes != config.dataset.num_classes:
    raise ValueError(
      f"config.model.num_classes {config.model.num_classes} != "
      f"config.dataset.num_classes {config.dataset.num_classes}"
    )
  models.validate(config.model, config.dataset.image_size)


def check_batch(batch_size: int, mesh, grad_accum_steps: int = 1, what: str = "batch_size"):
  slices = sharding_lib.batch_size_per_step(mesh)
  micro = batch_size // grad_accum_steps
  if micro % slices:
    raise ValueError(
      f"config.{what} {batch_size} (micro-batch {micro} with grad_accum_steps="
      f"{grad_accum_steps}) does not split over the {slices} batch shards of the mesh "
      f"{dict(mesh.shape)}"
    )


def schedule_lengths(config, num_train: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) of the run."""
  steps_per_epoch = max(1, num_train // config.batch_size)
  if config.total_steps is not None:
    return steps_per_epoch, int(config.total_steps)
  return steps_per_epoch, int(math.ceil(config.num_epochs * steps_per_epoch))


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


def evaluate(eval_step, state, config, mesh, split: str, batches=None) -> dict[str, Any]:
  """One pass over `split`: top-1/top-5/loss, per-site rates [K, T], images/s.

  images/s leaves out the first batch, which includes the compile (unless it is the only one).
  `batches` may pass an already created `eval_iterator`.
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


def eval_example(config, mesh) -> dict:
  """The abstract shape of an eval batch (read from the pipeline's first batch)."""
  batch = next(iter(eval_batches(config, mesh, config.dataset.eval_split)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)


def eval_batches(config, mesh, split: str):
  batch_size = config.get("eval_batch_size") or config.batch_size
  check_batch(batch_size, mesh, what="eval_batch_size")
  return pipeline.eval_iterator(
    config.dataset,
    split=split,
    global_batch_size=batch_size,
    sharding=sharding_lib.batch_sharding(mesh),
  )


def energy_of(config, rates: dict[str, np.ndarray]) -> float | None:
  """Energy per image in mJ with the measured rates (None when the report is unavailable)."""
  try:
    from spikeatconv_jax import energy
  except ImportError:
    return None
  report = energy.report(config.model, config.dataset.image_size, firing_rates=rates)
  return energy_mj(report)


def energy_mj(report: dict[str, Any]) -> float:
  """The total energy (mJ per image) of an `energy.report` result."""
  return float(report["total_energy_mj"])


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
    workdir: output directory; the same workdir resumes.
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
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  check_config(config)

  # Mesh and the data position.
  mesh = sharding_lib.make_mesh(config.mesh)
  check_batch(config.batch_size, mesh, config.grad_accum_steps)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  num_train = pipeline.num_examples(config.dataset, config.dataset.train_split)
  steps_per_epoch, total_steps = schedule_lengths(config, num_train)
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    every=config.checkpoint_every_steps,
    keep=config.keep_checkpoints,
    devices=mesh.devices.flat,
  )
  start_step = ckpt.latest_step() or 0
  if start_step:
    ckpt.check_model_config(start_step, config.model)  # before any data or compile
  if is_main:
    metrics_lib.write_json(os.path.join(workdir, "config.json"), ckpt_lib.config_to_dict(config))
  logging.info(
    "mesh %s | %d processes | global batch %d | %d train examples, %d steps/epoch, %d steps | %s",
    dict(mesh.shape), jax.process_count(), config.batch_size, num_train, steps_per_epoch,
    total_steps, f"resuming from step {start_step}" if start_step else "from scratch",
  )  # fmt: skip

  # Model, optimizer, state.
  model = models.build(config.model)
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
  shapes = state_lib.abstract_state(model, tx, image_shape, config.seed)
  shardings = sharding_lib.state_shardings(shapes, mesh)
  if start_step:
    target = state_lib.abstract_with_shardings(shapes, shardings)
    # The newest checkpoint that can be read (a warning names each one that cannot).
    restored, state, meta = ckpt.restore_latest_readable(target, config.model)
    if restored != start_step:
      start_step = restored
      first, train_iter = batches_from(start_step)
    if meta.get("data_position", start_step) != start_step:
      raise ValueError(f"checkpoint {start_step} has data_position {meta['data_position']}")
  else:
    init = jax.jit(state_lib.init_fn(model, tx, image_shape), out_shardings=shardings)
    state = init(jax.random.PRNGKey(config.seed))
  num_params = state_lib.param_count(state.params)
  logging.info("model %s/%s: %d parameters", config.model.name, config.model.variant, num_params)

  lrs = optim.schedule_table(schedule, total_steps)  # [total_steps + 1] on the host
  train_step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  eval_step = step_lib.make_eval_step(model, config.model.num_classes, mesh, shardings)
  steps = dict(eval_step=(eval_step, (state, eval_example(config, mesh))))
  if start_step < total_steps:  # a finished run only evaluates again
    steps["train_step"] = (train_step, (state, first, lrs[start_step]))
  compiled = compile_ahead(**steps)
  eval_step, train_step = compiled["eval_step"], compiled.get("train_step")
  writer = (
    metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    if is_main
    else metric_writers.MultiWriter([])
  )
  jsonl = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), enabled=is_main)

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
        eval_res = evaluate(eval_step, state, config, mesh, config.dataset.eval_split)
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
  eval_res = evaluate(eval_step, state, config, mesh, config.dataset.eval_split)
  log_eval(step, eval_res)
  ckpt.close()
  writer.flush()
  writer.close()

  rates = eval_res.pop("rates")
  energy = energy_of(config, rates)
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
    "metrics_file": os.path.join(workdir, "metrics.jsonl"),
  }
  if is_main:
    metrics_lib.write_json(os.path.join(workdir, "final_metrics.json"), final)
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
