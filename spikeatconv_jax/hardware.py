"""Public per-chip figures of Cloud TPU generations, and compile-only devices for a TPU slice.

`CHIPS` holds the peak bf16 matmul rate, HBM bandwidth and HBM capacity of one chip, as Google
Cloud's TPU documentation publishes them (each entry names its page). They are vendor figures,
not measurements: a roofline built on them is an upper bound on speed.

`topology_devices("v5e:2x2")` returns the devices of a slice for ahead-of-time compilation with
XLA:TPU on any host (it needs `libtpu`, not a TPU): build a mesh on them, then
`jax.jit(...).lower(...).compile()` compiles the program that slice would run.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip (a megacore chip's two TensorCores count as one device)."""

  generation: str
  peak_bf16_flops: float  # FLOP/s, dense bf16 matmul
  hbm_bytes_per_s: float  # HBM bandwidth, bytes/s
  hbm_bytes: int  # HBM capacity
  source: str  # where the three figures are published

  def as_dict(self) -> dict:
    return {
      "generation": self.generation,
      "peak_bf16_tflops": self.peak_bf16_flops / 1e12,
      "hbm_gb_per_s": self.hbm_bytes_per_s / 1e9,
      "hbm_gib": self.hbm_bytes / 2**30,
      "source": self.source,
      "figures": "public vendor figures, not measured",
    }


GB, GIB, TFLOPS = 1e9, 2**30, 1e12
CHIPS = {
  # "Peak compute per chip (bf16) 275 TFLOPs; HBM2 capacity and bandwidth 32 GiB, 1200 GBps".
  "v4": Chip("v4", 275 * TFLOPS, 1200 * GB, 32 * GIB, "https://cloud.google.com/tpu/docs/v4"),
  # "Peak compute per chip (bf16) 197 TFLOPs; HBM2 capacity and bandwidth 16 GB, 819 GBps".
  "v5e": Chip("v5e", 197 * TFLOPS, 819 * GB, 16 * GIB, "https://cloud.google.com/tpu/docs/v5e"),
  # "Peak compute per chip (BF16) 459 TFLOPs; HBM capacity per chip 95 GiB; 2765 GBps".
  "v5p": Chip("v5p", 459 * TFLOPS, 2765 * GB, 95 * GIB, "https://cloud.google.com/tpu/docs/v5p"),
  # "Peak compute per chip (bf16) 918 TFLOPs; HBM 32 GB per chip; 1640 GBps".
  "v6e": Chip("v6e", 918 * TFLOPS, 1640 * GB, 32 * GIB, "https://cloud.google.com/tpu/docs/v6e"),
}
# Generations whose chips have two TensorCores: compiled as one megacore device per chip, the
# way JAX runs them.
_MEGACORE = ("v4", "v5p")
# libtpu's default chips per host; a smaller slice passes its own bounds.
_HOST_BOUNDS = (2, 2, 1)
# Custom-call targets of the project's XLA:CPU forms start with this: a TPU program holds none.
CPU_TARGET_PREFIX = "spikeatconv_"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """ "v5e:2x2" -> (CHIPS["v5e"], (2, 2)).

  Raises:
    ValueError: for a malformed name or a generation not in `CHIPS`.
  """
  m = _TOPOLOGY.match(name.strip())
  if not m:
    raise ValueError(
      f"topology {name!r}: expected GENERATION:AxB or GENERATION:AxBxC, e.g. v5e:2x2 or v4:2x2x1"
    )
  generation, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if generation not in CHIPS:
    raise ValueError(f"topology {name!r}: unknown generation; known: {', '.join(CHIPS)}")
  if min(dims) < 1:
    raise ValueError(f"topology {name!r}: every dimension must be >= 1")
  return CHIPS[generation], dims


def num_chips(name: str) -> int:
  return math.prod(parse_topology(name)[1])


