r"""Energy table of a paper model from the firing rates measured on a trained (smaller) model.

  .venv/bin/python scripts/energy_table.py --rates runs/default/final_metrics.json \
    --config configs/imagenet.py:variant=base --image-size 224

The rates file is a training run's final_metrics.json or an eval.py result JSON (both hold
"firing_rates": {site: {"per_branch_per_t": [K][T], ...}}). Every SPK site of the target model is
matched to the measured site with the same role: the same path once block indices are dropped
("stage2/block7/conv/spk_fc1" takes the rates of "stage2/block0/conv/spk_fc1"). So a block of
a stage is assumed to fire like the measured model's first block of that stage, at the same
position in the block. Rates averaged over time steps are repeated when T differs. A target site
with no measured counterpart, or a different number of LIF branches, is an error.

Prints the per-layer table (energy.format_report), a per-stage summary, and ONE JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spikeatconv_jax import energy  # noqa: E402


def load_config(spec: str):
  """`configs/x.py[:arg]` -> the config's get_config(arg)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("target_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def role(site: str) -> str:
  return re.sub(r"block\d+", "block", site)


def measured_rates(path: str) -> dict[str, np.ndarray]:
  """{site: [K, T] rates} from a final_metrics.json / eval JSON."""
  with open(path) as f:
    data = json.load(f)
  table = data.get("firing_rates")
  if not table:
    raise ValueError(f"{path} has no 'firing_rates' table (a final_metrics.json or eval JSON)")
  return {site: np.asarray(v["per_branch_per_t"], np.float64) for site, v in table.items()}


def transfer(measured: dict[str, np.ndarray], targets: dict[str, int], t: int) -> dict:
  """Rates [K, t] for every target site {path: K} from the measured site of the same role."""
  by_role = collections.defaultdict(list)
  for site, r in sorted(measured.items()):
    by_role[role(site)].append((site, r))
  out = {}
  for site, k in targets.items():
    found = by_role.get(role(site))
    if not found:
      raise ValueError(f"no measured site with the role of {site!r} ({role(site)!r})")
    source, r = found[0]  # the first block of the stage
    if r.shape[0] != k:
      raise ValueError(f"{site!r} has K={k} branches, the measured {source!r} has {r.shape[0]}")
    out[site] = r if r.shape[1] == t else np.repeat(r.mean(axis=1, keepdims=True), t, axis=1)
  return out


def target_sites(model_config, image_size: int) -> dict[str, int]:
  """{SPK site path: K branches} of the target model (traced by energy.report's tracer)."""
  spks = energy._trace(model_config, image_size)["spks"]
  return {path: site["branches"] for path, site in spks.items() if site["branches"]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rates", default="runs/default/final_metrics.json")
  ap.add_argument("--config", default="configs/imagenet.py:variant=base")
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--rows", type=int, default=None, help="print only the first N layer rows")
  ap.add_argument(
    "--set", action="append", default=[], metavar="FIELD=VALUE",
    help="override a config field, e.g. model.spk.mbpl_merge=sum (repeatable)",
  )  # fmt: skip
  args = ap.parse_args(argv)

  config = load_config(args.config)
  for item in args.set:
    field, _, value = item.partition("=")
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = type(node[leaf])(value)
  measured = measured_rates(args.rates)
  sites = target_sites(config.model, args.image_size)
  rates = transfer(measured, sites, int(config.model.timesteps))
  rep = energy.report(config.model, args.image_size, firing_rates=rates)
  print(energy.format_report(rep, max_rows=args.rows))

  per_stage = collections.defaultdict(float)
  for r in rep["rows"]:
    per_stage[r["name"].split("/")[0]] += r["energy_pj"] / 1e9
  print("\nenergy per image by top-level module (mJ):")
  for name, mj in per_stage.items():
    print(f"  {name:<12} {mj:10.4f}")
  mean_rate = float(np.mean([r.mean() for r in rates.values()]))
  print(
    json.dumps(
      {
        "script": "energy_table",
        "config": args.config,
        "overrides": args.set,
        "image_size": args.image_size,
        "rates_from": args.rates,
        "sites": len(rates),
        "mean_branch_rate": mean_rate,
        "dense_gmacs_per_step": rep["dense_gmacs_per_step"],
        "total_energy_mj": rep["total_energy_mj"],
        "mac_energy_mj": rep["mac_energy_mj"],
        "ac_energy_mj": rep["ac_energy_mj"],
        "per_module_mj": per_stage,
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
