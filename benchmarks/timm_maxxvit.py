r"""PyTorch peer: timm's MaxxViT-V2 train step on CPU (run in a separate environment).

Not a test dependency. Set up once, outside the project's .venv:

  python3 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
  /work/torchvenv/bin/python benchmarks/timm_maxxvit.py --model maxxvitv2_tiny --threads 2

`maxxvitv2_tiny` is timm's MaxxViT-V2 (ConvNeXt block + grid attention only, relative-position
bias table, LayerScale 1e-6) built with the `tiny` dims and depths of DESIGN.md §7 (64/128/256/512,
1/3/6/1, stem 32/64): the spike-free architecture of SpikeAtConv tiny. `maxvit_tiny_tf_224` is
timm's registered MaxViT-T. Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import timm
import torch
from timm.models import maxxvit

# xla_cpu.malloc is stdlib-only, so the PyTorch environment can import it from the repo.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spikeatconv_jax.xla_cpu.malloc import in_use as allocator_in_use  # noqa: E402


def build(name: str, num_classes: int) -> torch.nn.Module:
  if name == "maxxvitv2_tiny":
    cfg = maxxvit.MaxxVitCfg(
      embed_dim=(64, 128, 256, 512),
      depths=(1, 3, 6, 1),
      block_type=("M",) * 4,
      stem_width=(32, 64),
      **maxxvit._next_cfg(no_block_attn=True, rel_pos_type="bias"),
    )
    return maxxvit.MaxxVit(cfg, img_size=224, num_classes=num_classes)
  return timm.create_model(name, num_classes=num_classes)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="maxxvitv2_tiny")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = build(args.model, 1000).train()
  params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  x = torch.randn(args.batch, 3, args.size, args.size)
  y = torch.randint(0, 1000, (args.batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  out = dict(
    bench="timm_train_step",
    model=args.model,
    params_m=round(params / 1e6, 2),
    batch=args.batch,
    size=args.size,
    threads=args.threads,
    torch=torch.__version__,
    timm=timm.__version__,
    step_s=round(med, 3),
    images_per_s=round(args.batch / med, 3),
    allocator=allocator_in_use(),  # inherited LD_PRELOAD
  )
  print(json.dumps(out))
  print(f"{'model':<22} {'params(M)':>9} {'step(s)':>8} {'img/s':>7}")
  print(f"{args.model:<22} {out['params_m']:>9} {out['step_s']:>8} {out['images_per_s']:>7}")


if __name__ == "__main__":
  main()
