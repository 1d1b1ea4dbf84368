"""Tests of the tf.data pipeline: builder, per-process splits, resume, eval padding."""

import gzip
import os
import struct
import threading

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from spikeatconv_jax.data import ops, pipeline
from spikeatconv_jax.data.builders import fashion_mnist

N_TRAIN, N_TEST = 50, 21


def write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(directory, n_train=N_TRAIN, n_test=N_TEST):
  """Synthetic Fashion-MNIST IDX files whose pixel (0, 0)/(0, 1) encode the example id."""
  os.makedirs(directory, exist_ok=True)
  for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 1000)):
    ids = np.arange(n) + offset
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = ids % 256
    images[:, 0, 1] = ids // 256
    images[:, 5:20, 5:20] = (ids[:, None, None] * 7) % 256
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), ids % 10)
  return directory


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("fmnist")
  source = make_idx_dir(str(root / "idx"))
  return pipeline.dataset_config(
    "fashion_mnist_local",
    data_dir=str(root / "tfds"),
    source_dir=source,
    shuffle_buffer=16,
    # Raw pixels out, so the example id can be read back from pixel (2, 2)/(2, 3) after pad(2).
    pp_train="decode(1)|pad(2)",
    pp_eval="decode(1)|pad(2)",
  )


def ids_of(images):
  images = np.asarray(images).astype(int)
  return (images[..., 2, 2, 0] + 256 * images[..., 2, 3, 0]).astype(int)


def stream_ids(ds, steps):
  return np.stack([ids_of(b["image"]) for b in ds.take(steps).as_numpy_iterator()])


def test_builder_prepares_synthetic_idx(cfg):
  builder = pipeline.get_builder(cfg)
  assert builder.info.splits["train"].num_examples == N_TRAIN
  assert pipeline.num_examples(cfg, "test") == N_TEST
  assert builder.info.features["image"].shape == (28, 28, 1)
  assert builder.info.features["label"].num_classes == 10
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False))))
  assert ex["image"].dtype == np.uint8 and ex["label"] == ex["image"][0, 0, 0] % 10


def test_missing_source_dir_is_a_clear_error(tmp_path):
  bad = pipeline.dataset_config(
    "fashion_mnist_local", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "nope")
  )
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    pipeline.get_builder(bad)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "README").write_text("not the IDX files")
  bad.source_dir = str(empty)
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    pipeline.get_builder(bad)


def test_unprepared_dataset_is_a_clear_error(tmp_path):
  cfg = pipeline.dataset_config("cifar100", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="never downloads"):
    pipeline.num_examples(cfg, "train")


def test_concurrent_prepare_is_safe(tmp_path):
  source = make_idx_dir(str(tmp_path / "idx"), 12, 5)
  cfg = pipeline.dataset_config(
    "fashion_mnist_local", data_dir=str(tmp_path / "tfds"), source_dir=source
  )
  errors = []

  def run():
    try:
      pipeline.prepare(cfg)
    except Exception as e:  # noqa: BLE001  (collected and re-raised in the test thread)
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert pipeline.num_examples(cfg, "train") == 12


def test_real_fashion_mnist_files():
  if not os.path.isdir(fashion_mnist.DEFAULT_SOURCE_DIR):
    pytest.skip(
      f"{fashion_mnist.DEFAULT_SOURCE_DIR} absent (apt-get install dataset-fashion-mnist)"
    )
  d = fashion_mnist.DEFAULT_SOURCE_DIR
  images = fashion_mnist.read_idx(os.path.join(d, "train-images-idx3-ubyte.gz"))
  labels = fashion_mnist.read_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"))
  assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6000))
  test_images = fashion_mnist.read_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
  assert test_images.shape == (10_000, 28, 28)


