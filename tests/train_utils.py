"""Shared helpers of the training tests: a synthetic Fashion-MNIST and a tiny run config.

The data are written as IDX files and read through the real `fashion_mnist_local` tfds
builder into a temporary data_dir, so the tests (and their subprocesses) use the real input
pipeline without the Debian dataset package. Each class is a bright square at its own place,
so a few steps already move the loss.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_idx(path: str, array: np.ndarray):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(directory: str, n_train: int = 64, n_test: int = 24, seed: int = 0) -> str:
  """Writes {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz with class-coded images."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.RandomState(seed)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.randint(0, 10, n)
    images = rng.randint(0, 60, (n, 28, 28))
    for i, y in enumerate(labels):
      r, c = divmod(int(y), 5)
      images[i, 4 + 10 * r : 12 + 10 * r, 2 + 5 * c : 6 + 5 * c] = 230
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return directory


def tiny_config(root: str, **overrides):
  """configs/default.py:runlocal=1 on the synthetic data in `root`, nano SL at 32 px.

  `overrides` are dotted field names, e.g. {"model.spk.kind": "mbpl", "total_steps": 6}.
  """
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs.default import get_config

  idx = os.path.join(root, "idx")
  if not os.path.exists(os.path.join(idx, "t10k-labels-idx1-ubyte.gz")):
    make_idx_dir(idx)
  c = get_config("runlocal=1")
  c.dataset.data_dir = os.path.join(root, "tfds")
  c.dataset.source_dir = idx
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.image_size = 32
  c.dataset.pp_train = "decode(1)|pad(2)|flip_lr|normalize('fashion_mnist')"
  c.dataset.pp_eval = "decode(1)|pad(2)|normalize('fashion_mnist')"
  c.dataset.shuffle_buffer = 16
  c.dataset.cache = False
  c.model.spk.kind = "sl"
  c.model.spk.thresholds = (1.0,)
  c.model.attention.partition = 4  # nano at 32 px: stage maps 8/4/2/1
  c.batch_size = 8
  c.total_steps = 4
  c.warmup_epochs = 0.25
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 1000  # the final eval only
  c.keep_checkpoints = 5
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def config_flags_for(c, keys) -> list[str]:
  """`--config.k=v` flags reproducing the fields `keys` of `c` on a train.py command line."""
  out = []
  for key in keys:
    node = c
    for p in key.split("."):
      node = node[p]
    value = "+".join(map(str, node)) if isinstance(node, tuple) else node
    out.append(f"--config.{key}={value}")
  return out


CONFIG_FILE = '''"""A tiny test config (written by tests/train_utils.py)."""
import train_utils


def get_config(arg=None):
  return train_utils.tiny_config({root!r}, **{overrides!r})
'''


def write_config_file(root: str, name: str = "tiny_config.py", **overrides) -> str:
  """A config file for train.py/eval.py: `tiny_config(root, **overrides)`; tests/ must be on
  PYTHONPATH (see `subprocess_env`)."""
  path = os.path.join(root, name)
  with open(path, "w") as f:
    f.write(CONFIG_FILE.format(root=root, overrides=overrides))
  return path


def cache_dir() -> str:
  """The persistent XLA compilation cache the training tests share (across processes too)."""
  import tempfile

  return os.environ.get(
    "SPIKEATCONV_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "spikeatconv_jax_xla_cache")
  )


def enable_compile_cache():
  """Every test compiles the same nano programs; the cache makes each compile happen once."""
  import jax

  jax.config.update("jax_compilation_cache_dir", cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def subprocess_env(num_devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir()
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env
