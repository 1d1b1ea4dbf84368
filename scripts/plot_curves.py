r"""Training/validation loss and accuracy curves of one or more workdirs, as a PNG.

  python scripts/plot_curves.py runs/default runs/default_ann --labels spiking,spike-free \
    --out docs/fmnist_curves.png

Reads each workdir's metrics.jsonl: train rows carry "loss" and "accuracy", eval rows
"eval/loss" and "eval/top1" (both keyed by "step"). The paper's Figure 4 is such a picture
(spiking vs spike-free).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = {
  "train loss": "loss",
  "eval loss": "eval/loss",
  "train accuracy": "accuracy",
  "eval top-1": "eval/top1",
}


def read_curves(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """{series name: (steps, values)} from `workdir`/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
  out = {name: ([], []) for name in SERIES}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      for name, key in SERIES.items():
        if key in row:
          out[name][0].append(int(row["step"]))
          out[name][1].append(float(row[key]))
  return out


def plot(workdirs: list[str], labels: list[str], out: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (workdir, label) in enumerate(zip(workdirs, labels)):
    curves = read_curves(workdir)
    for name, (steps, values) in curves.items():
      if not steps:
        continue
      ax = axes[0] if "loss" in name else axes[1]
      style = dict(linestyle="--", alpha=0.7) if name.startswith("train") else dict(marker="o")
      ax.plot(steps, values, color=colors[i % len(colors)], label=f"{label}: {name}", **style)
  for ax, title in zip(axes, ("loss", "accuracy")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--labels", help="comma-separated, one per workdir (default: the paths)")
  p.add_argument("--out", default="curves.png")
  args = p.parse_args(argv)
  labels = args.labels.split(",") if args.labels else args.workdirs
  if len(labels) != len(args.workdirs):
    p.error(f"{len(labels)} labels for {len(args.workdirs)} workdirs")
  plot(args.workdirs, labels, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
