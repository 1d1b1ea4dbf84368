"""Model throughput: forward and train-step images/s, compile time and memory, per setting.

  .venv/bin/python benchmarks/model.py --variant nano --timesteps 1,2 --batch 8
  .venv/bin/python benchmarks/model.py --variant tiny --timesteps 1,2 --batch 8 --repeats 3

Settings: every combination of --timesteps and --nets ("mbpl/sisa" = spiking MBPL + SISA with
the paper's dwconv merge, "mbpl:sum/sisa" = with the sum merge, "none/softmax" = the spike-free
net). Image size and partition default per variant: nano 32 px
with P=4 (stage maps 8/4/2/1), tiny/base/large 224 px with P=7.

Per setting: the jitted forward (train=False) and train step (forward + backward + optax.adamw,
train=True with drop-path and BN updates) are lowered and compiled (timed separately), warmed up
once, then timed `--repeats` times; images/s uses the median. Memory is XLA's compiled
`memory_analysis()`: arguments + outputs + temporaries (a peak estimate; aliasing not subtracted).

--interleave compiles every setting first and then times them round-robin (one forward and one
train step of each setting per round), so slow phases of a shared machine hit every setting
alike: use it for ratios between settings (spiking vs spike-free, T=2 vs T=1).

--compile-only builds the parameters abstractly and only lowers and compiles the train step
(the compile-time targets for base and large: `--variant base --timesteps 1 --nets mbpl/sisa
--compile-only`); the row then holds train_lower_s, train_compile_s and the optimized HLO's
instruction count.

--train-only skips the forward (train=False) program: only the train step is compiled and timed.

--profile-top N profiles one more train step (jax.profiler, perfetto trace in a temp dir) and
lists the N ops with the most time: on a GPU/TPU the kernels on the device's tracks, summed by
HLO op; on CPU the XLA ops on the host threads. It also sums every custom call per target (on
CPU: the native depthwise kernels, forward / input gradient / kernel gradient).

--mfu adds model FLOPs utilisation: dense train FLOPs per image (3 x 2 x dense MACs per step x T,
energy.report's count) times train images/s, over the peak matmul rate measured in the same run
(--peak-tflops gives one instead, e.g. a GPU's spec-sheet bf16 rate). On GPU/TPU the row also
holds the device's peak memory in use (allocator statistics). The dense FLOPs are also split by
layer op (linear, dwconv7x7, ...); with --profile-top on CPU the row then gives the native
depthwise kernels' rate inside the step (the model's 7x7 depthwise FLOPs over those kernels'
time), which bounds how close the spiking step can come to the spike-free one.

Prints a readable table and then ONE JSON line.
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spikeatconv_jax.xla_cpu import malloc  # noqa: E402

if __name__ == "__main__":  # not on import (tests import this file)
  malloc.reexec_with_tcmalloc()  # what train.py runs under (SPIKEATCONV_TCMALLOC=0: glibc)

import jax  # noqa: E402
import optax  # noqa: E402

from configs.common import model_config  # noqa: E402
from spikeatconv_jax import models  # noqa: E402
from spikeatconv_jax.xla_cpu import dwconv as cpu_dwconv  # noqa: E402
from spikeatconv_jax.xla_cpu import native  # noqa: E402

DEFAULT_SIZE = {"nano": (32, 4), "tiny": (224, 7), "base": (224, 7), "large": (224, 7)}


def _mem_mb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return total / 2**20
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def _time(fn, repeats: int, reduce=statistics.median) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return reduce(times)


@functools.cache
def matmul_peak_tflops(dtype: str, n: int | None = None, repeats: int = 15) -> float:
  """The backend's measured dense matmul rate (TFLOP/s) in `dtype`: an n x n x n product, the
  fastest of `repeats` runs (a peak: a slower run only shows interference). Measured once per
  invocation and shared by every row, so the rows' MFUs are comparable."""
  n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(dtype)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(a, a))
  return 2 * n**3 / _time(lambda: mm(a, a), repeats, reduce=min) / 1e12


