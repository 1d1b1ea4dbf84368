"""Synaptic-operation and energy accounting (DESIGN.md §10).

  E = E_MAC·(layers with real input, run once) + E_MAC·T·(real-input layers at every step)
      + E_AC·T·Σ_l fr_l·FL_l (+ attention products)

FL_l is the dense MAC count of layer l for one image at one time step. The counts are taken
from the real model: `jax.eval_shape(module.init, ...)` runs under `nn.intercept_methods`, which
records every Dense / Conv / DepthwiseConv call (input, kernel and output shapes), every SPK site
and every attention core (q/k/v shapes). Which SPK site feeds a weight layer is declared next to
the code, in each owning module's `ENERGY_SOURCES` (see `spikeatconv_jax.layers.common`).

Counting rules (DESIGN.md §10 table):
  input is the image, or real and computed once (stem) -> MAC, once
  real input at every step (shortcut 1×1, head, GELU/identity, MBPL `dwconv`/`convnext` merge,
    DCL convs) -> MAC × T
  binary SPK output (sl, hsl, dcl) -> AC × T, ops = FL · fr
  integer SPK output (rl; mbpl with `sum` merge) -> AC per bit-plane, ops = FL · Σ_k fr_k
  attention: SISA N²d(fr_Q + fr_V), BDSA 2N²d·fr_S per head and step (AC); real q/k/v or
    softmax -> 2N²d MAC × T.

Firing rates: fr is a site's mean over time steps of its per-step rates (the `collect_rates`
format, {site path: [K, T]}); the energy of an AC layer is E_AC·T·fr·FL, i.e. Σ_t fr_t·FL.
Without measured rates every branch gets DEFAULT_RATE = 1.0 (every synaptic op happens: the
dense upper bound); the report says which source it used.
"""

from __future__ import annotations

import copy
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spikeatconv_jax.layers import common
from spikeatconv_jax.layers.attention import AttentionCore
from spikeatconv_jax.layers.dwconv import DepthwiseConv
from spikeatconv_jax.snn.spk import DEFAULT_THRESHOLDS, SPK

E_MAC_PJ = 4.6  # 45 nm, 32-bit float multiply-accumulate (Horowitz 2014; SDT)
E_AC_PJ = 0.9  # 45 nm, 32-bit float accumulate
DEFAULT_RATE = 1.0  # per LIF branch, when no measured firing rates are given

MAC_ONCE, MAC_T, AC_T, AC_BITPLANE = "MAC", "MAC×T", "AC×T", "AC×T per bit-plane"


def _path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def _trace(model_config: Any, image_size: int) -> dict[str, Any]:
  """Runs eval_shape(init) at T=1, B=1 and records weight layers, SPK sites, attention cores."""
  from spikeatconv_jax import models  # local: models imports layers, energy is a leaf user

  if isinstance(model_config, ml_collections.FrozenConfigDict):
    cfg = ml_collections.ConfigDict(model_config)
  else:
    cfg = copy.deepcopy(model_config)
  if cfg.get("time_mode", "network") != "neuron":
    cfg.timesteps = 1  # dense counts are per step; T enters only as the stated factor
  # Scanned blocks are traced once under a stacked name and rematerialised ones twice; neither
  # changes a layer's shapes or its parameter names, so the count traces every block unrolled
  # and the report reads the same (and matches the sown rates' site names) either way.
  # The portable forms: what is counted is the same in every form, and they trace fastest.
  with cfg.unlocked():
    cfg.scan_blocks = False
    cfg.remat = False
    cfg.kernels = "xla"
  module = models.build(cfg)
  layers, spks, cores = [], {}, []
  # The SPK site that ran last before each module was entered: its input (common.SRC_INPUT).
  last_site, inputs = [common.SRC_REAL], {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    inputs.setdefault(_path(mod), last_site[0])
    out = next_fun(*args, **kwargs)
    if isinstance(mod, SPK):
      n_branch = 0 if mod.kind == "none" else len(mod.thresholds or DEFAULT_THRESHOLDS[mod.kind])
      spks[_path(mod)] = dict(
        kind=mod.kind, merge=mod.mbpl_merge, branches=n_branch, neuron_t=mod.neuron_timesteps
      )
      last_site[0] = _path(mod)
    elif isinstance(mod, nn.Dense | nn.Conv | DepthwiseConv):
      # A branch-summed DepthwiseConv takes its K inputs as a sequence (fan-in counts all K).
      x = args[0][0] if isinstance(args[0], list | tuple) else args[0]
      if isinstance(mod, nn.Dense):
        fan_in, op = x.shape[-1], "linear"
      elif isinstance(mod, nn.Conv):
        k = int(np.prod(mod.kernel_size))
        fan_in = k * x.shape[-1] // mod.feature_group_count
        op = "conv{}x{}".format(*mod.kernel_size)
      else:
        fan_in = mod.kernel_size**2 * mod.sum_branches
        op = f"dwconv{mod.kernel_size}x{mod.kernel_size}"
      layers.append(
        dict(
          name=_path(mod),
          op=op,
          macs=int(np.prod(out.shape)) * int(fan_in),
          parent=mod.parent,
          local=mod.name,
          in_shape=tuple(x.shape),
          out_shape=tuple(out.shape),
        )
      )
    elif isinstance(mod, AttentionCore):
      g, n, h, d = args[0].shape
      cores.append(dict(name=_path(mod), kind=mod.kind, parent=mod.parent, g=g, n=n, h=h, d=d))
    return out

  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: module.init(rngs, images, train=False))
  return dict(layers=layers, spks=spks, cores=cores, inputs=inputs)


