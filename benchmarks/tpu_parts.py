r"""Where a train step's HBM bytes go on TPU: each part of the model compiled alone for one chip.

  TPU_SKIP_MDS_QUERY=1 .venv/bin/python benchmarks/tpu_parts.py --variant tiny --spk none
  TPU_SKIP_MDS_QUERY=1 .venv/bin/python benchmarks/tpu_parts.py --variant tiny --spk mbpl \
      --parts s1.conv,s1.attn --chip v5e

Each part (the stem, each stage's entry ConvBranch, a repeated ConvBranch, grid attention, FFN)
is built with the model's own modules and config (`configs/common.model_config`), and its
forward plus backward (gradients of the parameters and the input, batch statistics updated;
the output's cotangent an argument) is compiled by XLA:TPU for one chip of `--chip` at
`--batch` images, bf16, under the hook table TPUs run. Nothing runs: XLA:TPU's cost model gives
flops and bytes. A part's total multiplies its per-image figures by how often the model has it;
the sum leaves out the head, the optimizer update, the loss and the collectives of the real
step (`scripts/compile_tpu.py` compiles that). Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.common import model_config  # noqa: E402
from spikeatconv_jax import hardware  # noqa: E402
from spikeatconv_jax.layers import ops  # noqa: E402
from spikeatconv_jax.layers.attention import FFN, Attention  # noqa: E402
from spikeatconv_jax.layers.convnext import ConvBranch, Stem  # noqa: E402
from spikeatconv_jax.models import spikeatconv  # noqa: E402


def parts(cfg, image_size: int, batch: int) -> list[tuple[str, object, tuple, int]]:
  """(name, module, input shape, count in the model) for every distinct part."""
  v = spikeatconv.VARIANTS[cfg.variant]
  t, dt = int(cfg.timesteps), jnp.bfloat16
  att = cfg.attention
  sizes = spikeatconv.stage_map_sizes(image_size)
  stem_hw = -(-image_size // 2)
  out = [
    ("stem", Stem(tuple(v["stem"]), t, cfg.spk, dtype=dt), (batch, image_size, image_size, 3), 1)
  ]
  cin, hin = v["stem"][1], stem_hw
  for s, (c, depth) in enumerate(zip(v["dims"], v["depths"], strict=True)):
    h = sizes[s]
    out.append((f"s{s}.entry", ConvBranch(c, 2, cfg.spk, dtype=dt), (t, batch, hin, hin, cin), 1))
    if depth > 1:
      out.append(
        (f"s{s}.conv", ConvBranch(c, 1, cfg.spk, dtype=dt), (t, batch, h, h, c), depth - 1)
      )
    kw = dict(dtype=dt)
    attn = Attention(att.kind, "grid", att.partition, att.head_dim, float(att.scale), cfg.spk, **kw)
    out.append((f"s{s}.attn", attn, (t, batch, h, h, c), depth))
    out.append((f"s{s}.ffn", FFN(cfg.spk, **kw), (t, batch, h, h, c), depth))
    cin, hin = c, h
  return out


def compile_part(module, shape, device, kernels: str, top: int = 0):
  sharding = jax.sharding.SingleDeviceSharding(device)
  dtype = jnp.bfloat16 if len(shape) == 5 else jnp.float32  # maps in the model; images
  abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
  x = abstract(jax.ShapeDtypeStruct(shape, dtype))

  def init(x):
    with ops.use(kernels):
      return module.init(jax.random.PRNGKey(0), x, train=False)

  variables = jax.tree_util.tree_map(abstract, jax.eval_shape(init, x))

  def split(variables):
    return variables.get("params", {}), {k: v for k, v in variables.items() if k != "params"}

  def forward(params, rest, x):
    with ops.use(kernels):
      return module.apply(
        {"params": params, **rest},
        x,
        train=True,
        mutable=["batch_stats", "spikes"],
        rngs={"dropout": jax.random.PRNGKey(1)},
      )

  def step(variables, x, g):
    params, rest = split(variables)
    y, vjp, updates = jax.vjp(lambda p, x: forward(p, rest, x), params, x, has_aux=True)
    return vjp(g), updates

  # The output's cotangent is an argument (a constant one would let XLA fold the backward).
  g = abstract(jax.eval_shape(lambda v, x: forward(*split(v), x)[0], variables, x))

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(variables, x, g).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  if top:
    for op in hardware.top_ops(compiled.as_text(), top):
      print(
        f"    {op['bytes'] / 2**20:8.1f} MiB  {op['op']:22s} {op['result'][:44]:44s} {op['source']}"
      )
  return {
    "gflop": ca["flops"] / 1e9,
    "gb": ca["bytes accessed"] / 1e9,
    "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
    "compile_s": time.perf_counter() - t0,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="tiny", choices=sorted(spikeatconv.VARIANTS))
  p.add_argument("--spk", default="mbpl", help="SPK kind; none: the spike-free twin")
  p.add_argument("--merge", default="dwconv", help="MBPL merge (dwconv | sum | convnext)")
  p.add_argument("--timesteps", type=int, default=1)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8, help="images per chip")
  p.add_argument("--chip", default="v5e", choices=sorted(hardware.CHIPS))
  p.add_argument("--kernels", default="pallas_tpu", help="hook table (model.kernels)")
  p.add_argument("--top", type=int, default=0, help="list each part's N largest ops by bytes")
  p.add_argument("--parts", default="", help="comma-separated part names (default: all)")
  a = p.parse_args()

  spike_free = a.spk == "none"
  cfg = model_config(
    variant=a.variant,
    timesteps=a.timesteps,
    spk=a.spk,
    attention="softmax" if spike_free else "sisa",
  )
  cfg.spk.mbpl_merge = a.merge
  device = hardware.topology_devices(f"{a.chip}:1x1")[0]
  wanted = set(filter(None, a.parts.split(",")))
  rows = []
  for name, module, shape, count in parts(cfg, a.image_size, a.batch):
    if wanted and name not in wanted:
      continue
    r = compile_part(module, shape, device, a.kernels, a.top)
    r.update(name=name, count=count, shape=list(shape))
    r["gb_per_image_total"] = r["gb"] * count / a.batch
    r["gflop_per_image_total"] = r["gflop"] * count / a.batch
    rows.append(r)
    print(
      f"{name:10s} x{count:<2d} {str(tuple(shape)):28s} {r['gflop'] / a.batch:8.3f} GFLOP/img "
      f"{r['gb'] / a.batch * 1e3:8.1f} MB/img  -> {r['gb_per_image_total'] * 1e3:8.1f} MB/img "
      f"in the model  (compile {r['compile_s']:.1f} s)",
      flush=True,
    )
  total_gb = sum(r["gb_per_image_total"] for r in rows)
  total_gf = sum(r["gflop_per_image_total"] for r in rows)
  print(f"{'sum':10s} {'':31s} {total_gf:8.3f} GFLOP/img {total_gb * 1e3:8.1f} MB/img")
  print(
    json.dumps(dict(vars(a), parts_measured=rows, gb_per_image=total_gb, gflop_per_image=total_gf))
  )


if __name__ == "__main__":
  main()
