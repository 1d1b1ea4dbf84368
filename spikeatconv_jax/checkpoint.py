"""Orbax checkpoints: asynchronous periodic saves, keep-N, restore onto any mesh, preemption.

A checkpoint step holds two items:
- "state": the TrainState (step, params, batch_stats, opt_state, rng), `ocp.args.StandardSave`;
- "meta": JSON with the step, the data position (= number of global batches consumed, which
  equals the step since one step eats one global batch) and the model config.

Restoring builds on an abstract target whose leaves carry the *current* shardings, so a
checkpoint written on one mesh restores onto any other. Before reading any array the saved
model config and the saved array shapes are compared with the current ones, and a mismatch
is a ValueError that lists what differs (DESIGN.md §12 item 3).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

# Model-config fields that may differ between save and restore: they change how the forward
# pass runs, not what the state holds (compute dtype, rematerialisation, stochastic depth).
# How the step is computed, not what the parameters mean: a checkpoint restores across them.
RESTORE_IGNORED_FIELDS = frozenset({"dtype", "remat", "drop_path", "scan_blocks"})
# Model fields added after checkpoints were first written, with the value every older
# checkpoint implies: a saved config that lacks one of them is compared as holding the default.
ADDED_FIELD_DEFAULTS = {
  "time_mode": "network",
  "spk_after_branch_out": False,
  "scan_blocks": False,
}


def config_to_dict(config: ml_collections.ConfigDict | dict) -> dict:
  """A JSON-normalised plain dict (tuples become lists) of a ConfigDict."""
  if isinstance(config, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
    return json.loads(config.to_json_best_effort(sort_keys=True))
  return json.loads(json.dumps(config, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def model_config_diff(saved: dict, current: dict, ignore=RESTORE_IGNORED_FIELDS) -> list[str]:
  """Human-readable lines for every model-config field that differs (ignoring `ignore`)."""
  a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(current))
  lines = []
  for key in sorted(set(a) | set(b)):
    if key in ignore:  # top-level model fields only, e.g. "dtype"
      continue
    va = a.get(key, ADDED_FIELD_DEFAULTS.get(key, "<absent>"))
    vb = b.get(key, ADDED_FIELD_DEFAULTS.get(key, "<absent>"))
    if va != vb:
      lines.append(f"model.{key}: checkpoint {va!r} != config {vb!r}")
  return lines


def _leaf_paths(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/stage0/.../kernel": shape} for a pytree of arrays/ShapeDtypeStructs/metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = []
    for p in path:
      names.append(str(getattr(p, "name", getattr(p, "key", getattr(p, "idx", p)))))
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(names)] = tuple(shape)
  return out


_HANDLER_SET = False


def _use_single_writer_on_cpu():
  """On CPU, save each replicated array from one replica instead of Orbax's replica-parallel
  default: that default slices every array per replica with a small jit program per shape,
  which cost ~1 min of compiles at the first save of the nano model on 8 fake CPU devices and
  buys nothing there. Accelerators keep Orbax's default."""
  global _HANDLER_SET
  if _HANDLER_SET or jax.default_backend() != "cpu":
    return
  ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
  )
  _HANDLER_SET = True


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the TrainState and its metadata.

  Args:
    directory: where the step directories go (e.g. WORKDIR/checkpoints).
    every: save every this many steps (`checkpoint_every_steps`); `save(force=True)` always
      saves.
    keep: number of checkpoints kept (`keep_checkpoints`).
    read_only: for eval (never creates or deletes anything).
    asynchronous: write in a background thread while training continues.
  """

  def __init__(
    self,
    directory: str,
    *,
    every: int = 1,
    keep: int | None = 3,
    read_only: bool = False,
    asynchronous: bool = True,
  ):
    self.directory = os.path.abspath(directory)
    _use_single_writer_on_cpu()
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, int(every)),
      max_to_keep=keep,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=asynchronous,
    )
    # Handlers named up front (not just item names), so that a fresh manager can read the
    # metadata of a checkpoint it has not written (the shape check before a restore).
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
      options=options,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `state` at `step`; True if one was started."""
    return self.manager.save(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
      ),
      force=force,
    )

  def meta(self, step: int) -> dict:
    """The JSON metadata of `step` (no arrays read)."""
    out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def check_model_config(self, step: int, model_config: Any):
    """Raises ValueError, listing the differing fields, if the checkpoint at `step` was made
    with another model config (fields in RESTORE_IGNORED_FIELDS may differ)."""
    saved_model = self.meta(step).get("model_config")
    if saved_model is None:
      return
    diff = model_config_diff(saved_model, model_config)
    if diff:
      raise ValueError(
        f"the checkpoint {os.path.join(self.directory, str(step))} was made with a different "
        "model config:\n  " + "\n  ".join(diff) + "\nuse the config it was trained with, or "
        "a fresh --workdir"
      )

  def check_shapes(self, step: int, target: Any):
    """Raises ValueError if the arrays saved at `step` differ in name or shape from `target`
    (an abstract TrainState)."""
    saved_tree = self.manager.item_metadata(int(step))["state"]
    if saved_tree is None:
      raise ValueError(
        f"cannot read the array metadata of {os.path.join(self.directory, str(step))}"
      )
    saved = _leaf_paths(saved_tree)
    wanted = _leaf_paths(target)
    lines = []
    for path in sorted(set(saved) | set(wanted)):
      a, b = saved.get(path, "<absent>"), wanted.get(path, "<absent>")
      if a != b:
        lines.append(f"{path}: checkpoint {a} != model {b}")
    if lines:
      shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
      raise ValueError(
        f"the checkpoint {os.path.join(self.directory, str(step))} does not fit the current "
        f"model ({len(lines)} arrays differ):\n  " + "\n  ".join(shown)
      )

  def restore(self, step: int, target: Any, model_config: Any = None) -> tuple[Any, dict]:
    """Restores (state, meta) of `step` onto the shardings carried by `target`.

    Args:
      step: the checkpoint step.
      target: the abstract TrainState whose leaves are ShapeDtypeStructs with shardings
        (`train.state.abstract_with_shardings`).
      model_config: when given, checked against the saved one first.
    """
    if model_config is not None:
      self.check_model_config(step, model_config)
    self.check_shapes(step, target)
    out = self.manager.restore(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return out["state"], dict(out["meta"])

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption notice (False when nothing announced one)."""
    return self.manager.reached_preemption(int(step))

  def wait(self):
    """Blocks until every pending asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class StopSignal:
  """Turns SIGTERM (and optionally SIGINT) into a flag the training loop polls.

  The handler only sets the flag; the loop then saves a checkpoint at a step boundary and
  returns, so nothing is written from inside a signal handler. Use as a context manager: the
  previous handlers are put back on exit. Only installable from the main thread; elsewhere it
  is a no-op flag.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.received: int | None = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.received = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}
    return False

  def __bool__(self) -> bool:
    return self.received is not None