def topology_devices(name: str) -> list:
  """The compile-only devices of TPU slice `name`, one per chip (needs libtpu, not a TPU).

  Raises:
    ValueError: for a bad name, or one libtpu rejects (its message included).
  """
  chip, dims = parse_topology(name)
  from jax.experimental import topologies  # noqa: PLC0415 (keeps this module importable alone)

  bounds = (*dims, 1) if len(dims) == 2 else dims
  kwargs = {}
  if any(d % h for d, h in zip(bounds, _HOST_BOUNDS, strict=True)):
    kwargs["chips_per_host_bounds"] = bounds  # a slice smaller than one host
  if chip.generation in _MEGACORE:
    kwargs["chip_config_name"] = "megacore"
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu raises its own runtime error types
    raise ValueError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
  return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# The optimized HLO text of a compiled program.

_DTYPE_BYTES = {
  "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
  "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")  # + layout
_SPACE = re.compile(r"S\((\d+)\)")
SPACES = {0: "hbm", 1: "vmem"}  # XLA:TPU's memory space ids in layouts; others: "other"
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _shapes(text: str):
  """(memory space id, bytes) of every array shape written in `text` (padding ignored): the
  space is a layout's `S(n)`, 0 (HBM) without one."""
  for dtype, dims, layout in _SHAPE.findall(text):
    m = _SPACE.search(layout)
    yield (
      (int(m.group(1)) if m else 0),
      _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d),
    )


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (layouts and padding ignored)."""
  return int(sum(size for _, size in _shapes(text)))


def parse_hlo(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """{computation: [(name, result type, opcode, rest of the line)]}, plus "__entry__"."""
  comps, current = {}, None
  for line in text.splitlines():
    if not line.startswith(" "):
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          comps["__entry__"] = current
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append(m.groups())
  return comps


def census(text: str) -> dict:
  """Static op counts of an optimized HLO module (every computation, fusion bodies included)."""
  comps = parse_hlo(text)
  ops = collections.Counter()
  targets = collections.Counter()
  batch_group = feature_group = 0
  for name, instrs in comps.items():
    if name == "__entry__":
      continue
    for _, _, opcode, rest in instrs:
      ops[opcode] += 1
      if opcode == "custom-call":
        m = re.search(r'custom_call_target="([^"]+)"', rest)
        targets[m.group(1) if m else "?"] += 1
      elif opcode == "convolution":
        m = re.search(r"batch_group_count=(\d+)", rest)
        batch_group += bool(m and int(m.group(1)) > 1)
        m = re.search(r"feature_group_count=(\d+)", rest)
        feature_group += bool(m and int(m.group(1)) > 1)
  collectives = {c: ops[c] + ops[c + "-start"] for c in COLLECTIVES}
  return {
    "transposes": ops["transpose"],
    "copies": ops["copy"] + ops["copy-start"],
    "convolutions": ops["convolution"],
    "convolutions_batch_group": batch_group,
    "convolutions_feature_group": feature_group,
    "dots": ops["dot"],
    "fusions": ops["fusion"],
    "custom_calls": dict(sorted(targets.items())),
    "gathers": ops["gather"],
    "scatters": ops["scatter"],
    "while_loops": ops["while"],
    "collectives": collectives,
    "instructions": sum(ops.values()),
  }


_CONST = re.compile(r"^(-?\d+)\)")
_LT = re.compile(r"^%?([\w.\-]+), %?([\w.\-]+)\), direction=LT")


def _trip_count(rest: str, comps: dict) -> int:
  """A while loop's trip count: XLA's `known_trip_count`, else a condition `i < N` on a counter
  (how XLA:TPU leaves a scan's loop), else 0 (unknown)."""
  trip = _TRIP.search(rest)
  if trip:
    return int(trip.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", rest)
  instrs = comps.get(cond.group(1), []) if cond else []
  consts = {}
  for name, rtype, op, r in instrs:
    m = _CONST.match(r) if op == "constant" and rtype.startswith("s32[]") else None
    if m:
      consts[name] = int(m.group(1))
  compares = [m for _, _, op, r in instrs if op == "compare" and (m := _LT.match(r))]
  if len(compares) == 1 and compares[0].group(2) in consts:
    return consts[compares[0].group(2)]
  return 0


def loop_trip_counts(text: str) -> list[int]:
  """The trip counts of the optimized module's while loops (0 where not known).

  XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, whatever
  its trip count: a program with loops reports less than it runs."""
  comps = parse_hlo(text)
  out = []
  for name, instrs in comps.items():
    if name == "__entry__":
      continue
    for _, _, opcode, rest in instrs:
      if opcode == "while":
        out.append(_trip_count(rest, comps))
  return out


def _top_level(text: str):
  """Yields (name, result type, opcode, rest, operand types, trips) for every op outside a
  fusion body, trips being the known trip counts of the loops around it multiplied."""
  comps = parse_hlo(text)
  entry = comps.pop("__entry__", None)
  fused = set()
  edges = []  # (caller, callee, multiplier)
  for name, instrs in comps.items():
    for _, _, opcode, rest in instrs:
      if opcode == "fusion":
        fused.update(re.findall(r"calls=%?([\w.\-]+)", rest))
      elif opcode == "while":
        trip = _trip_count(rest, comps) or 1
        for key in ("body", "condition"):
          m = re.search(key + r"=%?([\w.\-]+)", rest)
          if m:
            edges.append((name, m.group(1), trip))
      else:
        for callee in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", rest):
          edges.append((name, callee, 1))
  mult = {entry: 1} if entry else {}
  for _ in range(len(comps)):  # call graph depth is small; propagate until stable
    changed = False
    for caller, callee, k in edges:
      if caller in mult and mult.get(callee) != mult[caller] * k:
        mult[callee] = mult[caller] * k
        changed = True
    if not changed:
      break
  skip = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
          "conditional", "after-all", "partition-id", "replica-id"}  # fmt: skip
  for comp, k in mult.items():
    if comp in fused or comp not in comps:
      continue
    types = {name: rtype for name, rtype, _, _ in comps[comp]}
    for name, rtype, opcode, rest in comps[comp]:
      if opcode in skip or opcode.endswith("-done"):
        continue
      operands = rest.split("), kind=")[0] if opcode == "fusion" else rest.split("), ")[0]
      if _SHAPE.search(operands):  # operand types written inline
        operand_types = operands
      else:  # XLA:TPU's text names the operands only
        names = re.findall(r"%?([\w.\-]+)", operands)
        operand_types = " ".join(types.get(a, "") for a in names)
      yield name, rtype, opcode, rest, operand_types, k


def top_ops(text: str, n: int) -> list[dict]:
  """The n top-level ops (not inside a fusion) with the most bytes of operands and result,
  times the known trip counts of the loops around them."""
  rows = []
  for name, rtype, opcode, rest, operand_types, k in _top_level(text):
    nbytes = shape_bytes(rtype) + shape_bytes(operand_types)
    kind = re.search(r"kind=(k\w+)", rest)
    op_name = _OP_NAME.search(rest)
    rows.append({
      "name": name,
      "op": opcode + (f":{kind.group(1)}" if kind else ""),
      "bytes": nbytes * k,
      "trips": k,
      "result": rtype[:60],
      "source": (op_name.group(1) if op_name else "")[-110:],
    })  # fmt: skip
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:n]


