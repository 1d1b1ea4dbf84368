r"""Evaluates a checkpoint of a training workdir on a tfds split; prints a table, writes JSON.

  python eval.py --config configs/default.py --workdir runs/default
  python eval.py --config configs/default.py --workdir runs/default --step 2000 \
    --split "test[:1000]" --output /tmp/eval.json

The checkpoint (the latest unless --step) is restored onto the current devices, whatever mesh
it was trained on. The JSON object (keys: step, split, num_examples, top1, top5, loss,
firing_rates, energy_mj_per_image, images_per_s, ...) goes to WORKDIR/eval_<split>_<step>.json
and, with --output, also to that file. --config must describe the same model as the
checkpoint; a different one is an error that lists the differing fields.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from spikeatconv_jax.xla_cpu import malloc  # noqa: E402

malloc.reexec_with_tcmalloc()  # before anything allocates: see spikeatconv_jax/xla_cpu/malloc.py

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spikeatconv_jax.train import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/default.py[:arg].", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "The training workdir, a local path or a URL (its checkpoints/ are read)."
)
flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.DEFINE_string("split", None, "tfds split; default: config.dataset.eval_split.")
flags.DEFINE_string("output", None, "Also write the JSON result to this file.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "See train.py.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (manual multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (manual multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  FLAGS = flags.FLAGS
  cli.start(argv, FLAGS)
  import jax

  from spikeatconv_jax import files
  from spikeatconv_jax.train import evaluate

  try:
    res = evaluate.evaluate_checkpoint(
      _CONFIG.value, FLAGS.workdir, step=FLAGS.step, split=FLAGS.split
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    path = evaluate.result_filename(FLAGS.workdir, res["split"], res["step"])
    files.write_json(path, res)
    if FLAGS.output:
      files.write_json(files.resolve_dir(FLAGS.output), res)
    print(evaluate.table(res))
    print(f"wrote {path}" + (f" and {FLAGS.output}" if FLAGS.output else ""), flush=True)


if __name__ == "__main__":
  cli.run(main)