def _declared_source(parent: nn.Module, local: str) -> str:
  table = getattr(type(parent), "ENERGY_SOURCES", None)
  if table is None or local not in table:
    raise ValueError(
      f"{type(parent).__name__} declares no energy source for its weight layer {local!r} "
      "(add it to ENERGY_SOURCES)"
    )
  return table[local]


def _resolve(parent: nn.Module, source: str, tr: dict[str, Any]) -> str:
  """A declared source -> an SPK site path or a marker (common.SRC_*)."""
  spks = tr["spks"]
  for option in source.split("|"):
    if option in (common.SRC_IMAGE, common.SRC_REAL_ONCE, common.SRC_REAL):
      return option
    if option == common.SRC_INPUT:
      option = tr["inputs"][_path(parent)]
    elif "/" not in option:
      option = "/".join(parent.scope.path + (option,))
    if option in spks:
      return option
  raise ValueError(f"energy source {source!r} of {_path(parent)} is not an SPK site of this model")


def _site_counting(site: dict[str, Any]) -> str:
  """How a layer fed by this SPK site is counted."""
  kind = site["kind"]
  if kind == "none" or (kind == "mbpl" and site["merge"] != "sum"):
    return MAC_T  # real-valued output
  if kind in ("rl", "mbpl") or site.get("neuron_t", 1) > 1:
    # integer output: one binary plane per LIF branch (and per neuron step, time_mode='neuron')
    return AC_BITPLANE
  return AC_T  # sl, hsl, dcl: strictly binary


def _branch_rates(path: str, rates: dict[str, np.ndarray] | None, k: int) -> np.ndarray:
  """[K] per-branch rates of a site, each the mean over its time steps."""
  if rates is None:
    return np.full((k,), DEFAULT_RATE)
  if path not in rates:
    raise ValueError(f"firing_rates has no entry for SPK site {path!r}")
  arr = np.asarray(rates[path], np.float64)
  if arr.ndim != 2 or arr.shape[0] != k:
    raise ValueError(f"firing_rates[{path!r}] must be [K={k}, T], got shape {arr.shape}")
  return arr.mean(axis=1)


def _site_rate(site: dict[str, Any], path: str, counting: str, rates: Any) -> float:
  """Σ_k fr_k (bit-planes) or the mean over branches (binary, channel-split sites), times the
  per-neuron steps under time_mode='neuron' (n binary planes whose mean the site outputs)."""
  r = _branch_rates(path, rates, site["branches"])
  # RL/MBPL branches each cover every channel (their planes add up); HSL/DCL split channels.
  fr = r.sum() if site["kind"] in ("rl", "mbpl") else r.mean()
  return float(fr) * site.get("neuron_t", 1)


