"""Config validation: one entry point, run before any data is read or anything compiles."""

from __future__ import annotations

import math

import ml_collections

from spikeatconv_jax import models
from spikeatconv_jax import sharding as sharding_lib


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks a whole run config (top-level fields, then the model at the dataset's image size).

  Raises:
    ValueError: naming the first bad field.
  """
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
  """Raises ValueError unless each micro-batch splits over the mesh's batch shards."""
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
