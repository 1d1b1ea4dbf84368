r"""Lists the presets of a paper table and runs them in turn.

  python scripts/run_presets.py --table 1 --list
  python scripts/run_presets.py --table 1 --data_dir /data/tfds --workdir_root runs/table1
  python scripts/run_presets.py --table 4 --data_dir /data/tfds --workdir_root runs/table4 \
    -- --config.grad_accum_steps=4

Tables 1-2 are the CIFAR-100 ResNet-18 ablations (configs/cifar100_resnet18.py); tables 3-4
are the ImageNet-1K runs (configs/imagenet.py). Each preset trains in its own workdir, so an
interrupted sweep resumes each run where it stopped when started again. Arguments after `--`
are passed to every train.py call.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import cifar100_resnet18, imagenet  # noqa: E402


def table_runs(table: int) -> list[tuple[str, str, str]]:
  """(run name, config path with its string, paper top-1 or '') for every row of `table`."""
  if table in (1, 2):
    return [
      (
        name,
        f"configs/cifar100_resnet18.py:preset={name}",
        str(cifar100_resnet18.PRESETS[name]["paper_top1"]),
      )
      for name in cifar100_resnet18.presets_of_table(table)
    ]
  if table == 3:
    return [(n, f"configs/imagenet.py:{s}", "") for n, s in imagenet.TABLES[3].items()]
  if table == 4:
    runs = [
      (n, f"configs/imagenet.py:{s}", str(top1)) for n, (s, top1, _) in imagenet.TABLES[4].items()
    ]
    return runs + [(n, f"configs/imagenet.py:{s}", "") for n, s in imagenet.BDSA.items()]
  raise SystemExit(
    f"unknown table {table}; the paper's tables are 1, 2 (CIFAR-100), 3, 4 (ImageNet)"
  )


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1 :]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--table", type=int, required=True)
  p.add_argument("--list", action="store_true", help="only list the runs")
  p.add_argument("--data_dir", help="tfds data dir holding the prepared dataset")
  p.add_argument("--workdir_root", default="runs")
  p.add_argument("--only", nargs="*", help="run only these run names")
  args = p.parse_args(argv)

  runs = table_runs(args.table)
  print(f"{'run':<18} {'paper top-1':>11}  config")
  for name, cfg, top1 in runs:
    print(f"{name:<18} {top1:>11}  {cfg}")
  if args.list:
    return 0
  if not args.data_dir:
    p.error("--data_dir is required to run (the tfds directory with the prepared dataset)")
  for name, cfg, _ in runs:
    if args.only and name not in args.only:
      continue
    cmd = [
      sys.executable,
      str(ROOT / "train.py"),
      f"--config={ROOT / cfg}",
      f"--workdir={os.path.join(args.workdir_root, name)}",
      f"--config.dataset.data_dir={args.data_dir}",
      *extra,
    ]
    print("\n$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
      print(f"run {name} failed with exit code {rc}; stopping the sweep", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
