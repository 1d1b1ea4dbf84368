r"""Compiles the real train and eval steps for a TPU slice on this host, without a TPU.

  TPU_SKIP_MDS_QUERY=1 .venv/bin/python scripts/compile_tpu.py \
    --config configs/imagenet.py:variant=tiny --topology v5e:2x2 --global_batch 32 \
    --compare spike-free --top_fusions 10

Needs `libtpu` (requirements-tpu.txt, installed by `make test`). The steps are the project's
own: `models.build(config.model, platform="tpu")`, `sharding.make_mesh` on the slice's
compile-only devices, `train.state.abstract_state` with `sharding.state_shardings`,
`optim.make_optimizer`, `train.step.make_train_step` / `make_eval_step`, lowered on abstract
arguments and compiled by XLA:TPU. Nothing is allocated and nothing runs.

For each program it prints, per chip: the HBM XLA:TPU reserves (arguments, outputs, temporaries,
and whether their sum fits the chip's capacity), XLA:TPU's flop and byte counts per image, a
roofline step time max(flops / peak, bytes / bandwidth) on the chip's public peak figures
(`spikeatconv_jax.hardware.CHIPS`), the images/s per chip and MFU at that time (model FLOPs =
XLA's flop count, so MFU is an upper bound), an op census of the optimized HLO (static
instruction counts: an op inside a loop body counts once), and the compile time.

XLA's cost analysis counts a while loop's body once, whatever its trip count. The configs'
`model.scan_blocks` runs each stage's repeated blocks as such a loop, so their flops and bytes
are counted for one block per stage: the report lists the loops (`loops_counted_once`) and
warns. `--unroll` compiles every program with `model.scan_blocks=False`; its per-image figures
cover every block (the compile takes longer). With
`--top_fusions N`, the N top-level fusions and ops with the most bytes, estimated from the shapes
of their operands and result and multiplied by the trip count of the loops around them.

XLA's byte count ("bytes accessed") is every byte each op reads and writes, wherever it lives:
XLA:TPU's memory-space assignment keeps many buffers in on-chip VMEM (`S(1)` in the optimized
HLO's layouts) and moves them with asynchronous copies. `bytes_per_image_by_space` (the table's
"layouts" row) splits the top-level ops' operand and result bytes, estimated from shapes, by the
memory their layouts name: the "hbm" part estimates the HBM traffic (on `--unroll` programs: in
a scanned loop each dynamic slice of the stacked parameters counts the whole stack).

`--compare` compiles further programs in the same run and prints their ratios to the first:
`spike-free` (the same config string with `spk=none`), another config string
(`configs/imagenet.py:variant=tiny,spk=none`), or `key=value` overrides of the main config
(`model.spk.mbpl_merge=sum`); a config string may be followed by overrides, space-separated.

With more than one program, each compiles in a fresh child process: XLA:TPU's host memory for a
large program (Base: over 20 GB) is not given back to the system after the compile, so a
second program compiled in the same process could be killed for memory.

Prints a table, then ONE JSON line. Exits 1 on bad input; a program that does not fit the chip is
reported (XLA's message in "error"), not raised.
"""

from __future__ import annotations

import concurrent.futures
import copy
import importlib.util
import json
import multiprocessing
import os
import re
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu asks a metadata server for the TPU it runs on; there is none on a CPU host.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Any jax process on this host that finds libtpu holds its lockfile (and falls back to CPU);
# compiling needs no TPU, so this process need not own the lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spikeatconv_jax import hardware  # noqa: E402  (imports no jax: the env above still applies)
from spikeatconv_jax.xla_cpu import malloc  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/default.py", "Config file, e.g. configs/imagenet.py:variant=tiny."
)
flags.DEFINE_string("topology", "v5e:2x2", "TPU slice, e.g. v5e:2x2, v5e:16x16, v4:2x2x1, v6e:2x2.")
flags.DEFINE_integer("global_batch", None, "Global batch size (default: config.batch_size).")
flags.DEFINE_string("mesh", None, "Mesh override, e.g. 'data=-1,fsdp=8' (default: config.mesh).")
flags.DEFINE_multi_string(
  "compare", [], "A further program: spike-free, a config string, or key=value overrides."
)
flags.DEFINE_integer("top_fusions", 0, "List the N top-level fusions/ops with the most bytes.")
flags.DEFINE_bool("eval", True, "Also compile the eval step.")
flags.DEFINE_bool(
  "unroll",
  False,
  "Compile every stage's blocks unscanned (model.scan_blocks=False) in every program: XLA's "
  "cost analysis counts a loop body once, so only a program without block loops gets flop and "
  "byte counts that cover every block.",
)
flags.DEFINE_string("dump_hlo", None, "Directory to write each program's optimized HLO text to.")

