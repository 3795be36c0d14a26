"""Image (and small tabular) datasets: TFDS `data_source` + Grain, local MNIST IDX files, synthetic.

Why `tfds.data_source` + Grain rather than `tf.data`: reading prepared ArrayRecord files needs no
TensorFlow at run time (quick start-up, no GPU memory taken by TF), records are random-access so
the training order is a pure function of (seed, step): batch `s` is element `s` of a shuffled,
repeated, batched Grain `MapDataset`. Resuming at step `s` therefore needs no iterator state
in the checkpoint, and each process reads only the rows of the global batch it owns.

Host-side work is kept to fetching uint8 images; normalisation and augmentation (random crop
with padding, horizontal flip) run on the accelerator inside the jitted step (`preprocess`).

Examples are dicts {'inputs': ..., 'targets': ...}; evaluation batches also carry 'mask'
(1 for a real example, 0 for padding) so that every test example is counted exactly once.
"""
import contextlib
import dataclasses
import gzip
import logging
import os
import re
import socket
import struct
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np


class DataError(ValueError):
  """A dataset is missing, unprepared or malformed; the message says how to fix it."""


@dataclasses.dataclass
class ImageData:
  train: Any             # MapDataset: train[step] -> this process's share of the global batch
  eval_batches: Any      # MapDataset of padded, masked batches covering the eval split once
  num_train: int
  num_eval: int
  input_shape: tuple     # one example, e.g. (28, 28, 1)
  num_classes: int       # 0 for regression


# ---------------------------------------------------------------------------------------------
# Sources: random-access sequences of {'inputs', 'targets'} examples.

class _ArraySource:
  """A random-access source over in-memory arrays."""

  def __init__(self, inputs, targets, rows=None):
    if len(inputs) != len(targets):
      raise DataError(f'{len(inputs)} inputs but {len(targets)} targets.')
    self.inputs, self.targets = inputs, targets
    self.rows = rows  # [(split name, range of its rows)], where the source is a split's slice

  def __len__(self):
    return len(self.inputs)

  def __getitem__(self, i):
    return {'inputs': self.inputs[i], 'targets': self.targets[i]}


class _RenameSource:
  """Maps a TFDS example {'image', 'label'} to {'inputs', 'targets'}."""

  def __init__(self, source, image_key, label_key, rows=None):
    self.source, self.image_key, self.label_key = source, image_key, label_key
    self.rows = rows  # as _ArraySource's; None where TFDS cannot say (mock data)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    example = self.source[i]
    return {'inputs': example[self.image_key], 'targets': example[self.label_key]}


def _split_slice(split: str) -> tuple[str, slice]:
  """'test[:8000]' -> ('test', slice(None, 8000)); percentages are not supported here."""
  m = re.fullmatch(r'(\w+)(?:\[(-?\d*):(-?\d*)\])?', split)
  if not m:
    raise DataError(f'Cannot parse split {split!r}; use NAME or NAME[start:stop].')
  to_int = lambda s: int(s) if s else None
  return m.group(1), slice(to_int(m.group(2)), to_int(m.group(3)))


def _split_rows(split: str, size: int) -> range:
  """The rows `split` takes of its split's `size` examples. A bound past the split is refused,
  as TFDS refuses it: clamped, 'test[:20000]' of 10,000 examples would train on fewer than
  asked without a word."""
  name, part = _split_slice(split)
  for bound in (part.start, part.stop):
    if bound is not None and abs(bound) > size:
      raise DataError(f'Split {split!r} reaches past the {size} examples of {name!r} '
                      f'(config.data.train_split / eval_split): bounds from -{size} to {size}.')
  return range(*part.indices(size))


