"""A tiny trained workdir shared by the tests of loading, predicting, exporting and plotting.

Trained once per pytest run (under pytest's base temp directory), on Fashion-MNIST from
/usr/share/datasets/fashion-mnist when it is installed, else on the synthetic IDX files of
train_utils (same builder, same pipeline). Nano MBPL with the sum merge at 28 px, as
configs/default.py, for 40 steps.
"""

from __future__ import annotations

import os

import numpy as np
import train_utils

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
PP_EVAL = "decode(1)|normalize('fashion_mnist')"


def real_fmnist() -> bool:
  return os.path.exists(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"))


def config(root: str):
  overrides = {
    "dataset.image_size": 28,
    "dataset.pp_train": "decode(1)|flip_lr|normalize('fashion_mnist')",
    "dataset.pp_eval": PP_EVAL,
    "dataset.train_split": "train[:640]",
    "dataset.eval_split": "test[:32]",
    "model.spk.kind": "mbpl",
    "model.spk.thresholds": (0.2, 1.0, 2.0, 4.0),
    "model.spk.mbpl_merge": "sum",
    "model.attention.partition": 7,
    # Enough steps for the BatchNorm running statistics (momentum 0.9) to settle: eval-mode
    # outputs then differ from image to image.
    "batch_size": 16,
    "total_steps": 40,
    "checkpoint_every_steps": 20,
  }
  if real_fmnist():
    overrides.update({"dataset.data_dir": None, "dataset.source_dir": FMNIST_DIR})
  return train_utils.tiny_config(root, **overrides)


def trained_workdir(tmp_path_factory) -> str:
  """The workdir of a 40-step run (checkpoints at steps 20 and 40), trained on first use."""
  from spikeatconv_jax.train import loop

  root = str(tmp_path_factory.getbasetemp() / "inference_run")
  workdir = os.path.join(root, "run")
  if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
    train_utils.enable_compile_cache()
    loop.train_and_evaluate(config(root), workdir)
  return workdir


def test_images(cfg, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The examples of "test[:n]" in the eval pipeline's order: uint8 [n, 28, 28, 1], labels.

  Read through tfds as the pipeline reads them (one file, stored order), which is not the
  order of the IDX files: tfds shuffles examples when it writes a split.
  """
  import tensorflow_datasets as tfds

  from spikeatconv_jax.data import pipeline

  builder = pipeline.get_builder(cfg.dataset)
  ds = builder.as_dataset(
    split=f"test[:{n}]",
    shuffle_files=False,
    read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
  )
  rows = list(tfds.as_numpy(ds))
  return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W] or [H, W, C] image as PNG (TensorFlow's encoder)."""
  import tensorflow as tf

  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  with open(path, "wb") as f:
    f.write(tf.io.encode_png(image).numpy())