def report(
  model_config: Any, image_size: int, firing_rates: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Per-layer MAC/AC table and energy per image (DESIGN.md §10) as plain data.

  Args:
    model_config: the `config.model` ConfigDict.
    image_size: square input size in pixels.
    firing_rates: {SPK site path: rates [K, T]} as returned by `snn.spk.collect_rates` (averaged
      over an evaluation set); None uses DEFAULT_RATE for every LIF branch.

  Returns:
    dict with "rows" (name, op, dense_macs per step, input, rate, counted_as, ops, energy_pj),
    "dense_gmacs_per_step", "total_energy_mj", "mac_energy_mj", "ac_energy_mj", "timesteps",
    "e_mac_pj", "e_ac_pj" and "notes" (the T factor and the rate source, in words).
  """
  from spikeatconv_jax import models

  models.validate(model_config, image_size)
  t = models.network_timesteps(model_config)
  tr = _trace(model_config, image_size)
  spks = tr["spks"]
  rates = None
  if firing_rates is not None:
    rates = {k: np.asarray(v) for k, v in firing_rates.items()}
  rows = []

  def add(name, op, macs, source, counting, rate, ops_per_step):
    if counting == MAC_ONCE:
      ops, e = macs, E_MAC_PJ * macs
    elif counting == MAC_T:
      ops, e = t * macs, E_MAC_PJ * t * macs
    else:
      ops = t * ops_per_step
      e = E_AC_PJ * ops
    rows.append(
      dict(
        name=name,
        op=op,
        dense_macs=int(macs),
        input=source,
        rate=rate,
        counted_as=counting,
        ops=float(ops),
        energy_pj=float(e),
      )
    )

  for layer in tr["layers"]:
    parent, local, macs = layer["parent"], layer["local"], layer["macs"]
    if isinstance(parent, SPK):
      # Layers inside an SPK block: MBPL merge convs see branch k's spikes; the DCL convs and
      # the ConvNeXt merge's linears see real values.
      site = _path(parent)
      if local == "merge_dw":
        # One grouped conv over the K branches' spikes stacked on channels: each branch's 1/K
        # of the MACs runs at that branch's rate, i.e. macs * mean_k(fr_k) ACs per step.
        fr = float(_branch_rates(site, rates, spks[site]["branches"]).mean())
        fr *= spks[site].get("neuron_t", 1)
        add(layer["name"], layer["op"], macs, f"{site}[all branches]", AC_T, fr, macs * fr)
      else:
        add(layer["name"], layer["op"], macs, f"{site} (real input)", MAC_T, None, None)
      continue
    src = _resolve(parent, _declared_source(parent, local), tr)
    if src in (common.SRC_IMAGE, common.SRC_REAL_ONCE):
      add(layer["name"], layer["op"], macs, src, MAC_ONCE, None, None)
    elif src == common.SRC_REAL:
      add(layer["name"], layer["op"], macs, src, MAC_T, None, None)
    else:
      counting = _site_counting(spks[src])
      if counting == MAC_T:
        add(layer["name"], layer["op"], macs, src, MAC_T, None, None)
      else:
        fr = _site_rate(spks[src], src, counting, rates)
        add(layer["name"], layer["op"], macs, src, counting, fr, macs * fr)

  for core in tr["cores"]:
    parent = core["parent"]
    base = core["g"] * core["h"] * core["n"] ** 2 * core["d"]  # N²d per head, all groups
    dense_macs = 2 * base  # QKᵀ and A·V
    site_of = {n: "/".join(parent.scope.path + (f"spk_{n}",)) for n in ("in", "q", "v")}
    if core["kind"] == "softmax":
      add(core["name"], "softmax attention", dense_macs, "real", MAC_T, None, None)
      continue
    srcs = [site_of["in"]] if core["kind"] == "bdsa" else [site_of["q"], site_of["v"]]
    counting = _site_counting(spks[srcs[0]])
    op = f"{core['kind']} attention"
    if counting == MAC_T:
      add(core["name"], op, dense_macs, "+".join(srcs), MAC_T, None, None)
      continue
    frs = [_site_rate(spks[s], s, counting, rates) for s in srcs]
    # SISA: N²d·fr_Q (QKᵀ) + N²d·fr_V ((A+B)·V); BDSA: 2N²d·fr_S.
    ops = base * sum(frs) if core["kind"] == "sisa" else 2 * base * frs[0]
    add(core["name"], op, dense_macs, "+".join(srcs), counting, float(np.mean(frs)), ops)

  mac_pj = sum(r["energy_pj"] for r in rows if r["counted_as"] in (MAC_ONCE, MAC_T))
  ac_pj = sum(r["energy_pj"] for r in rows if r["counted_as"] in (AC_T, AC_BITPLANE))
  dense = sum(r["dense_macs"] for r in rows)
  rate_note = (
    "firing rates: measured (given), each site's per-step rates averaged over its T steps"
    if rates is not None
    else f"firing rates: none given; every LIF branch assumed to fire at the neutral default "
    f"DEFAULT_RATE={DEFAULT_RATE} (all synaptic ops happen: an upper bound, not a measurement)"
  )
  notes = [
    f"T={t}: 'MAC' rows are counted once per image (static input before the broadcast over T); "
    f"'MAC×T' and 'AC×T' rows are counted at each of the T={t} steps (ops include the factor T; "
    "rates are per step, not summed over T).",
    "dense_macs is per image and per time step; dense_gmacs_per_step sums every weight layer "
    "and the attention products (QKᵀ, A·V) of one step.",
    rate_note,
    f"E_MAC={E_MAC_PJ} pJ, E_AC={E_AC_PJ} pJ (45 nm); BN folds into weights, pooling is free.",
  ]
  if model_config.get("time_mode", "network") == "neuron":
    notes.append(
      f"time_mode='neuron': the network runs at T=1 and each SPK averages "
      f"{int(model_config.timesteps)} LIF steps of a repeated input; a layer it feeds is "
      "counted as that many binary planes (AC ops = FL x fr x steps)."
    )
  return dict(
    model=dict(
      name=model_config.get("name", "spikeatconv"),
      variant=model_config.get("variant", None),
      spk=model_config.spk.kind,
      attention=model_config.attention.kind if "attention" in model_config else None,
      image_size=image_size,
    ),
    rows=rows,
    timesteps=t,
    dense_gmacs_per_step=dense / 1e9,
    total_energy_mj=(mac_pj + ac_pj) * 1e-9,
    mac_energy_mj=mac_pj * 1e-9,
    ac_energy_mj=ac_pj * 1e-9,
    e_mac_pj=E_MAC_PJ,
    e_ac_pj=E_AC_PJ,
    rates_measured=rates is not None,
    notes=notes,
  )


def format_report(rep: dict[str, Any], max_rows: int | None = None) -> str:
  """The report as a readable text table."""
  m = rep["model"]
  lines = [
    f"energy report: {m['name']} {m['variant'] or ''} spk={m['spk']} "
    f"attention={m['attention']} {m['image_size']}px T={rep['timesteps']}",
    f"{'layer':<48} {'op':<18} {'dense MMAC':>10} {'rate':>6} {'counted as':<19} {'pJ':>12}",
  ]
  rows = rep["rows"] if max_rows is None else rep["rows"][:max_rows]
  for r in rows:
    rate = "-" if r["rate"] is None else f"{r['rate']:.3f}"
    lines.append(
      f"{r['name'][-48:]:<48} {r['op']:<18} {r['dense_macs'] / 1e6:>10.3f} {rate:>6} "
      f"{r['counted_as']:<19} {r['energy_pj']:>12.4g}"
    )
  if max_rows is not None and len(rep["rows"]) > max_rows:
    lines.append(f"... {len(rep['rows']) - max_rows} more rows")
  lines.append(
    f"dense GMACs per step: {rep['dense_gmacs_per_step']:.3f}   energy per image: "
    f"{rep['total_energy_mj']:.4f} mJ (MAC {rep['mac_energy_mj']:.4f} + AC "
    f"{rep['ac_energy_mj']:.4f})"
  )
  lines += [f"note: {n}" for n in rep["notes"]]
  return "\n".join(lines)
