"""Orbax checkpoints: asynchronous periodic saves, keep-N, restore onto any mesh, preemption.

A checkpoint step holds two items:
- "state": the TrainState (step, params, batch_stats, opt_state, rng), `ocp.args.StandardSave`;
- "meta": JSON with the step, the data position (= number of global batches consumed, which
  equals the step since one step eats one global batch) and the model config.

Restoring builds on an abstract target whose leaves carry the *current* shardings, so a
checkpoint written on one mesh restores onto any other. Before reading any array the saved
model config and the saved array shapes are compared with the current ones, and a mismatch
is a ValueError that lists what differs (DESIGN.md §12 item 3).

A checkpoint that cannot be read (a damaged or truncated file) is not a mismatch: resuming
falls back to the newest readable step, with one warning line, and moves the unreadable one
aside (to CHECKPOINT_DIR.unreadable/, never deleted) so that training can write that step again.

The directory may be a local path or any URL that `etils.epath` (and so Orbax) opens, such as
gs://bucket/run/checkpoints.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as py_logging
import signal
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from spikeatconv_jax import files

# Model-config fields that may differ between save and restore: they change how the forward
# pass runs, not what the state holds (compute dtype, rematerialisation, stochastic depth).
# How the step is computed, not what the parameters mean: a checkpoint restores across them.
RESTORE_IGNORED_FIELDS = frozenset(
  {"dtype", "remat", "remat_policy", "drop_path", "scan_blocks", "kernels"}
)
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


class CheckpointMismatchError(ValueError):
  """The checkpoint holds another model: its saved config or its array shapes differ."""


class CheckpointUnreadableError(ValueError):
  """A checkpoint's files cannot be read (damaged, truncated or missing)."""


def as_path(directory: str | epath.PathLike) -> epath.Path:
  """`directory` as an epath.Path: a URL (gs://...) as given, a local path made absolute."""
  return epath.Path(files.resolve_dir(directory))


def _reason(e: BaseException) -> str:
  """The innermost cause of `e` on one line: TensorStore wraps the useful message (e.g. a
  decompression error naming the file) in an exception whose text embeds a long spec."""
  chain = [e]
  while len(chain) < 16:
    nxt = chain[-1].__cause__ or chain[-1].__context__
    if nxt is None or any(nxt is c for c in chain):
      break
    chain.append(nxt)
  for exc in reversed(chain):
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if text:
      return text if len(text) <= 400 else text[:397] + "..."
  return type(e).__name__


def _is_abandoned_read(unraisable) -> bool:
  """An abandoned read's coroutine being collected, or its I/O callback finding the restore's
  event loop already closed (RuntimeError "Event loop is closed", from a TensorStore thread)."""
  exc = unraisable.exc_value
  return isinstance(unraisable.object, types.CoroutineType) or (
    isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
  )


def _drop_unretrieved_read_errors(record: py_logging.LogRecord) -> bool:
  """False for asyncio's "Task/Future exception was never retrieved" about an array read."""
  message = record.getMessage().lower()
  reading = "error reading" in message or "error while reading" in message
  return not ("exception was never retrieved" in message and reading)


def _quiet_abandoned_reads():
  """When one array read of a restore fails, Orbax abandons the others, and each prints a
  traceback to stderr when its coroutine is collected or its I/O completes later (hundreds for
  a real model), through three routes: the unraisable hook, sys.excepthook (a TensorStore
  callback finding the restore's event loop closed) and asyncio's "exception was never
  retrieved" log. They say nothing the raised error does not. Installed before every restore
  (a late completion can beat the `except` that sees the error); only these are dropped, and
  anything else reaches the hook that was there before."""
  if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  previous_excepthook = sys.excepthook

  def excepthook(exc_type, exc, tb):
    if not (exc_type is RuntimeError and str(exc) == "Event loop is closed"):
      previous_excepthook(exc_type, exc, tb)

  sys.excepthook = excepthook
  py_logging.getLogger("asyncio").addFilter(_drop_unretrieved_read_errors)


