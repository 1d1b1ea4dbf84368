"""The training input pipeline across an epoch boundary, on a ~300k-record local dataset.

  .venv/bin/python benchmarks/input.py [--records 300000] [--batch 256] [--workdir DIR]

Writes once (about a minute) a tfds dataset `input_benchmark_mock` of small 16x16 PNGs spread
over 64 TFRecord files, then runs `pipeline.train_dataset` with ImageNet's shuffle buffer
(250 000 records, no in-memory cache) from step 0 into the second epoch, timing every batch,
and once more from a step 80 % into the first epoch (a resume). Reports:

* first_batch_s: from building the dataset to the first batch (the first shuffle fill);
* epoch_gap_s: the longest gap between two batches within 10 batches of the epoch boundary;
* max_gap_s: the longest gap between two batches anywhere after the first, and after which
  batch (the epoch boundary is at batch records // batch);
* steady img/s and img/s per core: images over the batches of the first epoch away from both
  ends, per wall-clock second, then divided by os.cpu_count();
* resume_first_batch_s: to the first batch when starting at that mid-epoch step.

The pp string is the default run's (`decode(1)|flip_lr|normalize('fashion_mnist')`), so the
figures are the pipeline's own costs (reading, shuffling, decoding, batching), not a model's.

With ``--imagenet-seconds S`` it also runs the host part of configs/imagenet.py's pp_train
(fused JPEG decode + inception crop 224 bicubic, flip, AutoAugment; normalize and random
erasing run on the device) for S seconds on synthetic 400x350 JPEGs, prepared once through
tfds' `imagenet2012` builder from synthetic ILSVRC2012 tars, and reports its img/s per core.
Other jobs on the machine slow everything alike; the gaps compare against the steady batch
time of the same run. Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

from spikeatconv_jax.data import pipeline  # noqa: E402

PP_TRAIN = "decode(1)|flip_lr|normalize('fashion_mnist')"
SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")
SHUFFLE_BUFFER = 250_000  # configs/imagenet.py
NUM_FILES = 64


class InputBenchmarkMock(tfds.core.GeneratorBasedBuilder):
  """Small grey PNGs with 10 labels; the record count comes from the `RECORDS` class field."""

  VERSION = tfds.core.Version("1.0.0")
  RECORDS = 300_000

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(16, 16, 1)),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.RandomState(0)
    pngs = []
    for _ in range(256):  # encoded once; records cycle through them
      buf = io.BytesIO()
      Image.fromarray(rng.randint(0, 255, (16, 16)).astype(np.uint8)).save(buf, format="PNG")
      pngs.append(buf.getvalue())
    for i in range(self.RECORDS):
      yield i, {"image": io.BytesIO(pngs[i % 256]), "label": i % 10}


def prepare(workdir: str, records: int):
  data_dir = os.path.join(workdir, f"tfds_{records}")
  InputBenchmarkMock.RECORDS = records
  builder = tfds.builder("input_benchmark_mock", data_dir=data_dir)
  if not builder.is_prepared():
    t0 = time.perf_counter()
    tfds.display_progress_bar(False)
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line and the table only
      config = tfds.download.DownloadConfig(num_shards=NUM_FILES)
      builder.download_and_prepare(download_config=config)
    print(f"wrote {records} records in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
  return pipeline.dataset_config(
    "input_benchmark_mock",
    data_dir=data_dir,
    pp_train=PP_TRAIN,
    pp_eval=PP_TRAIN,
    shuffle_buffer=SHUFFLE_BUFFER,
    cache=False,
  )


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


def make_imagenet(workdir: str, per_class: int = 128, num_val: int = 16):
  """Synthetic ILSVRC2012 tars in workdir/manual, prepared with tfds into workdir/tfds."""
  from configs import imagenet

  cfg = imagenet.get_config().dataset
  cfg.update(
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
  with contextlib.redirect_stdout(sys.stderr):
    pipeline.prepare(cfg)
  return cfg


def imagenet_rate(workdir: str, seconds: float, batch: int = 64) -> float:
  """Images per second of the ImageNet train pipeline after a 3-batch warm-up."""
  it = iter(pipeline.train_dataset(make_imagenet(workdir), batch_size=batch, seed=0))
  for _ in range(3):
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return n * batch / (time.perf_counter() - t0)


def batch_times(cfg, batch: int, num_batches: int, start_step: int = 0) -> np.ndarray:
  """Seconds from building the dataset to each of `num_batches` batches."""
  t0 = time.perf_counter()
  it = iter(pipeline.train_dataset(cfg, batch_size=batch, seed=0, start_step=start_step))
  times = []
  for _ in range(num_batches):
    next(it)
    times.append(time.perf_counter() - t0)
  return np.asarray(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=300_000)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--workdir", default="/tmp/spikeatconv_input_bench")
  parser.add_argument("--imagenet-seconds", type=float, default=0.0)
  args = parser.parse_args()
  cfg = prepare(args.workdir, args.records)
  steps_per_epoch = args.records // args.batch
  boundary = args.records // args.batch  # the batch holding the first records of epoch 2
  times = batch_times(cfg, args.batch, boundary + 20)
  gaps = np.diff(times)  # gaps[i]: between batch i and i + 1
  around = gaps[boundary - 10 : boundary + 10]
  lo, hi = 20, steps_per_epoch - 20
  steady = (hi - lo) * args.batch / (times[hi] - times[lo])
  resume_step = int(0.8 * steps_per_epoch)
  resume = batch_times(cfg, args.batch, 1, start_step=resume_step)[0]
  cores = os.cpu_count()
  result = dict(
    benchmark="input",
    records=args.records,
    files=NUM_FILES,
    batch=args.batch,
    shuffle_buffer=SHUFFLE_BUFFER,
    cpu_count=cores,
    load_avg_1m=round(os.getloadavg()[0], 1),
    first_batch_s=round(float(times[0]), 2),
    epoch_gap_s=round(float(around.max()), 3),
    median_gap_s=round(float(np.median(gaps)), 4),
    max_gap_s=round(float(gaps.max()), 3),
    max_gap_after_batch=int(np.argmax(gaps)),
    steady_images_per_s=round(float(steady), 1),
    steady_images_per_s_per_core=round(float(steady) / cores, 1),
    resume_step=resume_step,
    resume_first_batch_s=round(float(resume), 2),
  )
  if args.imagenet_seconds > 0:
    rate = imagenet_rate(args.workdir, args.imagenet_seconds)
    result["imagenet_train_images_per_s_per_core"] = round(rate / cores, 1)
  print(json.dumps(result))
  print(f"\n{args.records} records in {NUM_FILES} files, batch {args.batch}, shuffle buffer "
        f"{SHUFFLE_BUFFER}, {cores} cores, load {result['load_avg_1m']}")  # fmt: skip
  rows = [
    ("first batch (s)", result["first_batch_s"]),
    ("longest gap at the epoch boundary (s)", result["epoch_gap_s"]),
    ("median gap between batches (s)", result["median_gap_s"]),
    ("longest gap after the first batch (s)", result["max_gap_s"]),
    ("... after batch", result["max_gap_after_batch"]),
    ("steady img/s", result["steady_images_per_s"]),
    ("steady img/s per core", result["steady_images_per_s_per_core"]),
    (f"first batch resuming at step {resume_step} (s)", result["resume_first_batch_s"]),
  ]
  if "imagenet_train_images_per_s_per_core" in result:
    rows.append(("ImageNet train img/s per core", result["imagenet_train_images_per_s_per_core"]))
  for name, value in rows:
    print(f"{name:45s} {value:>10}")


if __name__ == "__main__":
  main()