def bytes_by_memory_space(text: str) -> dict[str, int]:
  """Bytes of the operands and results of the top-level ops (times their loops' trip counts)
  by the memory space their layouts name: "hbm" (no `S(n)`, or S(0)), "vmem" (S(1), where
  XLA:TPU's memory-space assignment places buffers on chip), "other" (scalars in S(2), S(6)).

  An estimate from shapes, as `top_ops`: an asynchronous copy (`*-start`) counts its result
  tuple (destination and source), an asynchronous slice its destination's bytes once in the
  source's memory and once in its own, a fusion its operands whole even where it reads part of
  one (so a scanned loop's dynamic slice of its stacked parameters counts the whole stack each
  trip: use unscanned programs). XLA's cost analysis ("bytes accessed") counts the bytes an op
  accesses whatever memory they live in; this tells how many of them are in HBM."""

  out = {"hbm": 0, "vmem": 0, "other": 0}
  for _, rtype, opcode, _, operand_types, k in _top_level(text):
    if opcode == "slice-start":  # ((source), destination, context)
      parts = list(_shapes(rtype))
      (src_space, _), (dst_space, size) = parts[:2]
      found = [(src_space, size), (dst_space, size), *parts[2:]]
    else:
      found = _shapes(rtype if opcode.endswith("-start") else f"{rtype} {operand_types}")
    for space, size in found:
      out[SPACES.get(space, "other")] += int(size * k)
  return out
