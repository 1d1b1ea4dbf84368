"""Firing-rate summaries and evaluation accumulators.

Firing rates come from the sown "spikes" collection (`snn.collect_rates`): one float32 [K, T]
array per SPK site (K LIF branches, T time steps), each the mean spike over batch, positions
and channels. Summaries used in the logs:
- site rate: mean over K and T of the site's [K, T] array (for MBPL that is the mean branch
  rate; the mean spike *count* of DESIGN.md §10 is K times it);
- stage rate: unweighted mean of the site rates whose path starts with that stage ("stem",
  "stage0", ...);
- overall rate: unweighted mean of all site rates.
These are plain means over sites, not weighted by the number of neurons per site.

Their files are written with `spikeatconv_jax.files`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spikeatconv_jax.snn import collect_rates


def site_rates(spikes: Any) -> dict[str, jax.Array]:
  """{"stage1/block0/.../spk_site": [K, T]} from a sown "spikes" collection ({} if none)."""
  if not spikes:
    return {}
  return collect_rates(spikes)


def stage_of(path: str) -> str:
  """The stage a site belongs to: the first component of its path ("stem", "stage2", ...)."""
  return path.split("/", 1)[0]


def summarize_rates(rates: dict[str, Any]) -> dict[str, Any]:
  """{"firing_rate": overall, "firing_rate/<stage>": per stage} (works on jax or numpy)."""
  if not rates:
    return {}
  per_site = {k: jnp.mean(v) for k, v in rates.items()}
  out = {"firing_rate": jnp.mean(jnp.stack(list(per_site.values())))}
  stages: dict[str, list] = {}
  for path, r in per_site.items():
    stages.setdefault(stage_of(path), []).append(r)
  for stage, rs in sorted(stages.items()):
    out[f"firing_rate/{stage}"] = jnp.mean(jnp.stack(rs))
  return out


def rates_table(rates: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """JSON-ready per-site rates: per branch and time step, plus the means of DESIGN.md §10."""
  out = {}
  for path, r in sorted(rates.items()):
    r = np.asarray(r, np.float64)  # [K, T]
    out[path] = {
      "per_branch_per_t": r.tolist(),
      "per_branch": r.mean(axis=1).tolist(),
      "per_t": r.mean(axis=0).tolist(),
      "mean": float(r.mean()),
      "mean_count": float(r.mean(axis=1).sum()),  # sum over branches: spikes per neuron per t
    }
  return out


RATES_NOTE = (
  "Each site's rate is the fraction of its neurons that spike, averaged over positions, "
  "channels and the evaluated images (batches weighted by their valid-example count; the "
  "padded examples of a final partial batch are inside that batch's mean), per LIF branch "
  "k and per time step t ('per_branch_per_t' is [K][T]). 'per_branch' and 'per_t' average "
  "the other axis, 'mean' averages both, 'mean_count' sums the branch rates (the mean "
  "spike count of an MBPL/RL neuron per time step). Rates are per time step: multiply by "
  "T for spikes per image."
)


class EvalAccumulator:
  """Sums the per-batch outputs of `train.step.eval_step` on the host."""

  def __init__(self):
    self.sums: dict[str, Any] | None = None

  def add(self, out: dict[str, Any]):
    out = jax.device_get(out)
    if self.sums is None:
      self.sums = jax.tree.map(lambda x: np.asarray(x, np.float64), out)
    else:
      self.sums = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), self.sums, out)

  def result(self) -> dict[str, Any]:
    """top1, top5, loss, num_examples, rates {site: [K, T]} and their summaries."""
    if self.sums is None or self.sums["count"] == 0:
      raise ValueError("evaluation saw no valid examples")
    n = self.sums["count"]
    rates = {k: v / n for k, v in self.sums["rates"].items()}
    res = {
      "num_examples": int(round(n)),
      "top1": float(self.sums["correct_top1"] / n),
      "top5": float(self.sums["correct_top5"] / n),
      "loss": float(self.sums["loss"] / n),
      "rates": rates,
    }
    res.update({k: float(v) for k, v in summarize_rates(rates).items()})
    return res


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
