r"""Trains a SpikeAtConv config: `spikeatconv_jax.train.loop.train_and_evaluate`.

  python train.py --config configs/default.py --workdir runs/default
  python train.py --config configs/default.py:runlocal=1 --workdir /tmp/run --config.lr=1e-3

The same --workdir resumes from its latest checkpoint. SIGTERM saves a checkpoint and exits 0.

Multi-host: on TPU pods and under SLURM `jax.distributed.initialize()` finds the cluster by
itself (`--distributed=auto`, the default, does it when such an environment is detected); for a
manual launch pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every
process. On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from spikeatconv_jax.xla_cpu import malloc  # noqa: E402

malloc.reexec_with_tcmalloc()  # before anything allocates: see spikeatconv_jax/xla_cpu/malloc.py

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spikeatconv_jax.train import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/default.py[:arg].", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "Output directory, a local path or a URL (gs://...); reused to resume."
)
flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "jax.distributed.initialize(): 'auto' when a cluster environment (TPU pod, SLURM) or the "
  "coordinator flags are present, 'on' always, 'off' never.",
)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (manual multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (manual multi-host).")
flags.DEFINE_string(
  "compilation_cache_dir", None, "Persistent XLA compilation cache directory (optional)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  FLAGS = flags.FLAGS
  cli.start(argv, FLAGS)
  import jax

  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)

  from spikeatconv_jax.train import loop

  try:
    loop.train_and_evaluate(_CONFIG.value, FLAGS.workdir)
  except loop.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except ValueError as e:
    # Bad configs and incompatible checkpoints: one clear message, no traceback.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