def _agreed(ok: bool) -> bool:
  """True when `ok` holds on every process (each may read different shards of a checkpoint)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@contextlib.contextmanager
def _orbax_warnings_off():
  """Orbax's warnings about what this module does on purpose (a read-only manager, its own
  array handler) stay out of the console; its INFO still reaches the log file."""

  def keep(record: py_logging.LogRecord) -> bool:
    return record.levelno != py_logging.WARNING or "orbax" not in record.pathname

  absl_logger = logging.get_absl_logger()
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


_HANDLER_SET = False


def _use_single_writer_on_cpu(devices) -> None:
  """When the saved arrays live on CPU devices, save each replicated array from one replica
  instead of Orbax's replica-parallel default: that default slices every array per replica
  with a small jit program per array shape, compiled at the first save, and that buys nothing
  when every replica shares one host's memory. Arrays on accelerators keep Orbax's
  default. Orbax reads the handler when a manager is built, so this runs before that."""
  global _HANDLER_SET
  if _HANDLER_SET or not devices or any(d.platform != "cpu" for d in devices):
    return
  with _orbax_warnings_off():  # Orbax warns of every override; this one is meant
    ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
    )
  _HANDLER_SET = True


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for the TrainState and its metadata.

  Args:
    directory: where the step directories go (e.g. WORKDIR/checkpoints); a local path or a
      URL that etils.epath opens (gs://...).
    every: save every this many steps (`checkpoint_every_steps`); `save(force=True)` always
      saves.
    keep: number of checkpoints kept (`keep_checkpoints`).
    read_only: for eval (never creates, moves or deletes anything).
    asynchronous: write in a background thread while training continues.
    devices: the devices the saved arrays live on (e.g. `mesh.devices.flat`); on CPU devices
      each replicated array is written by one replica.
  """

  def __init__(
    self,
    directory: str | epath.PathLike,
    *,
    every: int = 1,
    keep: int | None = 3,
    read_only: bool = False,
    asynchronous: bool = True,
    devices: Sequence[jax.Device] | None = None,
  ):
    self.path = as_path(directory)
    self.directory = str(self.path)  # for messages and JSON
    self.read_only = read_only
    _use_single_writer_on_cpu(list(devices) if devices is not None else None)
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=0 if read_only else max(1, int(every)),
      max_to_keep=None if read_only else keep,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=asynchronous,
    )
    # Handlers named up front (not just item names), so that a fresh manager can read the
    # metadata of a checkpoint it has not written (the shape check before a restore).
    with _orbax_warnings_off() if read_only else contextlib.nullcontext():  # "read only=..."
      self.manager = ocp.CheckpointManager(
        self.path,
        item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
        },
        options=options,
      )

  def step_path(self, step: int) -> epath.Path:
    return self.path / str(int(step))

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

  def _unreadable(self, step: int, e: BaseException) -> CheckpointUnreadableError:
    return CheckpointUnreadableError(
      f"the checkpoint {self.step_path(step)} cannot be read: {_reason(e)}"
    )

  def meta(self, step: int) -> dict:
    """The JSON metadata of `step` (no arrays read).

    Raises:
      CheckpointUnreadableError: its files cannot be read.
    """
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(out["meta"])
    except Exception as e:
      raise self._unreadable(step, e) from e

  def check_model_config(self, step: int, model_config: Any):
    """Raises CheckpointMismatchError (a ValueError), listing the differing fields, if the
    checkpoint at `step` was made with another model config (fields in RESTORE_IGNORED_FIELDS
    may differ). A checkpoint whose metadata cannot be read passes: `restore` reports it."""
    try:
      saved_model = self.meta(step).get("model_config")
    except CheckpointUnreadableError:
      return
    if saved_model is None:
      return
    diff = model_config_diff(saved_model, model_config)
    if diff:
      raise CheckpointMismatchError(
        f"the checkpoint {self.step_path(step)} was made with a different "
        "model config:\n  " + "\n  ".join(diff) + "\nuse the config it was trained with, or "
        "a fresh --workdir"
      )

  def check_shapes(self, step: int, target: Any):
    """Raises CheckpointMismatchError (a ValueError) if the arrays saved at `step` differ in
    name or shape from `target` (an abstract TrainState), CheckpointUnreadableError if their
    metadata cannot be read."""
    try:
      saved_tree = self.manager.item_metadata(int(step))["state"]
    except Exception as e:
      raise self._unreadable(step, e) from e
    if saved_tree is None:
      raise CheckpointUnreadableError(
        f"the checkpoint {self.step_path(step)} cannot be read: no array metadata"
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
      raise CheckpointMismatchError(
        f"the checkpoint {self.step_path(step)} does not fit the current "
        f"model ({len(lines)} arrays differ):\n  " + "\n  ".join(shown)
      )

  def restore(self, step: int, target: Any, model_config: Any = None) -> tuple[Any, dict]:
    """Restores (state, meta) of `step` onto the shardings carried by `target`.

    Args:
      step: the checkpoint step.
      target: the abstract TrainState whose leaves are ShapeDtypeStructs with shardings
        (`train.state.abstract_with_shardings`).
      model_config: when given, checked against the saved one first.

    Raises:
      CheckpointMismatchError: another model config or other array shapes.
      CheckpointUnreadableError: its files cannot be read (on any process).
    """
    if model_config is not None:
      self.check_model_config(step, model_config)
    self.check_shapes(step, target)
    error = None
    _quiet_abandoned_reads()
    try:
      out = self.manager.restore(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:
      gc.collect()  # the abandoned coroutines, now rather than at some later allocation
      error = self._unreadable(step, e)
      error.__cause__ = e
    if not _agreed(error is None):
      raise error or CheckpointUnreadableError(
        f"the checkpoint {self.step_path(step)} cannot be read on another process"
      )
    return out["state"], dict(out["meta"])

  def restore_latest_readable(
    self, target: Any, model_config: Any = None
  ) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that can be read: (step, state, meta), None if there is
    no checkpoint at all.

    Each newer one that cannot be read gets one warning line naming it, the reason and the
    step used instead. Unless read-only, those are moved to `<directory>.unreadable/<step>`
    (nothing is deleted), so that training can write their steps again.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint holds another model.
      CheckpointUnreadableError: no checkpoint can be read (nothing is moved then).
    """
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, target, model_config)
      except CheckpointUnreadableError as e:
        unreadable.append((step, e))
        continue
      moved = self._set_aside([s for s, _ in unreadable])
      for s, e in unreadable:
        where = f"; moved it to {moved[s]}" if s in moved else ""
        logging.warning("%s%s; using step %d instead", e, where, step)
      return step, state, meta
    if unreadable:
      raise CheckpointUnreadableError(
        f"no checkpoint in {self.directory} can be read; the newest: {unreadable[0][1]}"
      )
    return None

  def _set_aside(self, steps: list[int]) -> dict[int, epath.Path]:
    """Moves the step directories `steps` to `<directory>.unreadable/`; {step: new path}."""
    if self.read_only or not steps:
      return {}
    aside = self.path.parent / f"{self.path.name}.unreadable"
    moved = {}
    for step in steps:
      dest, n = aside / str(step), 1
      while dest.exists():
        dest, n = aside / f"{step}.{n}", n + 1
      moved[step] = dest
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step, dest in moved.items():
        self.step_path(step).rename(dest)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("spikeatconv_set_aside_unreadable")
    self.manager.reload()
    return moved

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption notice (False when nothing announced one)."""
    return self.manager.reached_preemption(int(step))

  def wait(self):
    """Blocks until every pending asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _preemption_service() -> bool:
  """Whether JAX's preemption service runs: jax.distributed is initialised with it enabled."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopSignal:
  """When to stop for SIGTERM or a preemption notice: at the same step on every process.

  With jax.distributed initialised, JAX's preemption service owns SIGTERM: its notifier passes
  the notice to the coordination service, and `reached_preemption_sync_point(step)` turns True
  on every process at the same step (one past the furthest step any process had reached when
  the notice came). It needs a call at every step, on every process, which costs nothing until
  a notice arrives. A Python SIGTERM handler would replace JAX's notifier, so none is installed
  then.

  Without jax.distributed (one process) JAX installs no notifier, and SIGTERM would end the
  process. A Python handler then sets a flag and `should_stop` returns it, so the loop saves at
  the next step and returns; nothing is written from inside the handler. The previous handler
  is put back on exit. Handlers can only be installed from the main thread; elsewhere this is
  a flag nothing sets.

  Use as a context manager; call `should_stop(step)` after every step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self.received: int | None = None
    self.stopped_by: str | None = None
    self.uses_preemption_service = False
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.received = signum

  def __enter__(self):
    self.uses_preemption_service = _preemption_service()
    if self.uses_preemption_service:
      return self
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}
    return False

  def should_stop(self, step: int) -> bool:
    """True at the step where every process stops; call it after every step, in order."""
    if self.uses_preemption_service:
      stop = multihost_utils.reached_preemption_sync_point(int(step))
      self.stopped_by = "preemption notice" if stop else None
      return stop
    stop = self.received is not None
    if jax.process_count() > 1:
      # Processes without the preemption service agree here, or the others would wait in
      # the next collective.
      stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
    self.stopped_by = signal.Signals(self.received).name if self.received else None
    if stop and self.stopped_by is None:
      self.stopped_by = "a signal on another process"
    return stop

  def __bool__(self) -> bool:
    return self.received is not None