# Input channels of the datasets the configs name (the stem's kernel depends on it).
CHANNELS = {"fashion_mnist_local": 1, "cifar100": 3, "imagenet2012": 3}


# ---------------------------------------------------------------------------------------------
# Configs.


def load_config(spec: str):
  """`configs/x.py[:arg]` -> the module's get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("compile_tpu_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_overrides(config, overrides: dict):
  """Sets dotted `key: value` pairs on a copy of `config`; values are already typed."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"unknown config field {key!r}")
    node[leaf] = value
  return config


def parse_overrides(config, items: list[str]) -> dict:
  """["model.dtype=float32", ...] -> {"model.dtype": "float32"}, each value converted to the
  type of the field it replaces (as a config string's values are)."""
  from configs.common import parse_arg

  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--compare: {item!r} is not of the form key=value")
    key = item.split("=", 1)[0].strip()
    node = config
    try:
      for part in key.split("."):
        node = node[part]
    except (KeyError, AttributeError):
      raise ValueError(f"--compare: unknown config field {key!r}") from None
    out.update(parse_arg(item, **{key: node}).to_dict())
  return out


def spike_free_spec(spec: str) -> str:
  """The config string of the spike-free twin: the same string with spk=none."""
  path, _, arg = spec.partition(":")
  return f"{path}:{arg + ',' if arg else ''}spk=none"


def compare_config(entry: str, main_spec: str, main_overrides: dict, main_config):
  """(name, config) of one --compare entry."""
  tokens = entry.split()
  if not tokens:
    raise ValueError("--compare: empty entry")
  head, rest = tokens[0], tokens[1:]
  if head in ("spike-free", "spike_free"):
    config = apply_overrides(load_config(spike_free_spec(main_spec)), main_overrides)
  elif "=" not in head.partition(":")[0]:  # a config file, with or without its arg
    config = load_config(head)
  else:
    config, rest = main_config, tokens
  return entry, apply_overrides(config, parse_overrides(config, rest))


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """'data=-1,fsdp=8' -> (("data", -1), ("fsdp", 8))."""
  out = []
  for item in text.split(","):
    name, sep, size = item.partition("=")
    if not sep or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh: {item!r} is not of the form axis=size (e.g. data=-1,fsdp=8)")
    out.append((name.strip(), int(size)))
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# Compilation.


def memory(compiled, chip) -> dict:
  m = compiled.memory_analysis()
  args, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  code = int(m.generated_code_size_in_bytes)
  # Donated state aliases its output: it is counted once.
  total = args + out - alias + temp + code
  return {
    "arguments_bytes": args,
    "outputs_bytes": out,
    "aliased_bytes": alias,
    "temporaries_bytes": temp,
    "generated_code_bytes": code,
    "total_bytes": total,
    "chip_hbm_bytes": chip.hbm_bytes,
    "fits": total <= chip.hbm_bytes,
  }


def costs(compiled) -> dict:
  c = compiled.cost_analysis()
  if isinstance(c, list | tuple):
    c = c[0] if c else {}
  return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def analyse(compiled, chip, images_per_chip: float, seconds: float, top: int, dump: str | None):
  text = compiled.as_text()
  if dump:
    with open(dump, "w") as f:
      f.write(text)
  c = costs(compiled)
  compute_s = c["flops"] / chip.peak_bf16_flops
  memory_s = c["bytes"] / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  out = {
    "compile_s": round(seconds, 1),
    "hbm": memory(compiled, chip),
    "flops_per_image": c["flops"] / images_per_chip,
    "bytes_per_image": c["bytes"] / images_per_chip,
    "roofline_step_s": step_s,
    "bound": "compute" if compute_s >= memory_s else "memory",
    "img_per_s_per_chip": images_per_chip / step_s if step_s else None,
    "mfu": c["flops"] / step_s / chip.peak_bf16_flops if step_s else None,
    # The same bytes by the memory their layouts name (an estimate from shapes): XLA's byte
    # count includes operands held in on-chip VMEM.
    "bytes_per_image_by_space": {
      k: v / images_per_chip for k, v in hardware.bytes_by_memory_space(text).items()
    },
    "census": hardware.census(text),
    # XLA counts a while body once: with a loop of more than one trip the figures above are low.
    # (Loops of unknown trip count, e.g. Mixup's Beta sampling, are scalar work: not listed.)
    "loops_counted_once": sorted(n for n in hardware.loop_trip_counts(text) if n > 1),
  }
  if top:
    out["top_fusions"] = hardware.top_ops(text, top)
  return out


