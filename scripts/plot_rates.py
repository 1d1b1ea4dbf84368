r"""Firing rate per SPK site, in network order, as a bar chart PNG.

  python scripts/plot_rates.py runs/default/final_metrics.json --out docs/figures/rates.png
  python scripts/plot_rates.py runs/default/eval_test_1872.json --out /tmp/rates.png

Reads the "firing_rates" table of an eval.py JSON or of a workdir's final_metrics.json
(per site: "per_branch", the rate of each LIF branch averaged over time steps). One bar per
site, or per branch where a site has several (MBPL's K thresholds, RL, HSL, DCL), with each
site's mean rate marked; the stem and the stages are shaded and labelled. Sites are ordered as
the forward pass calls them (`site_key`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# The order in which a block part calls its SPK sites (layers/convnext.py, layers/attention.py,
# models/resnet.py); names not listed sort after these, by name.
PART_ORDER = ("conv", "block_attn", "block_ffn", "grid_attn", "grid_ffn")
SITE_ORDER = {
  "act1": 0,
  "spk_in": 1,
  "spk_q": 2,
  "spk_dw": 2,
  "spk_k": 3,
  "spk_fc1": 3,
  "spk_v": 4,
  "spk_hidden": 5,
  "spk_out": 6,
  "spk": 7,
}


def _stage_rank(name: str) -> int:
  if name == "stem":
    return -1
  m = re.fullmatch(r"stage(\d+)", name)
  return int(m.group(1)) if m else 1_000


def site_key(site: str) -> tuple:
  """A sort key putting SPK site paths in the order of the forward pass."""
  key = []
  for i, part in enumerate(site.split("/")):
    m = re.fullmatch(r"block(\d+)", part)
    if i == 0:
      key.append((_stage_rank(part), 0, part))
    elif m:
      key.append((int(m.group(1)), 0, part))
    elif part in PART_ORDER:
      key.append((PART_ORDER.index(part), 0, part))
    else:
      key.append((SITE_ORDER.get(part, len(SITE_ORDER)), 1, part))
  return tuple(key)


def read_rates(path: str) -> tuple[dict[str, list[float]], dict]:
  """({site: per-branch rates}, the JSON) in network order; a clear error for other files."""
  with open(path) as f:
    res = json.load(f)
  table = res.get("firing_rates") if isinstance(res, dict) else None
  if table is None:
    raise ValueError(
      f"{path} has no 'firing_rates': give an eval.py JSON or a workdir's final_metrics.json"
    )
  if not table:
    raise ValueError(f"{path} has no SPK sites (a spike-free model): nothing to plot")
  return {s: list(table[s]["per_branch"]) for s in sorted(table, key=site_key)}, res


def _title(res: dict, path: str) -> str:
  ev = res.get("eval", res)
  parts = [res.get("model", ""), f"step {res['step']}" if "step" in res else ""]
  if "split" in ev and "top1" in ev:
    parts.append(f"{ev['split']} top-1 {100 * ev['top1']:.2f} %")
  if ev.get("firing_rate") is not None:
    parts.append(f"mean rate {ev['firing_rate']:.4f}")
  return " | ".join(p for p in parts if p) or path


def plot(path: str, out: str, title: str | None = None) -> None:
  rates, res = read_rates(path)
  sites = list(rates)
  k_max = max(len(r) for r in rates.values())
  width = 0.8 / k_max
  fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(sites) + 2), 5.2))
  branch_colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, k_max))
  labelled = set()
  for x, site in enumerate(sites):
    r = rates[site]
    for k, v in enumerate(r):
      offset = (k - (len(r) - 1) / 2) * width
      label = None if k in labelled or k_max == 1 else f"LIF branch {k + 1}"
      labelled.add(k)
      ax.bar(x + offset, v, width * 0.95, color=branch_colors[k], label=label)
    ax.plot([x - 0.42, x + 0.42], [np.mean(r)] * 2, color="black", lw=1.2,
            label="site mean" if x == 0 else None)  # fmt: skip

  # Stages: shaded spans with their names on top.
  stages = [s.split("/", 1)[0] for s in sites]
  top = max(max(r) for r in rates.values()) * 1.15 or 1.0
  start = 0
  for i in range(1, len(sites) + 1):
    if i == len(sites) or stages[i] != stages[start]:
      if len({*stages[:start]}) % 2 == 0:
        ax.axvspan(start - 0.5, i - 0.5, color="0.93", zorder=0)
      ax.axvline(start - 0.5, color="0.5", lw=0.8, ls="--")
      ax.text((start + i - 1) / 2, top * 0.98, stages[start], ha="center", va="top", fontsize=10,
              fontweight="bold")  # fmt: skip
      start = i
  ax.set_xlim(-0.6, len(sites) - 0.4)
  ax.set_ylim(0, top)
  ax.set_xticks(range(len(sites)))
  ax.set_xticklabels([s.split("/", 1)[1] if "/" in s else s for s in sites], rotation=90,
                     fontsize=7)  # fmt: skip
  ax.set_ylabel("firing rate (spikes per neuron per time step)")
  ax.set_title(title or _title(res, path), fontsize=10)
  ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.9), ncol=1 + k_max // 3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("json", help="eval.py JSON or a workdir's final_metrics.json")
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("--title", default=None, help="default: model, step, top-1, mean rate")
  args = p.parse_args(argv)
  try:
    plot(args.json, args.out, args.title)
  except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