def train_flops_by_layer(cfg, size: int) -> list[tuple[str, float]]:
  """Dense train FLOPs per image of each weight layer and attention product, as (op, FLOPs)
  with op "linear", "dwconv7x7", "sisa attention", ...: 3 x (forward: 2 x dense MACs per step
  x T), the usual forward + 2x backward estimate (energy.report's count, DESIGN.md §7);
  elementwise, norm and LIF work is not counted."""
  from spikeatconv_jax import energy

  t = int(cfg.timesteps)
  return [(row["op"], 3 * 2 * row["dense_macs"] * t) for row in energy.report(cfg, size)["rows"]]


def flops_by_op(layers: list[tuple[str, float]]) -> dict[str, float]:
  """`train_flops_by_layer`'s rows summed per op."""
  by_op: dict[str, float] = {}
  for op, flops in layers:
    by_op[op] = by_op.get(op, 0.0) + flops
  return by_op


def custom_call_targets(hlo_text: str) -> dict[str, str]:
  """{op name: custom_call_target} for every custom call in a compiled HLO module's text."""
  pattern = r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?custom-call\([^\n]*?custom_call_target="([^"]+)"'
  return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo_text, re.M)}


def _peak_device_mb() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def top_ops(events: list[dict], top: int, targets: dict[str, str] | None = None) -> dict:
  """Time per op from a profiler trace's events (Chrome/perfetto JSON): complete ("X") events
  that name an HLO op (an `hlo_op` argument; if none does, every event but the Python frames,
  named "$..."), summed per op. On the accelerator's tracks when there are any (process names
  with "GPU", "TPU" or "/device:"), else on all tracks (XLA:CPU runs its ops on host threads).

  Returns {"tracks": "device"|"all", "total_ms", "ops": [[name, ms, count], ...] (the `top`
  most expensive), "kinds": the same per op kind (the name without its numeric suffix),
  "custom_calls": the same per custom-call target, for the ops `targets` ({op name: target},
  `custom_call_targets` of the compiled module) names}.
  """
  names = {
    e.get("pid"): str(e.get("args", {}).get("name", ""))
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  device = {p for p, n in names.items() if any(k in n for k in ("GPU", "TPU", "/device:"))}
  done = [e for e in events if e.get("ph") == "X" and "dur" in e]
  if device:
    done = [e for e in done if e.get("pid") in device]
  ops = [e for e in done if (e.get("args") or {}).get("hlo_op")]
  done = ops or [e for e in done if not str(e.get("name", "")).startswith("$")]
  agg: dict[str, list] = {}
  for e in done:
    name = str((e.get("args") or {}).get("hlo_op") or e.get("name", "?"))
    row = agg.setdefault(name, [0.0, 0])
    row[0] += e["dur"] / 1e3
    row[1] += 1
  kinds: dict[str, list] = {}  # "fusion.12", "fusion.40" -> "fusion"
  for name, (ms, n) in agg.items():
    row = kinds.setdefault(re.sub(r"[._]\d+$", "", name), [0.0, 0])
    row[0] += ms
    row[1] += n

  calls: dict[str, list] = {}  # every target, however many: their totals are what matter
  for name, (ms, n) in agg.items():
    if targets and name in targets:
      row = calls.setdefault(targets[name], [0.0, 0])
      row[0] += ms
      row[1] += n

  def ranked(d, n=top):
    return [[k, round(v[0], 3), v[1]] for k, v in sorted(d.items(), key=lambda kv: -kv[1][0])][:n]

  return dict(
    tracks="device" if device else "all",
    total_ms=sum(v[0] for v in agg.values()),
    ops=ranked(agg),
    kinds=ranked(kinds),
    custom_calls=ranked(calls, None),
  )


def profile_step(fn, top: int, targets: dict[str, str] | None = None) -> dict:
  """Runs `fn` once under jax.profiler (perfetto trace in a temp dir) and returns `top_ops`."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(fn())
    (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return top_ops(events, top, targets)


def prepare_setting(args, t: int, net: str) -> tuple[dict, dict]:
  """Builds, compiles and warms up one setting. Returns its row (settings, compile times,
  memory) and {"fwd": fn, "train": fn} to time (empty with --compile-only)."""
  spk, att = net.split("/")
  spk, _, merge = spk.partition(":")  # e.g. "mbpl:sum/sisa": MBPL with the sum merge
  size, p = DEFAULT_SIZE[args.variant]
  size = args.image_size or size
  cfg = model_config(
    variant=args.variant, spk=spk, attention=att, num_classes=args.classes, timesteps=t
  )
  cfg.attention.partition = args.partition or p
  if merge:
    cfg.spk.mbpl_merge = merge
  cfg.dtype = args.dtype
  cfg.remat = args.remat
  cfg.scan_blocks = args.scan_blocks
  models.validate(cfg, size)
  model = models.build(cfg)
  b = args.batch
  images = jax.random.normal(jax.random.PRNGKey(0), (b, size, size, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (b,), 0, args.classes)
  # An rbg key: the jitted init (a full forward plus every initializer) compiles ~2x faster than
  # with threefry, and the parameter values do not affect throughput.
  init_key = jax.random.key(2, impl="unsafe_rbg")
  tx = optax.adamw(1e-3, weight_decay=0.05)
  if args.compile_only:  # shapes only: nothing is initialised or run
    images, labels = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (images, labels))
    variables = jax.eval_shape(lambda x: model.init(init_key, x, train=False), images)
    opt_state = jax.eval_shape(tx.init, variables["params"])
  else:
    variables = jax.jit(lambda x: model.init(init_key, x, train=False))(images)
    opt_state = tx.init(variables["params"])
  params, stats = variables["params"], variables.get("batch_stats", {})

  def forward(params, stats, x):
    return model.apply({"params": params, "batch_stats": stats}, x, train=False)

  def train_step(params, stats, opt_state, x, y, rng):
    def loss_fn(p):
      logits, mut = model.apply(
        {"params": p, "batch_stats": stats},
        x,
        train=True,
        rngs={"dropout": rng},
        mutable=["batch_stats", "spikes"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, mut["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  out = dict(
    variant=args.variant,
    net=net,
    timesteps=t,
    image_size=size,
    partition=cfg.attention.partition,
    batch=b,
    dtype=args.dtype,
    remat=args.remat,
    scan_blocks=args.scan_blocks,
    kernels=model.cfg.kernels,
    dwconv=cpu_dwconv.implementation() if model.cfg.kernels == "xla_cpu" else "lax_taps",
  )
  rng = jax.random.PRNGKey(3)
  if args.compile_only:
    t0 = time.perf_counter()
    lowered = jax.jit(train_step).lower(params, stats, opt_state, images, labels, rng)
    out["train_lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step = lowered.compile()
    out["train_compile_s"] = time.perf_counter() - t0
    out["train_mem_mb"] = _mem_mb(step)
    hlo = step.as_text().splitlines()
    out["hlo_instructions"] = sum(1 for ln in hlo if " = " in ln and not ln.startswith("HloModule"))
    out.update(fwd_img_s=None, fwd_compile_s=None, fwd_mem_mb=None, train_img_s=None)
    return out, {}
  fns = {}
  if args.train_only:
    out.update(fwd_img_s=None, fwd_compile_s=None, fwd_mem_mb=None)
  else:
    t0 = time.perf_counter()
    fwd = jax.jit(forward).lower(params, stats, images).compile()
    out["fwd_compile_s"] = time.perf_counter() - t0
    out["fwd_mem_mb"] = _mem_mb(fwd)
    jax.block_until_ready(fwd(params, stats, images))
    fns["fwd"] = lambda: fwd(params, stats, images)

  t0 = time.perf_counter()
  step = jax.jit(train_step).lower(params, stats, opt_state, images, labels, rng).compile()
  out["train_compile_s"] = time.perf_counter() - t0
  out["train_mem_mb"] = _mem_mb(step)
  print(
    f"compiled {net} T={t}: train step {out['train_compile_s']:.1f} s, "
    f"{out['train_mem_mb'] or 0:.0f} MB (XLA's estimate)",
    file=sys.stderr,
    flush=True,
  )
  jax.block_until_ready(step(params, stats, opt_state, images, labels, rng))
  if args.mfu:
    layers = train_flops_by_layer(cfg, size)
    by_op = {op: flops / 1e12 for op, flops in flops_by_op(layers).items()}
    out["train_tflops_per_image"] = sum(by_op.values())
    out["train_tflops_per_image_by_op"] = by_op
    out["dwconv7x7_layers"] = sum(op == "dwconv7x7" for op, _ in layers)

  def train():
    return step(params, stats, opt_state, images, labels, rng)

  if getattr(args, "profile_top", 0):  # for the profile's per-target custom-call times
    train.custom_call_targets = custom_call_targets(step.as_text())
  fns["train"] = train
  return out, fns


def measure(args, settings: list[tuple[dict, dict]]) -> list[dict]:
  """Times each setting's forward and train step `--repeats` times (round-robin over the
  settings with --interleave, else one setting after another) and fills in the rows."""
  samples = [{kind: [] for kind in fns} for _, fns in settings]
  if args.interleave:
    for _ in range(args.repeats):
      for (_, fns), got in zip(settings, samples, strict=True):
        for kind, fn in fns.items():
          got[kind].append(_time(fn, 1))
  else:
    for (_, fns), got in zip(settings, samples, strict=True):
      for kind, fn in fns.items():
        got[kind] = _time(fn, args.repeats, reduce=list)
  rows = []
  for (out, fns), got in zip(settings, samples, strict=True):
    if fns:
      b = out["batch"]
      if "fwd" in got:
        out["fwd_img_s"] = b / statistics.median(got["fwd"])
      out["train_img_s"] = b / statistics.median(got["train"])
      out["train_step_s"] = [round(v, 4) for v in got["train"]]
      out["device_peak_mb"] = _peak_device_mb()  # None on CPU (no allocator statistics)
      if getattr(args, "profile_top", 0):
        try:
          targets = getattr(fns["train"], "custom_call_targets", None)
          out["train_profile"] = profile_step(fns["train"], args.profile_top, targets)
        except Exception as e:  # noqa: BLE001 - e.g. no CUPTI: keep the timings, say why
          out["train_profile_error"] = f"{type(e).__name__}: {e}"
          print(f"profiling failed: {out['train_profile_error']}", file=sys.stderr, flush=True)
      if args.mfu:
        out["train_tflops_s"] = out["train_tflops_per_image"] * out["train_img_s"]
        out["peak_tflops_s"] = args.peak_tflops or matmul_peak_tflops(args.dtype)
        out["peak_source"] = "given" if args.peak_tflops else f"measured {args.dtype} matmul"
        out["mfu"] = out["train_tflops_s"] / out["peak_tflops_s"]
        calls = {t: (ms, n) for t, ms, n in out.get("train_profile", {}).get("custom_calls", [])}
        native_ms = sum(calls.get(t, (0.0, 0))[0] for t in native.KERNEL_TARGETS)
        forward_calls = calls.get(native.KERNEL_TARGETS[0], (0.0, 0))[1]
        dw = out["train_tflops_per_image_by_op"].get("dwconv7x7", 0.0) * b
        # The native kernels' rate on the model's depthwise FLOPs, when every 7x7 depthwise
        # layer ran a native forward call (not, e.g., the Toeplitz matmul of small maps on CPU).
        if native_ms and dw and forward_calls >= out["dwconv7x7_layers"]:
          out["native_dwconv_ms"] = native_ms
          out["native_dwconv_tflops_s"] = dw / (native_ms / 1e3)
    rows.append(out)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--variant", default="nano", choices=sorted(DEFAULT_SIZE))
  ap.add_argument("--timesteps", default="1,2", help="comma-separated T values")
  ap.add_argument("--nets", default="mbpl/sisa,none/softmax", help="comma-separated spk/attention")
  ap.add_argument("--image-size", type=int, default=None, help="default: per variant")
  ap.add_argument("--partition", type=int, default=None, help="default: per variant")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--classes", type=int, default=1000)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--remat", action="store_true")
  ap.add_argument(
    "--scan-blocks", action="store_true", help="model.scan_blocks: nn.scan over a stage's blocks"
  )
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument(
    "--interleave",
    action="store_true",
    help="compile every setting first, then time them round-robin (for ratios between settings)",
  )
  ap.add_argument(
    "--compile-only", action="store_true",
    help="abstract params (jax.eval_shape); only lower + compile the train step and time both",
  )  # fmt: skip
  ap.add_argument(
    "--train-only", action="store_true",
    help="skip the forward (train=False) program: only compile and time the train step",
  )  # fmt: skip
  ap.add_argument(
    "--profile-top", type=int, default=0, metavar="N",
    help="after timing, profile one train step and list its N most expensive ops",
  )  # fmt: skip
  ap.add_argument(
    "--mfu", action="store_true",
    help="add model FLOPs utilisation: dense train FLOPs/s over the matmul peak",
  )  # fmt: skip
  ap.add_argument(
    "--peak-tflops", type=float, default=None,
    help="the peak for --mfu (e.g. a chip's spec-sheet rate); default: measured in this run",
  )  # fmt: skip
  args = ap.parse_args()

  combos = [(net, int(t)) for net in args.nets.split(",") for t in args.timesteps.split(",")]
  if args.interleave:
    rows = measure(args, [prepare_setting(args, t, net) for net, t in combos])
  else:
    rows = []
    for net, t in combos:
      rows += measure(args, [prepare_setting(args, t, net)])
      # Each row as soon as it is measured (stderr), so a run cut short still leaves numbers.
      print(f"row {json.dumps(rows[-1])}", file=sys.stderr, flush=True)

  def f(v, spec):
    return "-" if v is None else format(v, spec)

  print(
    f"{'variant':<7} {'net':<13} {'T':>2} {'px':>4} {'B':>3} {'fwd img/s':>9} {'fwd comp s':>10} "
    f"{'fwd MB':>8} {'train img/s':>11} {'train comp s':>12} {'train MB':>9}"
  )
  for r in rows:
    print(
      f"{r['variant']:<7} {r['net']:<13} {r['timesteps']:>2} {r['image_size']:>4} "
      f"{r['batch']:>3} {f(r['fwd_img_s'], '.1f'):>9} {f(r['fwd_compile_s'], '.1f'):>10} "
      f"{f(r['fwd_mem_mb'], '.0f'):>8} {f(r['train_img_s'], '.2f'):>11} "
      f"{f(r['train_compile_s'], '.1f'):>12} {f(r['train_mem_mb'], '.0f'):>9}"
    )
    if "train_lower_s" in r:
      print(
        f"    compile only: trace+lower {r['train_lower_s']:.1f} s, compile "
        f"{r['train_compile_s']:.1f} s, {r['hlo_instructions']} optimized HLO instructions"
      )
    if "train_profile" in r:
      prof = r["train_profile"]
      print(f"    profiled train step: {prof['total_ms']:.1f} ms of ops on {prof['tracks']} tracks")
      for title in ("kinds", "ops", "custom_calls"):
        print(f"    {'by custom-call target' if title == 'custom_calls' else 'top ' + title}:")
        for name, ms, count in prof.get(title, []):
          print(f"      {ms:10.2f} ms {count:5d}x  {name[:90]}")
    if "mfu" in r:
      print(
        f"    train {r['train_tflops_s']:.3f} TFLOP/s dense = {100 * r['mfu']:.1f} % MFU of "
        f"{r['peak_tflops_s']:.3f} TFLOP/s ({r['peak_source']}); device peak "
        f"{f(r['device_peak_mb'], '.0f')} MB"
      )
      shares = ", ".join(
        f"{op} {100 * v / r['train_tflops_per_image']:.1f} %"
        for op, v in sorted(r["train_tflops_per_image_by_op"].items(), key=lambda kv: -kv[1])
      )
      print(f"    dense train FLOPs {1e3 * r['train_tflops_per_image']:.1f} GFLOP/image: {shares}")
    if "native_dwconv_ms" in r:
      print(
        f"    native depthwise kernels: {r['native_dwconv_ms']:.1f} ms of ops per step, "
        f"{r['native_dwconv_tflops_s']:.3f} TFLOP/s on the model's 7x7 depthwise FLOPs "
        f"({100 * r['native_dwconv_tflops_s'] / r['peak_tflops_s']:.1f} % of the peak)"
      )
  print(
    json.dumps(
      dict(
        benchmark="model",
        backend=jax.default_backend(),
        devices=jax.device_count(),
        load_avg=os.getloadavg(),
        allocator=malloc.in_use(),
        rows=rows,
      )
    )
  )


if __name__ == "__main__":
  main()