def test_real_fashion_mnist_prepares(tmp_path):
  if not os.path.isdir(fashion_mnist.DEFAULT_SOURCE_DIR):
    pytest.skip(
      f"{fashion_mnist.DEFAULT_SOURCE_DIR} absent (apt-get install dataset-fashion-mnist)"
    )
  # A full prepare takes ~45 s on 2 cores; the first 300 examples per split exercise the same
  # reading code on the real files.
  builder = tfds.builder("fashion_mnist_local", data_dir=str(tmp_path))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=fashion_mnist.DEFAULT_SOURCE_DIR, max_examples_per_split=300
    )
  )
  assert builder.info.splits["train"].num_examples == 300
  assert builder.info.splits["test"].num_examples == 300
  labels = fashion_mnist.read_idx(
    os.path.join(fashion_mnist.DEFAULT_SOURCE_DIR, "train-labels-idx1-ubyte.gz")
  )
  got = [int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split="train"))]
  assert sorted(got) == sorted(labels[:300].tolist())


@pytest.mark.parametrize("cache", [True, False])
def test_train_stream_shapes_and_epochs(cfg, cache):
  ds = pipeline.train_dataset(
    pipeline.dataset_config(**{**cfg.to_dict(), "cache": cache}), batch_size=10, seed=0
  )
  ids = stream_ids(ds, 10)  # 100 elements = 2 epochs of 50
  assert ids.shape == (10, 10)
  flat = ids.reshape(-1)
  # Every epoch is a permutation of the split; the two epochs are shuffled differently.
  assert sorted(flat[:50]) == list(range(N_TRAIN))
  assert sorted(flat[50:]) == list(range(N_TRAIN))
  assert not np.array_equal(flat[:50], flat[50:])
  assert not np.array_equal(flat[:50], np.arange(N_TRAIN))


