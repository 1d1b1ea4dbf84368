"""ImageNet from tiny ILSVRC2012 tars, and the configs' pipelines end to end under mock_data."""

import io
import os
import tarfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import cifar100_resnet18, imagenet
from spikeatconv_jax.data import pipeline

SYNSETS = ("n01440764", "n01443537")  # the first two classes of tfds' labels.txt


def _jpeg(seed, size=(64, 48)):
  rng = np.random.RandomState(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)).save(
    buf, format="JPEG"
  )
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_imagenet_tars(manual_dir, per_class=3, num_val=4):
  """ILSVRC2012_img_train.tar (a tar of per-synset tars of JPEGs) and ILSVRC2012_img_val.tar.

  The tfds builder labels validation images by zipping their sorted file names with its own
  validation_labels.txt, so the val tar holds the first `num_val` official file names.
  """
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for c, synset in enumerate(SYNSETS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for i in range(per_class):
          _add(class_tar, f"{synset}_{i}.JPEG", _jpeg(c * 100 + i))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(1, num_val + 1):
      _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(1000 + i, (50, 70)))
  return manual_dir


def _mesh_sharding():
  mesh = jax.make_mesh((8,), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _dataset(config_module, **fields):
  cfg = config_module.get_config().dataset
  cfg.update(fields)
  return cfg


def test_imagenet_prepares_from_manual_tars_and_reads_back(tmp_path):
  manual = make_imagenet_tars(str(tmp_path / "manual"))
  cfg = _dataset(imagenet, data_dir=str(tmp_path / "tfds"), source_dir=manual, shuffle_buffer=8)
  with pytest.raises(FileNotFoundError, match="docs/DATA.md"):
    pipeline.num_examples(cfg, "train")  # not prepared yet: a clear error, no download
  pipeline.prepare(cfg)
  assert pipeline.num_examples(cfg, "train") == 6
  assert pipeline.num_examples(cfg, "validation") == 4

  builder = pipeline.get_builder(cfg)
  names = builder.info.features["label"].names
  val_labels_file = os.path.join(
    os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "validation_labels.txt"
  )
  with open(val_labels_file) as f:
    want_val = [names.index(s) for s in f.read().split()[:4]]

  train = next(iter(pipeline.train_dataset(cfg, batch_size=6, seed=0)))
  assert train["image"].shape == (6, 224, 224, 3) and train["image"].dtype == np.uint8
  assert sorted(train["label"].numpy().tolist()) == [0, 0, 0, 1, 1, 1]

  batches = list(pipeline.eval_dataset(cfg, split="validation", batch_size=3))
  assert len(batches) == 2
  assert [b["image"].shape for b in batches] == [(3, 224, 224, 3)] * 2
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  # tfds stores examples in hashed-key order; the pipeline's labels are the official ones.
  labels = np.concatenate([b["label"] for b in batches])[:4]
  assert sorted(labels.tolist()) == sorted(want_val)
  stored = {
    ex["file_name"].decode(): int(ex["label"])
    for ex in tfds.as_numpy(builder.as_dataset(split="validation"))
  }
  assert stored == {f"ILSVRC2012_val_{i + 1:08d}.JPEG": want_val[i] for i in range(4)}


@pytest.mark.parametrize("config_module,size,eval_split", [
  (cifar100_resnet18, 32, "test"),
  (imagenet, 224, "validation"),
])  # fmt: skip
def test_configs_end_to_end_under_mock_data(tmp_path, config_module, size, eval_split):
  cfg = _dataset(config_module, data_dir=str(tmp_path), shuffle_buffer=16)
  sharding = _mesh_sharding()
  with tfds.testing.mock_data(num_examples=12):
    it = pipeline.train_iterator(cfg, global_batch_size=8, sharding=sharding, seed=0)
    for _ in range(2):  # crosses the epoch boundary (12 examples)
      batch = next(it)
      assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.uint8
      assert batch["label"].dtype == np.int32
      assert 0 <= int(batch["label"].min()) and int(batch["label"].max()) < cfg.num_classes
      assert np.isfinite(np.asarray(batch["image"])).all()
    batches = list(
      pipeline.eval_iterator(cfg, split=eval_split, global_batch_size=8, sharding=sharding)
    )
    assert len(batches) == 2
    assert float(sum(b["mask"].sum() for b in batches)) == 12
    # Normalised on the device: roughly zero mean, unit scale.
    image = np.asarray(batches[0]["image"])
    assert image.dtype == np.float32
    assert -3 < image.mean() < 3 and image.std() < 3