def compile_program(name, config, devices, chip, args) -> dict:
  """Compiles one config's train (and eval) step; returns its report."""
  import jax
  import jax.numpy as jnp

  from spikeatconv_jax import models, optim, sharding
  from spikeatconv_jax.train import state as state_lib
  from spikeatconv_jax.train import step as step_lib

  if args.mesh:
    config.mesh = parse_mesh(args.mesh)
  if args.unroll:
    config.model.scan_blocks = False
  global_batch = args.global_batch or config.batch_size
  config.batch_size = global_batch
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  slices = sharding.batch_size_per_step(mesh)
  micro = global_batch // config.grad_accum_steps
  if global_batch % config.grad_accum_steps or micro % slices:
    raise ValueError(
      f"global batch {global_batch} (micro-batch {micro}, grad_accum_steps="
      f"{config.grad_accum_steps}) does not split over the mesh's {slices} batch slices"
    )
  size = config.dataset.image_size
  models.validate(config.model, size)
  if config.dataset.name not in CHANNELS:
    raise ValueError(f"unknown dataset {config.dataset.name!r}: known {', '.join(CHANNELS)}")
  image_shape = (size, size, CHANNELS[config.dataset.name])
  images_per_chip = global_batch / len(devices)

  # The layers trace the forms a TPU runs (model.kernels "auto" resolves from the platform).
  model = models.build(config.model, platform="tpu")
  # The step takes the learning rate as an argument: the schedule's lengths do not matter.
  tx, _ = optim.make_optimizer(config, total_steps=10**9, steps_per_epoch=1)
  report = {
    "name": name,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "global_batch": global_batch,
    "images_per_chip": images_per_chip,
    "image_shape": list(image_shape),
    "kernels": model.cfg.kernels,
  }
  batch_sh = sharding.batch_sharding(mesh)
  shapes = state_lib.abstract_state(model, tx, image_shape, config.seed)
  shardings = sharding.state_shardings(shapes, mesh)
  state = state_lib.abstract_with_shardings(shapes, shardings)
  report["params"] = state_lib.param_count(shapes.params)
  steps = {
    "train": (
      step_lib.make_train_step(model, tx, config, mesh, shardings),
      {"label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sh)},
      (jax.ShapeDtypeStruct((), jnp.float32),),
    )
  }
  if args.eval:
    steps["eval"] = (
      step_lib.make_eval_step(model, config.model.num_classes, mesh, shardings),
      {
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sh),
        "mask": jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=batch_sh),
      },
      (),
    )
  for kind, (fn, extra, rest) in steps.items():
    # As the input pipeline hands them over: uint8 to the train step (normalize runs inside
    # it), float32 to the eval step (normalised on the device as each batch arrives).
    dtype = jnp.uint8 if kind == "train" else jnp.float32
    image = jax.ShapeDtypeStruct((global_batch, *image_shape), dtype, sharding=batch_sh)
    batch = {"image": image, **extra}
    dump = None
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      slug = re.sub(r"[^\w.=-]+", "_", name)[:80]
      dump = os.path.join(args.dump_hlo, f"{slug}.{kind}.hlo.txt")
    t0 = time.perf_counter()
    try:
      compiled = fn.lower(state, batch, *rest).compile()
    except Exception as e:  # noqa: BLE001 - XLA's errors (e.g. RESOURCE_EXHAUSTED) are data
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if "RESOURCE_EXHAUSTED" not in msg:
        raise
      report[kind] = {
        "compile_s": round(time.perf_counter() - t0, 1),
        "error": msg[:400],
        "hbm": {"fits": False, "chip_hbm_bytes": chip.hbm_bytes},
      }
      continue
    seconds = time.perf_counter() - t0
    report[kind] = analyse(compiled, chip, images_per_chip, seconds, args.top_fusions, dump)
    s = report[kind]
    print(
      f"  {kind}: compiled in {seconds:.0f} s; {s['flops_per_image'] / 1e9:.2f} GFLOP and "
      f"{s['bytes_per_image'] / 1e9:.3f} GB per image; {s['hbm']['total_bytes'] / 2**30:.2f} GiB "
      "of HBM per chip",
      file=sys.stderr,
      flush=True,
    )
  return report


