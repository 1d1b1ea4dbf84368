"""Multi-step LIF throughput: forward and forward+backward, next to memory copy bandwidth.

  .venv/bin/python benchmarks/lif.py                      # [T, 32, 32, 32, 64], T = 1, 2, 4
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/lif.py

Each case is jitted, warmed up, then timed `--repeats` times; the median is reported.

  fwd      x -> s                                  bytes: read x, write s
  fwd+bwd  (x, g) -> (s, gx) through jax.vjp        bytes: read x, write s, read H (f32), read g,
                                                     write gx
Effective GB/s divides those bytes by the median time (the count follows the op's contract; XLA
may fuse the forward into the backward and move less). Elements/s counts T*B*H*W*C per call.

Copy bandwidth is measured in the same run, interleaved call by call with each case (the
machine is shared, so each row's %copy compares timings taken under the same load), two ways,
both counting read + write:
  numpy    np.copyto between two preallocated 128 MiB float32 buffers (one thread, no allocation)
  xla      a jitted `x * 2` over an input as large as the T=4 float32 LIF input (XLA's own threads
           and output allocation, i.e. the same allocator path as the LIF)
Columns: median and minimum wall time, median process CPU time (all threads) per call.

`--against REV` also times `spikeatconv_jax/snn/lif.py` as it was at git revision REV, call by
call alternated with today's (same inputs, same load): the columns `REV ms` and `speedup` (REV's
median over today's). Timings of two separate runs on this kind of shared machine can differ by
2x; alternated calls are the comparison to trust.

Glibc malloc returns blocks of >= 32 MiB to the OS with munmap, so every call may page-fault its
output afresh; the MALLOC_* environment variables in effect are printed with the results.

Prints a readable table and then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spikeatconv_jax.snn.lif import lif_multistep  # noqa: E402

# SpikingJelly's MultiStepLIFNode (torch backend, CPU), same shape, fwd+bwd at T=4: the quoted
# range our T=4 rows are compared with; benchmarks/lif_vs_spikingjelly.py times both side by side.
SPIKINGJELLY_FWD_BWD_T4 = (45e6, 67e6)


class _Copies:
  """The two copy-bandwidth probes; each call moves `nbytes` (read + write counted)."""

  def __init__(self, n_xla: int, numpy_bytes: int = 128 << 20):
    self.src = np.ones(numpy_bytes // 4, np.float32)
    self.dst = np.empty_like(self.src)
    np.copyto(self.dst, self.src)  # fault the destination pages in once
    self.x = jnp.ones((n_xla,), jnp.float32)
    self.scale = jax.jit(lambda x: x * 2.0)
    jax.block_until_ready(self.scale(self.x))
    self.numpy_bytes = 2 * numpy_bytes
    self.xla_bytes = 2 * 4 * n_xla

  def numpy(self):
    np.copyto(self.dst, self.src)

  def xla(self):
    jax.block_until_ready(self.scale(self.x))


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds over all threads) of one call."""
  c0, t0 = time.process_time(), time.perf_counter()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def _lif_at_revision(rev: str):
  """`lif_multistep` from spikeatconv_jax/snn/lif.py at git revision `rev` (its own imports
  resolve to today's package)."""
  try:
    src = subprocess.run(
      ["git", "show", f"{rev}:spikeatconv_jax/snn/lif.py"],
      cwd=REPO,
      check=True,
      capture_output=True,
      text=True,
    ).stdout
  except subprocess.CalledProcessError as e:
    raise SystemExit(f"--against {rev}: {e.stderr.strip()}") from None
  module = types.ModuleType(f"lif_at_{rev}")
  exec(compile(src, f"{rev}:spikeatconv_jax/snn/lif.py", "exec"), module.__dict__)
  return module.lif_multistep


