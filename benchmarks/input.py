"""Input-pipeline throughput (images/s) of each preset pipeline on this machine's CPUs.

  .venv/bin/python benchmarks/input.py [--seconds 20] [--workdir /tmp/spikeatconv_input_bench]

Pipelines (all run `spikeatconv_jax.data.pipeline` end to end unless noted):
* imagenet_train: the ImageNet preset pp_train (fused JPEG decode + inception crop 224 bicubic,
  flip, AutoAugment ImageNet policy, normalise, random erase 0.25) through tfds'
  `imagenet2012` builder, prepared from synthetic ILSVRC2012 tars of 400x350 JPEGs.
* imagenet_eval: the ImageNet preset pp_eval (decode, resize shorter side 235 bicubic,
  centre crop 224, normalise) on the same data.
* cifar_train: the CIFAR-100 preset pp_train (flip, rotate ±30°, shear ±10°, normalise) on
  synthetic 32x32 PNGs held in memory (no CIFAR-100 files here), same tf.data structure.
* fashion_mnist_train: the default run's pipeline on the real Fashion-MNIST (prepared from the
  IDX files), if /usr/share/datasets/fashion-mnist exists.

Prints one JSON line, then a table. img/s/core divides wall-clock throughput by os.cpu_count();
img/cpu-s divides by the CPU time this process used (threads included), i.e. what one fully
available core delivers. When other jobs share the CPU, the first understates the pipeline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from spikeatconv_jax.data import pipeline  # noqa: E402
from spikeatconv_jax.data.builders import fashion_mnist  # noqa: E402

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")


def _jpeg(rng, width=400, height=350):
  # Smooth gradients plus noise compress like photos (tens of KB), unlike pure noise.
  yy, xx = np.mgrid[0:height, 0:width]
  phase = rng.uniform(0, 6.28, 3)
  base = 127 + 100 * np.sin(xx[..., None] / rng.uniform(20, 80) + yy[..., None] / 50 + phase)
  image = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_imagenet(workdir: str, per_class: int = 128, num_val: int = 256):
  """Synthetic ILSVRC2012 tars in workdir/manual, prepared with tfds into workdir/tfds."""
  cfg = pipeline.dataset_config(
    "imagenet2012",
    data_dir=os.path.join(workdir, "tfds"),
    source_dir=os.path.join(workdir, "manual"),
    shuffle_buffer=1024,
  )
  manual = cfg.source_dir
  if not os.path.exists(os.path.join(manual, "ILSVRC2012_img_val.tar")):
    os.makedirs(manual, exist_ok=True)
    rng = np.random.RandomState(0)
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "w") as train:
      for synset in SYNSETS:
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as class_tar:
          for i in range(per_class):
            _add(class_tar, f"{synset}_{i}.JPEG", _jpeg(rng))
        _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar.tmp"), "w") as val:
      for i in range(1, num_val + 1):
        _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng))
    os.rename(
      os.path.join(manual, "ILSVRC2012_img_val.tar.tmp"),
      os.path.join(manual, "ILSVRC2012_img_val.tar"),
    )
  pipeline.prepare(cfg)
  return cfg


def cifar_dataset(batch_size: int) -> tf.data.Dataset:
  """The CIFAR-100 preset pp_train over synthetic in-memory PNGs, pipeline-shaped."""
  rng = np.random.RandomState(0)
  pngs = []
  for _ in range(512):
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (32, 32, 3)).astype(np.uint8)).save(buf, format="PNG")
    pngs.append(buf.getvalue())
  cfg = pipeline.dataset_config("cifar100")
  prep = pipeline._prep_fn(cfg.pp_train)
  ds = tf.data.Dataset.from_tensor_slices({"image": pngs, "label": np.arange(512) % 100})
  ds = ds.repeat().enumerate().map(lambda i, ex: (pipeline._key(0, 0, i), ex))
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)
  return ds.prefetch(2).with_options(pipeline._options())


def measure(ds: tf.data.Dataset, batch_size: int, seconds: float):
  """Throughput of iterating `ds` for about `seconds` after a warm-up.

  Returns:
    (images per wall-clock second, images per CPU-second of this process, warm-up seconds).
    The second is what one fully available core delivers; on a CPU shared with other jobs
    it is the fairer per-core figure (wall-clock throughput also counts time the scheduler
    gave to others).
  """
  it = iter(ds)
  t0 = time.perf_counter()
  for _ in range(3):  # trace, fill the shuffle buffer and the autotuner
    next(it)
  warmup = time.perf_counter() - t0
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return n * batch_size / wall, n * batch_size / cpu, warmup


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--workdir", default="/tmp/spikeatconv_input_bench")
  parser.add_argument("--only", default="", help="comma-separated subset of pipelines")
  args = parser.parse_args()
  only = set(filter(None, args.only.split(",")))
  cores = os.cpu_count()
  rows = []

  def record(name, ds, batch, pp):
    if only and name not in only:
      return
    rate, per_cpu_s, warmup = measure(ds, batch, args.seconds)
    rows.append(
      dict(
        pipeline=name,
        batch=batch,
        images_per_s=round(rate, 1),
        images_per_s_per_core=round(rate / cores, 1),
        images_per_cpu_s=round(per_cpu_s, 1),
        warmup_s=round(warmup, 1),
        pp=pp,
      )
    )

  if not only or only & {"imagenet_train", "imagenet_eval"}:
    cfg = make_imagenet(args.workdir)
    record(
      "imagenet_train",
      pipeline.train_dataset(cfg, batch_size=64, seed=0),
      64,
      cfg.pp_train,
    )
    record(
      "imagenet_eval",
      pipeline.eval_dataset(cfg, split="validation", batch_size=64).repeat(),
      64,
      cfg.pp_eval,
    )
  record("cifar_train", cifar_dataset(256), 256, pipeline.dataset_config("cifar100").pp_train)
  if os.path.isdir(fashion_mnist.DEFAULT_SOURCE_DIR) and (
    not only or "fashion_mnist_train" in only
  ):
    cfg = pipeline.dataset_config(
      "fashion_mnist_local", data_dir=os.path.join(args.workdir, "tfds")
    )
    record("fashion_mnist_train", pipeline.train_dataset(cfg, batch_size=256, seed=0), 256,
           cfg.pp_train)  # fmt: skip

  print(
    json.dumps(
      dict(benchmark="input", cpu_count=cores, load_avg_1m=os.getloadavg()[0], results=rows)
    )
  )
  load = os.getloadavg()[0]
  print(f"\n{cores} cores, load average {load:.1f} at the end (other jobs share the CPU)")
  print(f"{'pipeline':20s} {'batch':>5s} {'img/s':>8s} {'img/s/core':>10s} {'img/cpu-s':>9s} "
        f"{'warm-up s':>9s}")  # fmt: skip
  for r in rows:
    print(
      f"{r['pipeline']:20s} {r['batch']:5d} {r['images_per_s']:8.1f} "
      f"{r['images_per_s_per_core']:10.1f} {r['images_per_cpu_s']:9.1f} {r['warmup_s']:9.1f}"
    )


if __name__ == "__main__":
  main()