# ---------------------------------------------------------------------------------------------
# Output.

RATIO_KEYS = (
  ("flops_per_image", ("flops_per_image",)),
  ("bytes_per_image", ("bytes_per_image",)),
  ("hbm_layout_bytes_per_image", ("bytes_per_image_by_space", "hbm")),
  ("temporaries_bytes", ("hbm", "temporaries_bytes")),
  ("total_hbm_bytes", ("hbm", "total_bytes")),
  ("roofline_step_s", ("roofline_step_s",)),
  ("compile_s", ("compile_s",)),
)


def _get(d, path):
  for p in path:
    if not isinstance(d, dict) or p not in d:
      return None
    d = d[p]
  return d


def ratios(first: dict, other: dict) -> dict:
  """first / other for the train steps' headline numbers."""
  out = {}
  for key, path in RATIO_KEYS:
    a, b = _get(first.get("train", {}), path), _get(other.get("train", {}), path)
    out[key] = round(a / b, 3) if a is not None and b else None
  return out


def _fmt_bytes(x):
  return "-" if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**28 else f"{x / 2**20:.1f} MiB"


def table(result: dict) -> str:
  chip = result["chip"]
  lines = [
    f"topology {result['topology']} ({result['chips']} chips, {chip['generation']}: "
    f"{chip['peak_bf16_tflops']:.0f} TFLOP/s bf16, {chip['hbm_gb_per_s']:.0f} GB/s, "
    f"{chip['hbm_gib']:.0f} GiB HBM per chip; public figures, {chip['source']})",
  ]
  programs = result["programs"]
  for kind in ("train", "eval"):
    if not any(kind in p for p in programs):
      continue
    rows = [
      ("compile (s)", lambda s: f"{s['compile_s']:.1f}"),
      ("HBM arguments / chip", lambda s: _fmt_bytes(s["hbm"].get("arguments_bytes"))),
      ("HBM temporaries / chip", lambda s: _fmt_bytes(s["hbm"].get("temporaries_bytes"))),
      ("HBM outputs / chip", lambda s: _fmt_bytes(s["hbm"].get("outputs_bytes"))),
      ("HBM total / chip", lambda s: _fmt_bytes(s["hbm"].get("total_bytes"))),
      ("fits the chip", lambda s: "yes" if s["hbm"]["fits"] else "NO"),
      ("GFLOP / image (XLA)", lambda s: f"{s['flops_per_image'] / 1e9:.2f}"),
      ("HBM GB / image (XLA)", lambda s: f"{s['bytes_per_image'] / 1e9:.3f}"),
      (
        "  layouts: HBM / VMEM GB",
        lambda s: "{:.3f} / {:.3f}".format(
          s["bytes_per_image_by_space"]["hbm"] / 1e9, s["bytes_per_image_by_space"]["vmem"] / 1e9
        ),
      ),
      ("roofline step (ms)", lambda s: f"{s['roofline_step_s'] * 1e3:.2f} ({s['bound']})"),
      ("img/s per chip (roofline)", lambda s: f"{s['img_per_s_per_chip']:.0f}"),
      ("MFU at roofline (%)", lambda s: f"{100 * s['mfu']:.1f}"),
      ("transposes", lambda s: str(s["census"]["transposes"])),
      ("copies", lambda s: str(s["census"]["copies"])),
      ("convolutions", lambda s: str(s["census"]["convolutions"])),
      ("  with batch_group_count", lambda s: str(s["census"]["convolutions_batch_group"])),
      ("  with feature_group_count", lambda s: str(s["census"]["convolutions_feature_group"])),
      ("fusions", lambda s: str(s["census"]["fusions"])),
      ("gathers / scatters", lambda s: f"{s['census']['gathers']} / {s['census']['scatters']}"),
      (
        "collectives",
        lambda s: " ".join(f"{k}={v}" for k, v in s["census"]["collectives"].items() if v) or "0",
      ),
      (
        "custom calls",
        lambda s: " ".join(f"{k}={v}" for k, v in s["census"]["custom_calls"].items()) or "0",
      ),
    ]
    # A long name keeps its end, where config strings differ (…variant=base,spk=none).
    names = [n if len(n) <= 40 else "…" + n[-39:] for n in (p["name"] for p in programs)]
    width = max(12, *(len(n) for n in names))
    lines.append("")
    lines.append(f"{kind} step".ljust(28) + "".join(n.rjust(width + 2) for n in names))
    for label, fn in rows:
      cells = []
      for p in programs:
        s = p.get(kind)
        if s is None:
          cells.append("-")
        elif "error" in s:
          cells.append("error" if label != "fits the chip" else "NO")
        else:
          try:
            cells.append(fn(s))
          except (KeyError, TypeError):
            cells.append("-")
      lines.append(label.ljust(28) + "".join(c.rjust(width + 2) for c in cells))
  for p in programs:
    for kind in ("train", "eval"):
      s = p.get(kind) or {}
      if "error" in s:
        lines.append(f"\n{p['name']} {kind}: {s['error']}")
  for p in programs:
    for kind in ("train", "eval"):
      loops = (p.get(kind) or {}).get("loops_counted_once")
      if loops:
        lines.append(
          f"\nWARNING {p['name']} {kind}: XLA's flops and bytes count each while loop's body "
          f"once; this program has loops of {loops} trips, so its figures are low "
          "(--unroll compiles the blocks without loops)."
        )
  for name, r in result.get("ratios", {}).items():
    lines.append(f"\n{programs[0]['name']} / {name} (train): " + ", ".join(
      f"{k} {v:.2f}x" for k, v in r.items() if v is not None
    ))  # fmt: skip
  for p in programs:
    top = (p.get("train") or {}).get("top_fusions")
    if top:
      lines.append(f"\ntop ops by bytes, train step of {p['name']} (estimated from shapes):")
      for r in top:
        lines.append(
          f"  {r['bytes'] / 2**20:10.1f} MiB  x{r['trips']:<3d} {r['op']:<22s} {r['source']}"
        )
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  FLAGS = flags.FLAGS
  chip, _ = hardware.parse_topology(FLAGS.topology)
  main_spec = config_flags.get_config_filename(FLAGS["config"])
  main_overrides = config_flags.get_override_values(FLAGS["config"])
  config = _CONFIG.value
  if FLAGS.global_batch is not None and FLAGS.global_batch < 1:
    raise ValueError(f"--global_batch must be >= 1, got {FLAGS.global_batch}")
  programs = [(main_spec, config)]
  for entry in FLAGS.compare:
    programs.append(compare_config(entry, main_spec, main_overrides, config))
  devices = hardware.topology_devices(FLAGS.topology)
  result = {
    "topology": FLAGS.topology,
    "chips": len(devices),
    "device_kind": devices[0].device_kind,
    "chip": chip.as_dict(),
    "model_flops": "XLA:TPU's flop count of the compiled step",
    "programs": [],
  }
  opts = types.SimpleNamespace(
    **{
      k: FLAGS[k].value
      for k in ("mesh", "global_batch", "eval", "top_fusions", "dump_hlo", "unroll")
    }
  )
  for name, c in programs:
    print(f"compiling {name} for {FLAGS.topology} ...", file=sys.stderr, flush=True)
    if len(programs) == 1:
      report = compile_program(name, copy.deepcopy(c), devices, chip, opts)
    else:
      report = _compile_in_child(name, c, FLAGS.topology, opts)
    result["programs"].append(report)
  first = result["programs"][0]
  if len(programs) > 1:
    result["ratios"] = {p["name"]: ratios(first, p) for p in result["programs"][1:]}
  print(table(result))
  print(json.dumps(result))


def _compile_child(name, config, topology: str, opts) -> dict:
  chip, _ = hardware.parse_topology(topology)
  return compile_program(name, config, hardware.topology_devices(topology), chip, opts)


def _compile_in_child(name, config, topology: str, opts) -> dict:
  """`compile_program` in a fresh process, whose host memory goes back to the system when it
  ends."""
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
    return pool.submit(_compile_child, name, copy.deepcopy(config), topology, opts).result()


def _main(argv) -> None:
  try:
    main(argv)
  except ValueError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  # XLA:TPU's compiler allocates and frees at a high rate: under tcmalloc tiny's train step
  # compiles about a tenth faster than under glibc malloc on a 2-core host.
  malloc.reexec_with_tcmalloc()
  from spikeatconv_jax.train import cli

  cli.run(_main)