def _tfds_rows(name: str, split: str, data_dir: str | None) -> list[tuple[str, range]] | None:
  """The rows of each split of a prepared TFDS dataset that `split` ('train[:80%]+test', ...)
  takes, by TFDS's rules; None where the dataset is not prepared (or is mocked). A split TFDS
  refuses (a slice past its end, an unknown name) or that takes no example is a DataError that
  lists the splits."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with quiet_tfds_lookup():
    builder = tfds.builder(name, data_dir=data_dir)
    splits = builder.info.splits if builder.is_prepared() else None
  if not splits:
    return None
  sizes = ', '.join(f'{k!r} ({v.num_examples} examples)' for k, v in splits.items())
  where = f'(config.data.train_split / eval_split; its splits: {sizes})'
  try:
    runs = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
  except (ValueError, KeyError, AssertionError, NotImplementedError) as e:
    raise DataError(f'Split {split!r} of TFDS dataset {name!r}: {e} {where}.') from None
  rows = [(r.splitname, range(r.from_ or 0, splits[r.splitname].num_examples if r.to is None
                              else r.to)) for r in runs]
  if not sum(len(r) for _, r in rows) or any(r.start > r.stop for _, r in rows):
    raise DataError(f'Split {split!r} of TFDS dataset {name!r} takes no examples, or a slice of '
                    f'it ends before it starts {where}.')
  return rows


def _shared_examples(train: list[tuple[str, range]], evaluation: list[tuple[str, range]]) -> str:
  """'' if the train and eval rows are disjoint, else which rows of which split they share."""
  shared = {}  # split name -> [start, stop) runs, merged below
  for name, rows in train:
    for other_name, other in evaluation:
      start, stop = max(rows.start, other.start), min(rows.stop, other.stop)
      if name == other_name and start < stop:
        shared.setdefault(name, []).append((start, stop))
  parts = []
  for name, runs in shared.items():
    merged = []
    for start, stop in sorted(runs):
      if merged and start <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], stop)
      else:
        merged.append([start, stop])
    parts += [f'{stop - start} of {name!r} (rows {start}..{stop - 1})' for start, stop in merged]
  return ', '.join(parts)


def _read_idx(path: str) -> np.ndarray:
  """Reads an MNIST IDX file (optionally gzipped)."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      magic, count = struct.unpack('>II', f.read(8))
      if magic == 2051:
        rows, cols = struct.unpack('>II', f.read(8))
        shape = (count, rows, cols, 1)
      elif magic == 2049:
        shape = (count,)
      else:
        raise DataError(f'{path} is not an IDX image (2051) or label (2049) file: magic {magic}.')
      data = np.frombuffer(f.read(), dtype=np.uint8)
  except (OSError, EOFError, struct.error) as e:
    raise DataError(f'Could not read IDX file {path}: {e}') from e
  if data.size != np.prod(shape):
    raise DataError(f'{path} is truncated: expected {np.prod(shape)} values, found {data.size}.')
  return data.reshape(shape)


def _idx_files(path: str, prefix: str) -> list[str]:
  """The images and labels files of `prefix` (train, t10k) in `path`, each gzipped (as
  published) or not (as unpacked, e.g. torchvision's MNIST/raw); the gzipped names if absent."""
  files = []
  for kind, d in (('images', 3), ('labels', 1)):
    name = os.path.join(path, f'{prefix}-{kind}-idx{d}-ubyte')
    files.append(name if os.path.exists(name) and not os.path.exists(f'{name}.gz') else
                 f'{name}.gz')
  return files


def idx_source(path: str, split: str) -> _ArraySource:
  """MNIST in its original IDX files (gzipped or not): split 'train' -> train-*, 'test' ->
  t10k-*."""
  name, _ = _split_slice(split)
  prefix = {'train': 'train', 'test': 't10k'}.get(name)
  if prefix is None:
    raise DataError(f'IDX split must be train or test (optionally sliced), not {split!r}.')
  files = _idx_files(path, prefix)
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    other, other_prefix, cut = (('test', 't10k', 8000) if name == 'train' else
                                ('train', 'train', 50000))
    has_other = all(os.path.exists(f) for f in _idx_files(path, other_prefix))
    raise DataError(
        f'MNIST IDX files not found: {missing}. Set config.data.path to the folder that holds '
        f'{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz (or the same '
        'unpacked, without .gz)'
        + (f', or take this split from the {other!r} files that {path} has '
           f"(config.data.train_split / eval_split, e.g. '{other}[:{cut}]' and "
           f"'{other}[{cut}:]')." if has_other else '.'))
  images, labels = (_read_idx(f) for f in files)
  rows = _split_rows(split, len(labels))
  return _ArraySource(images[rows.start:rows.stop], labels[rows.start:rows.stop].astype(np.int32),
                      [(name, rows)])


def synthetic_linear_source(split: str, num_examples: int, slope: float, intercept: float,
                            noise: float, seed: int) -> _ArraySource:
  """y = slope * x + intercept + noise * N(0, 1), x ~ U(-1, 1); train and test differ by seed.
  `num_examples` per split, of which a split like 'test[:100]' takes a slice."""
  name, _ = _split_slice(split)
  if name not in ('train', 'test'):
    raise DataError(f'The synthetic linear data has splits train and test, not {name!r} '
                    '(config.data.train_split / eval_split).')
  rows = _split_rows(split, num_examples)
  rng = np.random.default_rng([seed, {'train': 0, 'test': 1}[name]])
  x = rng.uniform(-1, 1, size=(num_examples, 1)).astype(np.float32)
  y = (slope * x + intercept + noise * rng.standard_normal(x.shape)).astype(np.float32)
  return _ArraySource(x[rows.start:rows.stop], y[rows.start:rows.stop], [(name, rows)])


