"""`fashion_mnist_local`: Fashion-MNIST prepared from the IDX files on disk, no network.

Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files under
``/usr/share/datasets/fashion-mnist``; any other directory holding the same four files works
too (pass it as ``manual_dir`` in the download config, which is what the pipeline does with
``config.dataset.source_dir``). The resulting dataset matches tfds' ``fashion_mnist``: splits
"train" (60k) and "test" (10k), features image (28, 28, 1) uint8 and label ClassLabel(10).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"

# The IDX file names used by the original release and by the Debian package.
_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_LABEL_NAMES = [
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IDX_UBYTE = 0x08  # IDX element type code for unsigned bytes.


def missing_source_message(source_dir: str) -> str:
  files = ", ".join(f for pair in _FILES.values() for f in pair)
  return (
    f"Fashion-MNIST IDX files not found in {source_dir!r} (need {files}). Install them with "
    "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
    f"{DEFAULT_SOURCE_DIR}), or point config.dataset.source_dir at a directory holding them."
  )


def read_idx(path: str) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file into a uint8 array of its declared shape.

  Raises:
    ValueError: if the file is not a well-formed unsigned-byte IDX file.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic)")
  if data[2] != _IDX_UBYTE:
    raise ValueError(f"{path}: IDX element type {data[2]:#x}, expected unsigned byte (0x08)")
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
  body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f"{path}: {body.size} bytes of data, header says shape {shape}")
  return body.reshape(shape)


def _resolve_source_dir(dl_manager) -> str:
  """The manual_dir of the download config; the Debian directory when none was given.

  tfds substitutes ``<data_dir>/downloads/manual`` when the caller gives no manual_dir; only in
  that case (and when that directory is absent) do we fall back to `DEFAULT_SOURCE_DIR`. A
  directory the caller named is never silently replaced by another one.
  """
  configured = getattr(dl_manager, "_manual_dir", None)
  if configured is None:
    return DEFAULT_SOURCE_DIR
  configured = os.fspath(configured)
  is_tfds_default = os.path.normpath(configured).endswith(os.path.join("downloads", "manual"))
  if is_tfds_default and not os.path.isdir(configured):
    return DEFAULT_SOURCE_DIR
  return configured


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files (registered with tfds as "fashion_mnist_local")."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prepared from the local IDX files (Debian dataset-fashion-mnist)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Install Debian's dataset-fashion-mnist (`sudo apt-get install dataset-fashion-mnist`), "
    f"which puts the four IDX .gz files in {DEFAULT_SOURCE_DIR}, or pass a directory with "
    "those files as manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(28, 28, 1)),
          "label": tfds.features.ClassLabel(names=_LABEL_NAMES),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    # Reads only local files: no dl_manager.download call, so nothing touches the network.
    source_dir = _resolve_source_dir(dl_manager)
    paths = {
      split: tuple(os.path.join(source_dir, f) for f in files) for split, files in _FILES.items()
    }
    if not all(os.path.isfile(p) for pair in paths.values() for p in pair):
      raise FileNotFoundError(missing_source_message(source_dir))
    return {split: self._generate_examples(*pair) for split, pair in paths.items()}

  def _generate_examples(self, images_path: str, labels_path: str):
    images = read_idx(images_path)  # [N, 28, 28]
    labels = read_idx(labels_path)  # [N]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise ValueError(f"{images_path}: image shape {images.shape}, expected [N, 28, 28]")
    if labels.shape != (images.shape[0],):
      raise ValueError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.max(initial=0) >= len(_LABEL_NAMES):
      raise ValueError(f"{labels_path}: label {labels.max()} out of range [0, 10)")
    for i in range(images.shape[0]):
      yield i, {"image": images[i][:, :, None], "label": int(labels[i])}