def test_train_stream_is_deterministic_in_seed(cfg):
  a = stream_ids(pipeline.train_dataset(cfg, batch_size=8, seed=3), 8)
  b = stream_ids(pipeline.train_dataset(cfg, batch_size=8, seed=3), 8)
  c = stream_ids(pipeline.train_dataset(cfg, batch_size=8, seed=4), 8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("start_step", [1, 6, 13])
def test_resume_equals_continuing_stream(cfg, start_step, cache):
  # Random augmentations included: the resumed batches must be bit-identical.
  aug = pipeline.dataset_config(**{**cfg.to_dict(), "cache": cache})
  aug.pp_train = "decode(1)|random_crop(32, pad=2)|flip_lr|normalize('fashion_mnist')"
  full = list(pipeline.train_dataset(aug, batch_size=8, seed=1).take(20).as_numpy_iterator())
  resumed = pipeline.train_dataset(aug, batch_size=8, seed=1, start_step=start_step)
  for want, got in zip(full[start_step:], resumed.as_numpy_iterator(), strict=False):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


def test_two_process_split_disjoint_and_complete(cfg):
  per_process = []
  for pi in range(2):
    n = pipeline.num_examples(cfg, pipeline._process_split("train", pi, 2))
    ds = pipeline.train_dataset(cfg, batch_size=5, seed=0, process_index=pi, process_count=2)
    per_process.append(set(stream_ids(ds, n // 5).reshape(-1)))
    assert len(per_process[-1]) == n  # one epoch of the shard, no repeats
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == set(range(N_TRAIN))


@pytest.mark.parametrize("process_count,batch", [(1, 4), (2, 4), (3, 8)])
def test_eval_covers_each_example_once(cfg, process_count, batch):
  seen, num_batches = [], set()
  for pi in range(process_count):
    ds = pipeline.eval_dataset(
      cfg, split="test", batch_size=batch, process_index=pi, process_count=process_count
    )
    batches = list(ds.as_numpy_iterator())
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape == (batch, 32, 32, 1) and b["mask"].dtype == np.float32
      ids = ids_of(b["image"])
      seen += ids[b["mask"] == 1].tolist()
      # Padding is all-zero and masked out.
      assert not b["image"][b["mask"] == 0].any()
  assert len(num_batches) == 1  # the same number of batches on every process
  assert sorted(seen) == list(range(1000, 1000 + N_TEST))


def test_public_iterators_give_global_arrays(cfg):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  train = pipeline.dataset_config(**{**cfg.to_dict(), "pp_train": cfg.pp_train})
  train.pp_train = "decode(1)|pad(2)|random_crop(32, pad=2)|flip_lr|normalize('fashion_mnist')"
  it = pipeline.train_iterator(train, global_batch_size=16, sharding=sharding, seed=0)
  batch = next(it)
  assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].sharding.is_equivalent_to(sharding, 4)
  assert len(batch["label"].addressable_shards) == 8
  batches = list(pipeline.eval_iterator(cfg, split="test", global_batch_size=8, sharding=sharding))
  assert len(batches) == 3
  assert float(sum(b["mask"].sum() for b in batches)) == N_TEST


def test_batch_size_errors(cfg):
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with pytest.raises(ValueError, match="does not divide"):
    pipeline.train_iterator(cfg, global_batch_size=12, sharding=sharding, seed=0)
  with pytest.raises(ValueError, match="does not divide"):
    pipeline.eval_iterator(cfg, split="test", global_batch_size=12, sharding=sharding)
  bad_op = pipeline.dataset_config(**{**cfg.to_dict(), "pp_train": "decode|nope"})
  with pytest.raises(ValueError, match="unknown preprocessing op 'nope'"):
    pipeline.train_iterator(bad_op, global_batch_size=8, sharding=sharding, seed=0)
  with pytest.raises(ValueError, match="processes"):
    pipeline._check_batch(10, 4)
  # 16 processes (simulated) with the 8-device batch sharding: 1 example per process, but
  # each device shard holds 2, so a process's local devices cannot split its batch.
  with pytest.raises(ValueError, match="per-process batch 1"):
    pipeline._check_batch(16, 16, sharding)
  image_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  assert pipeline._check_batch(16, 2, image_sharding) == 8
  with pytest.raises(ValueError, match="unknown dataset config"):
    pipeline.dataset_config("fashion_mnist_local", batch_size=3)


# A split spread over 10 files, so that shuffle windows (about `shuffle_buffer` = 20 records,
# one file here) and parallel file reads are exercised.
N_SHARDED = 200


@pytest.fixture(scope="module")
def sharded_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("fmnist_sharded")
  source = make_idx_dir(str(root / "idx"), n_train=N_SHARDED, n_test=10)
  builder = tfds.builder("fashion_mnist_local", data_dir=str(root / "tfds"))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=source, num_shards=10)
  )
  assert len(builder.info.splits["train"].file_instructions) == 10
  return pipeline.dataset_config(
    "fashion_mnist_local",
    data_dir=str(root / "tfds"),
    source_dir=source,
    shuffle_buffer=20,
    pp_train="decode(1)|pad(2)",
    pp_eval="decode(1)|pad(2)",
  )


def test_sharded_epochs_are_permutations(sharded_cfg):
  flat = stream_ids(pipeline.train_dataset(sharded_cfg, batch_size=10, seed=0), 40).reshape(-1)
  first, second = flat[:N_SHARDED], flat[N_SHARDED:]
  assert sorted(first) == sorted(second) == list(range(N_SHARDED))
  assert not np.array_equal(first, second)
  # Files come in a shuffled order: the first window is not the first file's records.
  assert not set(first[:10]) <= set(range(30))


class _FileReads:
  """Counts the records each file hands out (the pipeline's only reading of training data)."""

  def __init__(self, monkeypatch):
    self.records: dict[str, int] = {}
    read = pipeline._read_file

    def note(filename):
      name = os.path.basename(filename.numpy().decode())
      self.records[name] = self.records.get(name, 0) + 1
      return np.int64(0)

    def counting(filename, skip, take):
      def tagged(record):
        with tf.control_dependencies([tf.py_function(note, [filename], tf.int64)]):
          return tf.identity(record)

      return read(filename, skip, take).map(tagged)

    monkeypatch.setattr(pipeline, "_read_file", counting)


@pytest.mark.parametrize("start_step", [1, 7, 18, 29])
def test_sharded_resume_is_exact(sharded_cfg, start_step):
  aug = pipeline.dataset_config(**{**sharded_cfg.to_dict(), "pp_train": "decode(1)|flip_lr"})
  full = list(pipeline.train_dataset(aug, batch_size=10, seed=1).take(34).as_numpy_iterator())
  resumed = pipeline.train_dataset(aug, batch_size=10, seed=1, start_step=start_step)
  for want, got in zip(full[start_step:], resumed.as_numpy_iterator(), strict=False):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


def test_resume_does_not_read_the_skipped_records(sharded_cfg, monkeypatch):
  # Step 18 of batch 10 is position 180 of 200: the last of ten one-file windows. Reading the
  # skipped records would read 180 of them from all ten files.
  reads = _FileReads(monkeypatch)
  cfg = pipeline.dataset_config(**{**sharded_cfg.to_dict(), "prefetch": 1})
  next(iter(pipeline.train_dataset(cfg, batch_size=10, seed=0, start_step=18)))
  # The start window, and at most the next two loading ahead (the window prefetch and the
  # element buffers behind it), each about 20 records.
  assert 0 < sum(reads.records.values()) <= 80, reads.records
  assert len(reads.records) <= 3, reads.records


def test_training_graph_has_no_shuffle_buffer_and_loads_windows_ahead(sharded_cfg):
  ds = pipeline.train_dataset(sharded_cfg, batch_size=10, seed=0)
  graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
  nodes = {n.name: n for n in graph.node}
  in_functions = {n.op for f in graph.library.function for n in f.node_def}
  every_op = {n.op for n in graph.node} | in_functions
  # No buffer that refills at an epoch start: the shuffles are stateless permutations.
  assert not [op for op in every_op if op.startswith("Shuffle")]
  # Files are read by a parallel interleave inside the window loader.
  assert "TFRecordDataset" in in_functions and "ParallelInterleaveDatasetV4" in in_functions

  def upstream(node):
    return nodes[node.input[0].split(":")[0].lstrip("^")]

  # flat_map (a window's records) <- prefetch <- map (load a window) <- skip <- flat_map (the
  # endless epochs' windows): the next window loads while this one is consumed.
  emit = [n for n in graph.node if n.op == "FlatMapDataset" and upstream(n).op == "PrefetchDataset"]
  assert len(emit) == 1
  ops = []
  node = emit[0]
  for _ in range(4):
    node = upstream(node)
    ops.append(node.op)
  assert ops == ["PrefetchDataset", "MapDataset", "SkipDataset", "FlatMapDataset"], ops
  loader = [f for f in graph.library.function if "load_window" in f.signature.name]
  assert loader and "DatasetToSingleElement" in {n.op for n in loader[0].node_def}


def test_eval_images_equal_the_host_preprocessing(cfg):
  # The eval batches (normalised on the device) hold the values the whole pp string gives on
  # the host, example by example, in the split's stored order.
  normalised = pipeline.dataset_config(
    **{**cfg.to_dict(), "pp_eval": "decode(1)|pad(2)|normalize('fashion_mnist')"}
  )
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batches = list(
    pipeline.eval_iterator(normalised, split="test", global_batch_size=8, sharding=sharding)
  )
  got = np.concatenate([np.asarray(b["image"]) for b in batches])[:N_TEST]
  assert got.dtype == np.float32
  host = ops.get_preprocess_fn(normalised.pp_eval)
  builder = pipeline.get_builder(normalised)
  want = np.stack(
    [host(ops.with_rng(ex, 0))["image"].numpy() for ex in pipeline._read(builder, "test")]
  )
  # One float32 rounding apart at most (XLA fuses the multiply-add).
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-7)