def _network_reachable(host='storage.googleapis.com', port=443, timeout=3.0) -> bool:
  """A quick check before a TFDS download, whose retries would take minutes to fail offline."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def prepare_tfds(name: str, data_dir: str | None, download: bool, cause: Exception | None = None,
                 instead: str = ''):
  """Called when opening `name` failed: downloads and prepares it, or raises a DataError.

  Shared by the image and the text (research/data/text.py) TFDS sources. The message names the
  dataset, the data directory and the `tfds build` command that prepares it elsewhere, then
  `instead` (another way to get the data, if there is one).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  how = (f'Prepare it where there is network with\n'
         f'    tfds build {name} --file_format=array_record --data_dir=DIR\n'
         f'(TensorFlow, installed by requirements.txt, is needed to prepare most datasets), '
         f'copy DIR here and pass --config.data.data_dir=DIR (or set TFDS_DATA_DIR).'
         + (f' {instead}' if instead else ''))
  where = builder.data_dir + (f' (config.data.data_dir={data_dir!r})' if data_dir else
                               " (config.data.data_dir='': TFDS's default)")
  if builder.is_prepared():
    detail = f' ({type(cause).__name__}: {str(cause)[:300]})' if cause is not None else ''
    raise DataError(f'TFDS dataset {name!r} in {where} cannot be read by index{detail}. '
                    f'{how}') from cause
  if not download:
    raise DataError(f'TFDS dataset {name!r} is not prepared in {where} and '
                    f'config.data.download is False. {how}')
  if jax.process_count() > 1:  # each would download and write it, at once if the folder is shared
    raise DataError(f'TFDS dataset {name!r} is not prepared in {where}, and a run of '
                    f'{jax.process_count()} processes does not download it: prepare it before '
                    f'the run (a data_dir all hosts share, or each host\'s). {how}')
  if not _network_reachable():
    raise DataError(f'TFDS dataset {name!r} is not prepared in {where} and cannot be '
                    f'downloaded: no network. {how}')
  try:
    builder.download_and_prepare(file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'TFDS dataset {name!r} is not prepared in {where} and downloading it '
                    f'failed ({type(e).__name__}: {str(e)[:300]}). {how}') from e


class _NoVariantFolderWarnings(logging.Filter):
  def filter(self, record):
    return 'has no dataset_info.json' not in record.getMessage()


@contextlib.contextmanager
def quiet_tfds_lookup():
  """While a TFDS dataset is looked for: TFDS warns "Variant folder ... has no
  dataset_info.json" for a dataset that is not there at all, before the DataError that says
  what to do (which names the folder)."""
  quiet = _NoVariantFolderWarnings()
  logging.getLogger('absl').addFilter(quiet)
  try:
    yield
  finally:
    logging.getLogger('absl').removeFilter(quiet)


def tfds_source(name: str, split: str, data_dir: str | None, download: bool,
                image_key='image', label_key='label'):
  """Opens a prepared TFDS split for random access, preparing it first if allowed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  open_split = lambda: tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  try:
    with quiet_tfds_lookup():
      source = open_split()
    return _RenameSource(source, image_key, label_key, _tfds_rows(name, split, data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'config.data.name={name!r} is not a TFDS dataset '
                    '(see https://www.tensorflow.org/datasets/catalog).') from None
  except DataError:  # the split, named by _tfds_rows
    raise
  except Exception as e:  # pylint: disable=broad-except
    failure = e
  _tfds_rows(name, split, data_dir)  # prepared, but not this split: a DataError that says so
  instead = ('Or read the original IDX files (train-images-idx3-ubyte.gz, ...) from a folder: '
             '--config.data.name=mnist_idx --config.data.path=FOLDER.' if name == 'mnist' else '')
  with quiet_tfds_lookup():
    prepare_tfds(name, data_dir, download, failure, instead)  # outside `except`: no traceback
  rows = _tfds_rows(name, split, data_dir)  # prepared now: the split checked as above
  return _RenameSource(open_split(), image_key, label_key, rows)


def tfds_num_classes(name: str, data_dir: str | None, label_key='label') -> int:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(name, data_dir=data_dir).info.features[label_key].num_classes


# ---------------------------------------------------------------------------------------------
# Batching.

def _collate(examples):
  """Stacks examples into a batch; examples of different shapes or dtypes are a DataError."""
  batch = {}
  for key in examples[0]:
    values = [np.asarray(e[key]) for e in examples]
    kinds = {(v.shape, v.dtype.str) for v in values}
    if len(kinds) > 1:
      raise DataError(f'The examples\' {key!r} have different shapes or dtypes {sorted(kinds)}; '
                      'every example of a dataset must have the same (resize or cast them when '
                      'preparing the dataset).')
    batch[key] = np.stack(values)
  return batch


def train_batches(source, batch_size: int, seed: int, process_index=0, process_count=1):
  """Element `step` is this process's rows of global batch `step` (shuffled anew each epoch)."""
  local = batch_size // process_count
  # Grain shuffles epoch e with seed + e: scramble the seed so that seeds 0 and 1 do not see
  # the same epoch orders one epoch apart.
  seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat().batch(local,
                                                                     batch_fn=_collate)
  return ds.slice(slice(process_index, None, process_count))


