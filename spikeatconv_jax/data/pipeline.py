"""tf.data input pipelines over tfds datasets, handing out global jax.Arrays.

Public API (the contract the training code uses):

* `train_iterator(dataset_cfg, *, global_batch_size, sharding, seed, start_step=0)`: infinite
  iterator of ``{"image": [B, H, W, C] uint8, "label": [B] int32}`` global jax.Arrays.
* `eval_iterator(dataset_cfg, *, split, global_batch_size, sharding)`: one pass over `split` in
  a fixed order, each batch with an extra ``"mask"`` [B] float32 (0 for padding).
* `num_examples(dataset_cfg, split)`.

The pp strings run up to their first ``normalize`` here, on the host, and the images cross to
the device as uint8; ``normalize`` and the ops after it run inside the jitted step
(`device_ops.apply`). Each process reads its own disjoint part of the split
(`tfds.even_splits` by process index).

Training stream, shuffling and resume. The stream of one process is the concatenation of
epochs. Epoch e puts the process's files (tfds file instructions) in a seeded random order and
cuts that order into shuffle windows of about ``shuffle_buffer`` records (whole files, equal
file counts); a window's files are read in parallel and its records come out in an exact
seeded permutation. The window after the current one loads while the current one is consumed,
across epoch boundaries too, so no epoch starts by refilling a buffer. Every seed derives from
(seed, process, epoch[, window]), and each element's augmentation seed from (seed, process,
epoch, its number in the stored order), independent of thread scheduling. Step s consumes
stream elements [s*b, (s+1)*b) for the per-process batch b, so ``start_step=N`` begins at
epoch ``N*b // n`` and, within it, at the window holding position ``N*b % n``: the windows
before it are never read, and the batches equal those of an uninterrupted run from step N on.
With ``cache=True`` (small datasets held in memory) each epoch is an exact permutation of the
whole shard and the skip is free.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Importing autoaugment registers the "autoaugment" op. (TF_CPP_MIN_LOG_LEVEL is set in
# spikeatconv_jax/data/__init__.py, before TensorFlow is imported.)
from spikeatconv_jax.data import autoaugment, device_ops, ops
from spikeatconv_jax.data.builders import fashion_mnist

del autoaugment

# TF only feeds the host: keep it off any accelerator so it neither grabs GPU memory nor
# competes with JAX for it.
with contextlib.suppress(RuntimeError):  # Raised when TF already initialised its devices.
  tf.config.set_visible_devices([], "GPU")
tf.get_logger().setLevel("ERROR")

# How many files of a shuffle window are read at once.
READ_PARALLELISM = 16


def dataset_config(name: str, **fields) -> ml_collections.ConfigDict:
  """A ``config.dataset`` ConfigDict for tfds dataset `name`, e.g. to `prepare` it by hand.

  The experiment configs (configs/*.py) own the real values, preprocessing included; the
  defaults here only make every field present. Fields: name, data_dir, source_dir,
  train_split, eval_split, pp_train, pp_eval, shuffle_buffer, cache, num_classes,
  image_size, prefetch.
  """
  base = dict(
    name=name,
    data_dir=None,
    source_dir=fashion_mnist.DEFAULT_SOURCE_DIR if name == "fashion_mnist_local" else None,
    train_split="train",
    eval_split="test",
    pp_train="decode",
    pp_eval="decode",
    shuffle_buffer=10_000,
    cache=False,
    num_classes=-1,
    image_size=-1,
    prefetch=2,
  )
  unknown = set(fields) - set(base)
  if unknown:
    raise ValueError(f"unknown dataset config fields {sorted(unknown)}; known: {sorted(base)}")
  base.update(fields)
  cfg = ml_collections.ConfigDict(base)
  for field in ("data_dir", "source_dir"):  # Keep them typed as optional strings.
    if cfg[field] is None:
      cfg[field] = ml_collections.config_dict.placeholder(str)
  return cfg


# ----------------------------------------------------------------------------------------------
# Builders and preparation.
# ----------------------------------------------------------------------------------------------


def _data_dir(cfg) -> str | None:
  data_dir = cfg.get("data_dir")
  return os.path.expanduser(data_dir) if data_dir else None


def prepare(cfg) -> tfds.core.DatasetBuilder:
  """Prepares `cfg.name` from local files only (``cfg.source_dir`` as manual_dir).

  Safe when several processes call it at once: preparation runs under an exclusive file lock
  next to the dataset, and whoever gets the lock second finds the dataset prepared.
  """
  builder = tfds.builder(cfg.name, data_dir=_data_dir(cfg))
  if builder.is_prepared():
    return builder
  source_dir = cfg.get("source_dir")
  source_dir = os.path.expanduser(source_dir) if source_dir else None
  if source_dir and not tf.io.gfile.isdir(source_dir):
    if cfg.name == "fashion_mnist_local":
      raise FileNotFoundError(fashion_mnist.missing_source_message(source_dir))
    raise FileNotFoundError(f"dataset.source_dir {source_dir!r} (manual_dir) does not exist")

  def build():
    builder = tfds.builder(cfg.name, data_dir=_data_dir(cfg))  # Re-read: another may have won.
    if not builder.is_prepared():
      tfds.display_progress_bar(False)
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir, try_download_gcs=False)
      )

  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))  # .../<name>/<version>
  if "://" in root:
    # Remote storage (gs://...) has no file locks: prepare it ahead of time from one process.
    build()
  else:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{cfg.name}.prepare.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        build()
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
  return tfds.builder(cfg.name, data_dir=_data_dir(cfg))


def get_builder(cfg) -> tfds.core.DatasetBuilder:
  """The prepared builder; prepares `fashion_mnist_local` on first use, never downloads."""
  if cfg.name == "fashion_mnist_local":
    return prepare(cfg)
  try:
    builder = tfds.builder(cfg.name, data_dir=_data_dir(cfg))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown tfds dataset {cfg.name!r}: {e}") from None
  if not builder.is_prepared() and not _readable(builder, cfg.train_split):
    where = _data_dir(cfg) or "the default tfds data_dir (~/tensorflow_datasets)"
    if cfg.name == "imagenet2012":
      how = (
        "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a directory and run "
        '`python -c "from spikeatconv_jax.data import pipeline as p; p.prepare('
        "p.dataset_config('imagenet2012', data_dir=DATA_DIR, source_dir=TAR_DIR))\"` "
        "(see docs/DATA.md)"
      )
    else:
      how = (
        f"prepare it once with `tfds build {cfg.name} --data_dir <dir>` on a machine with "
        "network access (or from manual files with pipeline.prepare) and copy the directory"
      )
    raise FileNotFoundError(
      f"tfds dataset {cfg.name!r} is not prepared in {where}; this pipeline never downloads: {how}."
    )
  return builder


def _readable(builder, split: str) -> bool:
  """Whether as_dataset works although the builder is not prepared (tfds.testing.mock_data)."""
  try:
    builder.as_dataset(split=split)
  except (AssertionError, ValueError, FileNotFoundError):
    return False
  return True


def _split_size(builder, split: str) -> int:
  try:
    return int(builder.info.splits[split].num_examples)
  except KeyError:
    # Mocked datasets (tfds.testing.mock_data) have no split metadata; count the elements.
    ds = builder.as_dataset(split=split)
    n = int(ds.cardinality())
    return n if n >= 0 else int(ds.reduce(0, lambda c, _: c + 1))


def num_examples(cfg, split: str) -> int:
  """Number of examples of `split` (tfds split syntax, e.g. "train[:16]", allowed)."""
  return _split_size(get_builder(cfg), split)


def _decoders(builder) -> dict | None:
  """Images stay encoded when read; the pp string's decode op decodes them (or a crop of them)."""
  decoders = {
    k: tfds.decode.SkipDecoding()
    for k, f in builder.info.features.items()
    if isinstance(f, tfds.features.Image)
  }
  return decoders or None


def _read(builder, split) -> tf.data.Dataset:
  """The split's records in a fixed order, images left encoded (decoded by the pp ops)."""
  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders=_decoders(builder),
    read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
  )
  return ds.map(lambda ex: {k: ex[k] for k in ("image", "label")})


def _file_instructions(builder, split) -> list | None:
  """The (file, skip, take) pieces of `split`, or None where there are no files to index.

  Mocked datasets (tfds.testing.mock_data) have no split metadata; datasets prepared in
  another file format than TFRecord cannot be read with TFRecordDataset.
  """
  if not builder.info.splits or builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    return None
  return [fi for fi in builder.info.splits[split].file_instructions if fi.take > 0]


def _in_memory(ds: tf.data.Dataset) -> dict[str, tf.Tensor]:
  """The (still encoded) records of `ds` as in-memory tensors, one per feature ([N, ...]).

  For small datasets (Fashion-MNIST ~30 MB, CIFAR ~150 MB of PNGs).
  """
  columns = {k: [] for k in ds.element_spec}
  for chunk in tfds.as_numpy(ds.batch(8192)):  # batched: per-element Python costs ~100 us
    for k, v in chunk.items():
      columns[k].append(v)
  return {k: tf.constant(np.concatenate(v)) for k, v in columns.items()}


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _process_split(split: str, process_index: int, process_count: int) -> str:
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def _check_batch(global_batch_size: int, process_count: int, sharding=None) -> int:
  """Per-process batch size, with clear errors for sizes that do not divide."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global batch {global_batch_size} does not divide over {process_count} processes"
    )
  local = global_batch_size // process_count
  if sharding is not None:
    try:
      shard = _batch_sharding(sharding, 1).shard_shape((global_batch_size,))[0]
    except ValueError as e:
      raise ValueError(
        f"global batch {global_batch_size} does not divide over the sharding's batch shards: {e}"
      ) from None
    if local % shard:
      raise ValueError(
        f"per-process batch {local} is not a multiple of the per-device batch {shard}; the "
        "local devices cannot split it evenly"
      )
  return local


def _key(*ints) -> tf.Tensor:
  """An int64 [2] stateless seed derived from a sequence of integers (tensors allowed)."""
  key = tf.constant([0x5EED, 0], tf.int64)
  for i in ints:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(i, tf.int64))
  return key


def _prep_fn(pp: str, keep_mask: bool = False):
  """The host part of `pp` (up to its first normalize) as ``prep(key, example)``.

  Raises:
    ValueError: a pp string the host/device cut rejects, or a host part whose images are not
      uint8 (checked when the dataset is built).
  """
  host_pp, _ = device_ops.split_pp(pp)
  pp_fn = ops.get_preprocess_fn(host_pp or "keep('image', 'label')")

  def prep(key, example):
    out = pp_fn(ops.with_rng(example, key))
    if out["image"].dtype != tf.uint8:
      raise ValueError(
        f"the host part {host_pp!r} of pp {pp!r} gives {out['image'].dtype.name} images; the "
        "pipeline hands uint8 to the device (normalize runs there)"
      )
    result = {"image": out["image"], "label": tf.cast(out["label"], tf.int32)}
    if keep_mask:
      result["mask"] = tf.constant(1.0, tf.float32)
    return result

  return prep


def _windows(takes: np.ndarray, shuffle_buffer: int) -> tuple[np.ndarray, int]:
  """[num_windows, max files] positions in an epoch's file order (-1: none), and its width.

  Windows hold whole files, about `shuffle_buffer` records each, with file counts differing by
  at most one, so no window is a small remainder that the next one's loading could not hide
  behind. ``shuffle_buffer <= 1`` means no shuffling: one file per window.
  """
  num_files = len(takes)
  per_window = 1
  if shuffle_buffer > 1:
    per_window = max(1, round(shuffle_buffer / max(float(np.mean(takes)), 1.0)))
  num_windows = math.ceil(num_files / min(per_window, num_files))
  bounds = [(j * num_files) // num_windows for j in range(num_windows + 1)]
  width = max(bounds[j + 1] - bounds[j] for j in range(num_windows))
  table = np.full([num_windows, width], -1, np.int64)
  for j in range(num_windows):
    table[j, : bounds[j + 1] - bounds[j]] = np.arange(bounds[j], bounds[j + 1])
  return table, width


def _read_file(filename: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
  """Serialized records [skip, skip + take) of one TFRecord file (the skip reads headers only)."""
  return tf.data.TFRecordDataset(filename).skip(skip).take(take)


def _file_stream(cfg, builder, instructions, *, seed, process_index, first_epoch, skip, n):
  """(key, example) of the shuffled, repeated file-backed stream from element `skip` of epoch
  `first_epoch` on; see the module docstring."""
  shuffle = int(cfg.get("shuffle_buffer", 0) or 0) > 1
  takes = np.array([fi.take for fi in instructions], np.int64)
  if int(takes.sum()) != n:
    raise ValueError(f"the file instructions hold {int(takes.sum())} records, the split {n}")
  starts = np.concatenate([[0], np.cumsum(takes)[:-1]]).astype(np.int64)
  table, width = _windows(takes, int(cfg.get("shuffle_buffer", 0) or 0))
  num_files = len(instructions)
  names = tf.constant([fi.filename for fi in instructions])
  skips, takes_t = tf.constant([fi.skip for fi in instructions], tf.int64), tf.constant(takes)
  starts_t, table_t = tf.constant(starts), tf.constant(table)

  def file_order(e):
    order = tf.range(num_files, dtype=tf.int64)
    if shuffle:
      order = tf.random.experimental.stateless_shuffle(order, _key(seed, process_index, e, -1))
    return order

  def windows_of(e):
    order = file_order(e)
    files = tf.where(table_t >= 0, tf.gather(order, tf.maximum(table_t, 0)), -1)
    j = tf.range(tf.shape(files, out_type=tf.int64)[0])
    return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(j), e), j, files))

  def read_one(f):
    # Each record with its number in the shard's stored order (its augmentation seed).
    numbers = tf.data.Dataset.range(starts_t[f], starts_t[f] + takes_t[f])
    return tf.data.Dataset.zip(numbers, _read_file(names[f], skips[f], takes_t[f]))

  def load_window(e, j, files):
    files = tf.boolean_mask(files, files >= 0)
    records = tf.data.Dataset.from_tensor_slices(files).interleave(
      read_one,
      cycle_length=min(width, READ_PARALLELISM),
      num_parallel_calls=min(width, READ_PARALLELISM),
      deterministic=True,
    )
    numbers, serialized = records.batch(np.iinfo(np.int32).max).get_single_element()
    return e, j, numbers, serialized

  # Where `skip` falls in the first epoch's windows (the same stateless shuffle, run eagerly).
  order = file_order(tf.constant(first_epoch, tf.int64)).numpy()
  sizes = [int(takes[order[row[row >= 0]]].sum()) for row in table]
  ends = np.cumsum(sizes)
  first_window = int(np.searchsorted(ends, skip, side="right"))
  skip_in_window = skip - (int(ends[first_window - 1]) if first_window else 0)

  def emit(e, j, numbers, serialized):
    # The window's records in an exact seeded permutation, indexed one by one rather than
    # gathered: a gathered copy would double the memory of a window of encoded images.
    order = tf.range(tf.size(numbers, out_type=tf.int64))
    if shuffle:
      order = tf.random.experimental.stateless_shuffle(order, _key(seed, process_index, e, -2, j))
    # A resume starts inside its first window: drop the consumed part of the permutation.
    start = tf.where((e == first_epoch) & (j == first_window), skip_in_window, 0)
    order = order[tf.cast(start, tf.int64) :]
    return tf.data.Dataset.from_tensor_slices(order).map(lambda k: (e, numbers[k], serialized[k]))

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(windows_of)
  ds = ds.skip(first_window)  # window descriptions only: nothing is read for them
  # One window loads ahead of the one being consumed.
  ds = ds.map(load_window).prefetch(1).flat_map(emit)
  decoders = _decoders(builder)
  features = builder.info.features

  def parse(e, number, serialized):
    example = features.deserialize_example(serialized, decoders=decoders)
    return _key(seed, process_index, e, number), {k: example[k] for k in ("image", "label")}

  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def train_dataset(
  cfg,
  *,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  split: str | None = None,
) -> tf.data.Dataset:
  """The per-process training tf.data.Dataset (batches of `batch_size` = per-process batch)."""
  builder = get_builder(cfg)
  sub = _process_split(split or cfg.train_split, process_index, process_count)
  n = _split_size(builder, sub)
  if n == 0:
    raise ValueError(f"process {process_index} got no training examples of {sub!r}")
  buffer = int(cfg.get("shuffle_buffer", 0) or 0)
  skip = start_step * batch_size
  first_epoch, skip_in_epoch = skip // n, skip % n
  prep = _prep_fn(cfg.pp_train)
  instructions = None if cfg.get("cache", False) else _file_instructions(builder, sub)

  if instructions:
    ds = _file_stream(
      cfg, builder, instructions, seed=seed, process_index=process_index,
      first_epoch=first_epoch, skip=skip_in_epoch, n=n,
    )  # fmt: skip
  elif cfg.get("cache", False):
    # Records in memory: each epoch is an exact seeded permutation of the indices, and a
    # resume skips indices instead of reading records.
    arrays = _in_memory(_read(builder, sub))

    def epoch(e):
      order = tf.range(n, dtype=tf.int64)
      if buffer > 1:
        order = tf.random.experimental.stateless_shuffle(order, _key(seed, process_index, e, -1))
      ds = tf.data.Dataset.from_tensor_slices(order)
      ds = ds.skip(tf.where(e == first_epoch, tf.cast(skip_in_epoch, tf.int64), 0))
      return ds.map(
        lambda i: (_key(seed, process_index, e, i), {k: tf.gather(v, i) for k, v in arrays.items()})
      )

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  else:
    # No files to index (a mocked dataset): the shard is one window, shuffled by a buffer that
    # holds all of it, and a resume reads the records it skips.
    base = _read(builder, sub).enumerate()

    def epoch(e):
      ds = base
      if buffer > 1:
        shuffle_seed = tf.random.stateless_uniform(
          [], _key(seed, process_index, e, -1), minval=None, maxval=None, dtype=tf.int64
        )
        ds = ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=False)
      return ds.map(lambda i, ex: (_key(seed, process_index, e, i), ex))

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.skip(skip_in_epoch)
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(cfg.get("prefetch", 2) or tf.data.AUTOTUNE)
  return ds.with_options(_options())


def eval_dataset(
  cfg, *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """The per-process eval dataset: every example of the shard once, then masked padding.

  Every process yields the same number of batches (that of the largest shard), so collective
  eval steps never wait on a process that ran out of data.
  """
  builder = get_builder(cfg)
  subs = tfds.even_splits(split, n=process_count, drop_remainder=False)
  counts = [_split_size(builder, s) for s in subs]
  num_batches = max(math.ceil(c / batch_size) for c in counts)
  ds = _read(builder, subs[process_index]).enumerate()
  ds = ds.map(lambda i, ex: (_key(0, process_index, i), ex))
  prep = _prep_fn(cfg.pp_eval, keep_mask=True)
  if device_ops.is_random(device_ops.split_pp(cfg.pp_eval)[1]):
    raise ValueError(f"pp_eval {cfg.pp_eval!r} has random device ops; evaluation is fixed")
  # Decoded images have dynamic shapes; the padding needs the static output shape, which we
  # take from the first example of the split (every process sees the same one).
  first = _read(builder, split).take(1).map(lambda ex: prep(_key(0, 0, 0), ex))
  shapes = {k: tuple(v.shape) for k, v in next(iter(first)).items()}
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda ex: {k: tf.ensure_shape(v, shapes[k]) for k, v in ex.items()})
  padding = {k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()}  # mask = 0
  num_pad = num_batches * batch_size - counts[process_index]
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_pad))
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(cfg.get("prefetch", 2) or tf.data.AUTOTUNE)
  return ds.with_options(_options())


# ----------------------------------------------------------------------------------------------
# Global jax.Arrays.
# ----------------------------------------------------------------------------------------------


def _batch_sharding(sharding, ndim: int):
  """`sharding` restricted to the leading (batch) axis for an array of rank `ndim`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)[:1]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return sharding


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {
    k: jax.make_array_from_process_local_data(_batch_sharding(sharding, v.ndim), v)
    for k, v in batch.items()
  }


def _global_batches(ds: tf.data.Dataset, sharding) -> Iterator[dict[str, jax.Array]]:
  for batch in tfds.as_numpy(ds):
    yield _to_global(batch, sharding)


def train_iterator(
  dataset_cfg, *, global_batch_size: int, sharding, seed: int, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
  """Infinite iterator of global training batches; step N's batch only depends on (seed, N).

  Bad batch sizes, unknown ops and unprepared datasets raise here, before any iteration.
  """
  local = _check_batch(global_batch_size, jax.process_count(), sharding)
  ds = train_dataset(
    dataset_cfg,
    batch_size=local,
    seed=seed,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return _global_batches(ds, sharding)


def eval_iterator(
  dataset_cfg, *, split: str, global_batch_size: int, sharding
) -> Iterator[dict[str, jax.Array]]:
  """One pass over `split`: global batches with "image", "label" and "mask" (0 = padding).

  The images cross to the device as uint8 and the device part of ``pp_eval`` (normalize) runs
  there, on each batch as it arrives; the batches hold its float32 result.
  """
  local = _check_batch(global_batch_size, jax.process_count(), sharding)
  ds = eval_dataset(
    dataset_cfg,
    split=split,
    batch_size=local,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  on_device = jax.jit(functools.partial(device_ops.apply, dataset_cfg.pp_eval, rng=None))
  return ({**b, "image": on_device(b["image"])} for b in _global_batches(ds, sharding))