def bench_case(
  t, shape, dtype, copies: _Copies, repeats: int, warmup: int, baseline=None
) -> list[dict]:
  """Times fwd and fwd+bwd at T=t, each interleaved with the two copy probes (and with the
  `baseline` LIF, when given).

  Interleaving makes each row's %copy a ratio under the same machine load: this machine is
  shared, and a copy measured a minute earlier may have seen a different load.
  """
  kx, kg = jax.random.split(jax.random.key(t))
  # Mean 1, std 1.5: a realistic mix of firing and silent neurons (the cost does not depend on it).
  x = (1.0 + 1.5 * jax.random.normal(kx, (t, *shape), jnp.float32)).astype(dtype)
  g = jax.random.normal(kg, (t, *shape), jnp.float32).astype(dtype)
  n = x.size
  b = jnp.dtype(dtype).itemsize

  def programs(lif):
    def fwd_bwd(x, g):
      s, vjp = jax.vjp(lif, x)
      return s, vjp(g)[0]

    return {"fwd": jax.jit(lif), "fwd+bwd": jax.jit(fwd_bwd)}

  ours = programs(lif_multistep)
  theirs = programs(baseline) if baseline is not None else None
  rows = []
  for mode, args, nbytes in (
    ("fwd", (x,), n * (b + b)),
    ("fwd+bwd", (x, g), n * (b + b + 4 + b + b)),
  ):
    call = lambda fn=ours[mode], args=args: jax.block_until_ready(fn(*args))
    other = theirs and (lambda fn=theirs[mode], args=args: jax.block_until_ready(fn(*args)))
    for _ in range(warmup):
      call()
      if other:
        other()
    walls, cpus, np_walls, xla_walls, other_walls = [], [], [], [], []
    for i in range(repeats):
      # The baseline goes first in every other repeat: whichever call follows the other finds
      # the inputs in cache, while the first follows the copy probes.
      if other and i % 2:
        other_walls.append(_timed(other)[0])
      w, c = _timed(call)
      walls.append(w)
      cpus.append(c)
      if other and not i % 2:
        other_walls.append(_timed(other)[0])
      np_walls.append(_timed(copies.numpy)[0])
      xla_walls.append(_timed(copies.xla)[0])
    sec = statistics.median(walls)
    copy_np = copies.numpy_bytes / statistics.median(np_walls) / 1e9
    copy_xla = copies.xla_bytes / statistics.median(xla_walls) / 1e9
    gbps = nbytes / sec / 1e9
    rows.append(
      dict(
        T=t,
        dtype=jnp.dtype(dtype).name,
        mode=mode,
        ms=sec * 1e3,
        ms_min=min(walls) * 1e3,
        cpu_ms=statistics.median(cpus) * 1e3,
        elements_per_s=n / sec,
        gb_per_s=gbps,
        bytes=nbytes,
        copy_gb_per_s_numpy=copy_np,
        copy_gb_per_s_xla=copy_xla,
        frac_copy_numpy=gbps / copy_np,
        frac_copy_xla=gbps / copy_xla,
      )
    )
    if other:
      rows[-1]["baseline_ms"] = statistics.median(other_walls) * 1e3
      rows[-1]["speedup"] = rows[-1]["baseline_ms"] / rows[-1]["ms"]
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--timesteps", default="1,2,4")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--shape", default="32,32,32,64", help="B,H,W,C")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--against", metavar="REV", help="also time lif.py at this git revision")
  args = ap.parse_args(argv)
  baseline = _lif_at_revision(args.against) if args.against else None
  shape = tuple(int(s) for s in args.shape.split(","))
  ts = [int(t) for t in args.timesteps.split(",")]
  dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]

  copies = _Copies(4 * int(np.prod(shape)))
  rows = []
  for dtype in dtypes:
    for t in ts:
      rows.extend(bench_case(t, shape, dtype, copies, args.repeats, args.warmup, baseline))
  copy_np = statistics.median(r["copy_gb_per_s_numpy"] for r in rows)
  copy_xla = statistics.median(r["copy_gb_per_s_xla"] for r in rows)

  malloc_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
  print(
    f"LIF multi-step, [T, {', '.join(map(str, shape))}], median of {args.repeats} after "
    f"{args.warmup} warm-up; jax {jax.__version__}, {jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
  )
  print(f"malloc env: {malloc_env or 'glibc defaults'}")
  print(
    f"copy bandwidth (read+write), median over rows: numpy copyto {copy_np:.2f} GB/s, "
    f"XLA x*2 {copy_xla:.2f} GB/s; each row's %copy uses the copies timed alongside it"
  )
  hdr = (
    f"{'dtype':>9} {'T':>2} {'mode':>8} {'ms':>8} {'min ms':>8} {'cpu ms':>8} {'Melem/s':>9} "
    f"{'GB/s':>7} {'copy np':>8} {'%copy(np)':>9} {'%copy(xla)':>10}"
  )
  if baseline is not None:
    hdr += f" {args.against[:10] + ' ms':>13} {'speedup':>8}"
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    print(
      f"{r['dtype']:>9} {r['T']:>2} {r['mode']:>8} {r['ms']:8.2f} {r['ms_min']:8.2f} "
      f"{r['cpu_ms']:8.2f} {r['elements_per_s'] / 1e6:9.1f} {r['gb_per_s']:7.2f} "
      f"{r['copy_gb_per_s_numpy']:8.2f} {100 * r['frac_copy_numpy']:8.1f}% "
      f"{100 * r['frac_copy_xla']:9.1f}%"
      + (f" {r['baseline_ms']:13.2f} {r['speedup']:7.2f}x" if baseline is not None else "")
    )
  t4 = [r for r in rows if r["T"] == 4 and r["mode"] == "fwd+bwd"]
  for r in t4:
    lo, hi = (r["elements_per_s"] / s for s in SPIKINGJELLY_FWD_BWD_T4[::-1])
    print(
      f"T=4 fwd+bwd {r['dtype']}: {lo:.1f}-{hi:.1f}x SpikingJelly's quoted "
      f"{SPIKINGJELLY_FWD_BWD_T4[0] / 1e6:.0f}-{SPIKINGJELLY_FWD_BWD_T4[1] / 1e6:.0f} "
      "M elem/s (target >= 3x)"
    )
  print(
    json.dumps(
      dict(
        benchmark="lif",
        shape=[None, *shape],
        repeats=args.repeats,
        warmup=args.warmup,
        against=args.against,
        jax=jax.__version__,
        cpus=os.cpu_count(),
        malloc_env=malloc_env,
        copy_gb_per_s_numpy=copy_np,
        copy_gb_per_s_xla=copy_xla,
        results=rows,
      )
    )
  )


if __name__ == "__main__":
  main()