def eval_batches(source, batch_size: int, process_index=0, process_count=1):
  """Covers every example once; the last global batch is padded and masked."""
  n, local = len(source), batch_size // process_count
  num_batches = -(-n // batch_size)

  def load(k):
    rows = k * batch_size + process_index * local + np.arange(local)
    batch = _collate([source[int(min(r, n - 1))] for r in rows])
    batch['mask'] = (rows < n).astype(np.float32)
    return batch

  return grain.MapDataset.range(num_batches).map(load)


def prefetch(dataset, start: int = 0, threads: int = 4, buffer: int = 8):
  """Iterates `dataset[start:]` with background threads reading ahead."""
  return iter(dataset[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)))


# ---------------------------------------------------------------------------------------------
# Entry point and on-device preprocessing.

def build(data_config, batch_size: int, seed: int, process_index=0, process_count=1,
          eval_batch_size: int | None = None) -> ImageData:
  """Builds train and eval pipelines from `config.data`; fails fast with a DataError."""
  name = data_config.name
  if name == 'mnist_idx':
    make = lambda split: idx_source(data_config.path, split)
    num_classes = 10
  elif name == 'synthetic_linear':
    make = lambda split: synthetic_linear_source(
        split, data_config.num_examples, data_config.slope, data_config.intercept,
        data_config.noise, seed)
    num_classes = 0
  else:
    data_dir = data_config.data_dir or None
    make = lambda split: tfds_source(name, split, data_dir, data_config.download)
    num_classes = None
  train, test = make(data_config.train_split), make(data_config.eval_split)
  if num_classes is None:  # read once the dataset is known to exist
    num_classes = tfds_num_classes(name, data_dir)
  shared = _shared_examples(train.rows, test.rows) if None not in (train.rows, test.rows) else ''
  if shared and process_index == 0:  # a warning, not an error: it can be meant
    logging.warning('config.data.train_split=%r and eval_split=%r share examples: %s. The '
                    'evaluation measures examples the model trains on.',
                    data_config.train_split, data_config.eval_split, shared)
  if len(train) == 0 or len(test) == 0:
    raise DataError(f'Dataset {name!r}: split {data_config.train_split!r} has {len(train)} '
                    f'examples and {data_config.eval_split!r} has {len(test)}; both need some.')
  input_shape = tuple(np.asarray(train[0]['inputs']).shape)
  return ImageData(
      train=train_batches(train, batch_size, seed, process_index, process_count),
      eval_batches=eval_batches(test, eval_batch_size or batch_size, process_index,
                                process_count),
      num_train=len(train), num_eval=len(test), input_shape=input_shape,
      num_classes=num_classes)


def _random_crop_flip(images, rng, padding: int, flip: bool):
  """Per-example random crop of a zero-padded image, then a random horizontal flip."""
  n, h, w, _ = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if padding:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * padding + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_rng, 0.5, (n, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1, :], images)
  return images


def make_preprocess(data_config) -> Callable:
  """Returns preprocess(inputs, rng, train) run inside the jitted step."""
  mean = jnp.asarray(data_config.mean, jnp.float32)
  std = jnp.asarray(data_config.std, jnp.float32)

  def preprocess(inputs, rng, train: bool):
    if inputs.dtype == jnp.uint8:
      inputs = (inputs.astype(jnp.float32) / 255.0 - mean) / std
    if train and (data_config.crop_padding or data_config.random_flip):
      inputs = _random_crop_flip(inputs, rng, data_config.crop_padding, data_config.random_flip)
    return inputs

  return preprocess
