r"""Writes a checkpoint's variables, config and class names to one portable file.

  python scripts/export.py --workdir runs/default --out runs/default/model.msgpack
  python scripts/export.py --workdir runs/default --step 936 --out /tmp/model_936.msgpack

The file is one msgpack map (see spikeatconv_jax/export.py) that loads without Orbax:

  from spikeatconv_jax import export
  model, variables, config, step = export.load_file("model.msgpack")
  logits = model.apply(variables, images, train=False)

predict.py and `spikeatconv_jax.load` take such a file in place of a workdir.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir or checkpoints/<step>")
  p.add_argument("--step", type=int, default=None, help="checkpoint step; default: the latest")
  p.add_argument("--out", required=True, help="the file to write (e.g. model.msgpack)")
  args = p.parse_args(argv)

  import jax
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  from spikeatconv_jax import export, inference

  try:
    loaded = inference.load(args.workdir, args.step)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  size = export.export(args.out, loaded)
  n = sum(int(x.size) for x in jax.tree.leaves(loaded.variables))
  print(f"wrote {args.out}: step {loaded.step}, {n:,} numbers, {size / 2**20:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
