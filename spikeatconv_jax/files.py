"""Workdir files for local paths and URLs alike.

Everything the loop, checkpointing and evaluation write outside Orbax goes through `tf.io.gfile`
(as TensorBoard's event files do), so a workdir may be a URL such as gs://bucket/run as well as a
local path. `resolve_dir` makes only local paths absolute (`os.path.abspath` would turn
"gs://b/run" into "<cwd>/gs:/b/run").
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Any

import numpy as np


def _gfile():
  import tensorflow as tf  # local: the data pipeline loads it anyway; keeps this module light

  return tf.io.gfile


def is_url(path: str) -> bool:
  return "://" in str(path)


def resolve_dir(path: Any) -> str:
  """A directory as a string: a URL (gs://...) as given, a local path made absolute."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(directory: Any, *names: str) -> str:
  """`directory`/names..., for local paths and URLs alike."""
  return posixpath.join(os.fspath(directory), *names)


def makedirs(directory: Any):
  _gfile().makedirs(os.fspath(directory))


def exists(path: Any) -> bool:
  return _gfile().exists(os.fspath(path))


def read_text(path: Any) -> str:
  with _gfile().GFile(os.fspath(path), "r") as f:
    return f.read()


class JsonlWriter:
  """Appends one JSON object per line to `path` (process 0 only; others write nothing).

  Object stores (gs://...) have no append: there the file is rewritten whole, from the rows
  it held when the writer first wrote (a resumed run continues the same file) plus the new ones.
  """

  def __init__(self, path: str, enabled: bool = True):
    self.path = os.fspath(path)
    self.enabled = enabled
    self._text: str | None = None  # the whole file, kept for URLs only

  def write(self, step: int, values: dict[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _jsonable(v) for k, v in values.items()})
    line = json.dumps(row) + "\n"
    gfile = _gfile()
    if not is_url(self.path):
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "a") as f:
        f.write(line)
      return
    if self._text is None:
      gfile.makedirs(posixpath.dirname(self.path))
      self._text = read_text(self.path) if gfile.exists(self.path) else ""
    self._text += line
    _write_text(self.path, self._text)


def _jsonable(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def write_json(path: Any, obj: Any):
  """Writes `obj` as indented JSON (to a temporary name, then renamed), making its directory."""
  path = os.fspath(path)
  _gfile().makedirs(posixpath.dirname(path) or ".")
  _write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _write_text(path: str, text: str):
  """Writes a whole file under a temporary name, then renames it: readers never see a part."""
  gfile, tmp = _gfile(), f"{path}.tmp"
  with gfile.GFile(tmp, "w") as f:
    f.write(text)
  gfile.rename(tmp, path, overwrite=True)
