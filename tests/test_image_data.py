"""Tests of research.data.image: IDX reading on the real MNIST test set, batching (order, shards,
padding), TFDS on mocked data and its error messages, and on-device preprocessing."""
import functools
import gzip
import pathlib
import re
import struct
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research import config
from research.data import image

DATA = (pathlib.Path(__file__).parents[1] / '..' / 'shared' / 'data').resolve()
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # data README


@pytest.fixture(scope='module')
def mnist_dir():
  if not (DATA / 't10k-images-idx3-ubyte.gz').exists():
    pytest.skip(f'real MNIST IDX files absent from {DATA} (see ../shared/data/README.md)')
  return str(DATA)


def data_config(**overrides):
  c = config.defaults().data
  for key, value in overrides.items():
    c[key] = value
  return c


def toy_source(n):
  """Example i has target i, and inputs that also encode i."""
  return image._ArraySource(np.arange(n, dtype=np.float32)[:, None] * [1, -1], np.arange(n))


def targets(batch):
  return batch['targets'].tolist()


# ---------------------------------------------------------------------------------------------
# IDX files.

def test_idx_mnist_test_set(mnist_dir):
  source = image.idx_source(mnist_dir, 'test')
  assert len(source) == 10_000
  assert source.inputs.shape == (10_000, 28, 28, 1) and source.inputs.dtype == np.uint8
  assert np.bincount(source.targets, minlength=10).tolist() == MNIST_TEST_COUNTS
  # an independent read: the raw bytes after the 16-byte header
  with gzip.open(f'{mnist_dir}/t10k-images-idx3-ubyte.gz', 'rb') as f:
    raw = np.frombuffer(f.read()[16:], np.uint8)
  np.testing.assert_array_equal(source[1234]['inputs'].ravel(), raw[1234 * 784:1235 * 784])


def test_unpacked_idx_files_read_as_the_gzipped_ones(mnist_dir, tmp_path):
  """A folder of unpacked IDX files (torchvision's MNIST/raw) was reported as missing."""
  for kind, d in (('images', 3), ('labels', 1)):
    with gzip.open(f'{mnist_dir}/t10k-{kind}-idx{d}-ubyte.gz', 'rb') as f:
      (tmp_path / f't10k-{kind}-idx{d}-ubyte').write_bytes(f.read())
  unpacked, packed = image.idx_source(str(tmp_path), 'test[:500]'), image.idx_source(
      mnist_dir, 'test[:500]')
  np.testing.assert_array_equal(unpacked.inputs, packed.inputs)
  np.testing.assert_array_equal(unpacked.targets, packed.targets)
  with pytest.raises(image.DataError, match=r"train-images-idx3-ubyte.gz.*\(or the same "
                                            r"unpacked, without .gz\), or take this split"):
    image.idx_source(str(tmp_path), 'train')


def test_idx_split_slices(mnist_dir):
  full = image.idx_source(mnist_dir, 'test')
  head, tail = (image.idx_source(mnist_dir, s) for s in ('test[:8000]', 'test[8000:]'))
  assert (len(head), len(tail)) == (8000, 2000)
  np.testing.assert_array_equal(np.concatenate([head.targets, tail.targets]), full.targets)
  np.testing.assert_array_equal(tail[0]['inputs'], full[8000]['inputs'])


def test_idx_split_whose_files_are_missing_points_at_the_files_there(mnist_dir):
  # The shared folder has the test set only: the train split's files are missing.
  with pytest.raises(image.DataError, match=r"train-images-idx3-ubyte.gz.* or take this split "
                     r"from the 'test' files that .* has .*'test\[:8000\]' and 'test\[8000:\]'"):
    image.idx_source(mnist_dir, 'train')


def test_build_mnist_idx(mnist_dir):
  c = data_config(name='mnist_idx', path=mnist_dir, train_split='test[:8000]',
                  eval_split='test[8000:]')
  data = image.build(c, batch_size=64, seed=0)
  assert (data.num_train, data.num_eval, data.input_shape, data.num_classes) == (
      8000, 2000, (28, 28, 1), 10)
  assert data.train[0]['inputs'].shape == (64, 28, 28, 1)
  assert len(data.eval_batches) == 32                         # ceil(2000 / 64)
  assert data.eval_batches[31]['mask'].sum() == 2000 - 31 * 64


def write_idx(path, header, payload):
  with gzip.open(path, 'wb') as f:
    f.write(struct.pack(f'>{len(header)}I', *header) + bytes(payload))


def test_truncated_idx_file_raises(tmp_path):
  write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', (2051, 5, 28, 28), [0] * 1000)  # < 5*784
  write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', (2049, 5), [0] * 5)
  with pytest.raises(image.DataError, match=r't10k-images-idx3-ubyte\.gz is truncated'):
    image.idx_source(str(tmp_path), 'test')


def test_corrupt_idx_file_raises(tmp_path):
  write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', (2051, 1, 2, 2), [0] * 4)
  write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', (1234, 1), [0])  # wrong magic number
  with pytest.raises(image.DataError, match=r't10k-labels-idx1-ubyte\.gz.*magic 1234'):
    image.idx_source(str(tmp_path), 'test')
  (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(b'not gzip at all')
  with pytest.raises(image.DataError, match=r'Could not read IDX file .*t10k-labels'):
    image.idx_source(str(tmp_path), 'test')


def test_missing_idx_files_and_bad_split(tmp_path):
  with pytest.raises(image.DataError, match=r'config\.data\.path'):
    image.idx_source(str(tmp_path), 'test')
  with pytest.raises(image.DataError, match='validation'):
    image.idx_source(str(tmp_path), 'validation')


# ---------------------------------------------------------------------------------------------
# Batching.

def test_train_batches_pure_function_of_seed_and_step():
  source = toy_source(50)
  a, b = image.train_batches(source, 8, seed=3), image.train_batches(source, 8, seed=3)
  later = [targets(a[s]) for s in (9, 2, 7)]   # out of order, from another instance
  assert later == [targets(b[s]) for s in (9, 2, 7)]
  assert targets(a[2]) == targets(b[2])        # reading again gives the same batch
  other = image.train_batches(source, 8, seed=4)
  assert [targets(other[s]) for s in range(3)] != [targets(a[s]) for s in range(3)]
  np.testing.assert_array_equal(a[5]['inputs'][:, 0], a[5]['targets'])  # pairs stay together


def test_train_batches_each_example_once_per_epoch():
  ds = image.train_batches(toy_source(12), 4, seed=0)
  epochs = [sum((targets(ds[s]) for s in range(3 * e, 3 * e + 3)), []) for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(12))
  assert epochs[0] != epochs[1] != epochs[2]       # reshuffled every epoch
  assert epochs[0] != list(range(12))              # and shuffled at all


def test_neighbouring_seeds_give_unrelated_epoch_orders():
  epoch = lambda seed, e: targets(image.train_batches(toy_source(100), 100, seed=seed)[e])
  assert epoch(0, 1) != epoch(1, 0)


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shares_concatenate_to_global_batch(process_count):
  source, batch = toy_source(20), 8
  whole = image.train_batches(source, batch, seed=1)
  shares = [image.train_batches(source, batch, 1, p, process_count) for p in range(process_count)]
  for step in range(6):
    parts = [share[step] for share in shares]
    assert all(len(p['targets']) == batch // process_count for p in parts)
    assert sum((targets(p) for p in parts), []) == targets(whole[step])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
  source = toy_source(10)
  seen, batches = [], []
  for p in range(process_count):
    ds = image.eval_batches(source, 4, p, process_count)
    assert len(ds) == 3                          # ceil(10 / 4) global batches
    batches += list(ds)
    for b in ds:
      assert b['targets'].shape == b['mask'].shape == (4 // process_count,)
      seen += b['targets'][b['mask'] == 1].tolist()
  assert sorted(seen) == list(range(10))
  assert sum(b['mask'].sum() for b in batches) == 10
  assert sum(len(b['mask']) for b in batches) == 12  # two padded rows, masked out


def test_prefetch_starts_at_step():
  ds = image.train_batches(toy_source(30), 4, seed=2)
  it = image.prefetch(ds, start=5, threads=2)
  got = [targets(next(it)) for _ in range(4)]
  assert got == [targets(ds[s]) for s in range(5, 9)]
  assert got[0] != targets(ds[0])


def test_prefetch_reads_ahead_in_background_threads():
  """While the loop works on one batch, the next ones are read by grain's threads: after one
  batch is taken, batches after it are made without being asked for, off the calling thread."""
  made = []  # (target of the batch's first row, thread) per batch made
  def record(batch):
    made.append((int(batch['targets'][0]), threading.get_ident()))
    return batch
  ds = image.train_batches(toy_source(40), 4, seed=2)
  it = image.prefetch(ds.map(record), start=5, threads=2, buffer=4)
  first = next(it)
  # The first batch and the next two, made ahead (in any order: two threads; a run here saw
  # batch 8 finished before batch 6). The deadline bounds the wait; it is not a timing.
  ahead = {targets(ds[s])[0] for s in (5, 6, 7)}
  deadline = time.monotonic() + 30
  while not {target for target, _ in made} >= ahead and time.monotonic() < deadline:
    time.sleep(0.01)
  assert {target for target, _ in made} >= ahead, made
  assert threading.get_ident() not in {thread for _, thread in made}
  assert targets(first) == targets(ds[5])


def test_empty_split_raises(mnist_dir):
  c = data_config(name='mnist_idx', path=mnist_dir, eval_split='test[10000:]',
                  train_split='test[:100]')
  with pytest.raises(image.DataError, match=r"'test\[10000:\]' has 0"):
    image.build(c, batch_size=8, seed=0)


# ---------------------------------------------------------------------------------------------
# TFDS.

def test_tfds_mock_mnist():
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    data = image.build(data_config(name='mnist', download=False), batch_size=8, seed=0)
    batch = data.train[0]
    evals = list(data.eval_batches)
  assert (data.input_shape, data.num_classes, data.num_train, data.num_eval) == (
      (28, 28, 1), 10, 20, 20)
  assert batch['inputs'].shape == (8, 28, 28, 1) and batch['inputs'].dtype == np.uint8
  assert batch['targets'].shape == (8,) and batch['targets'].max() < 10
  assert len(evals) == 3 and sum(b['mask'].sum() for b in evals) == 20


def test_tfds_unprepared_without_download(tmp_path):
  c = data_config(name='mnist', data_dir=str(tmp_path), download=False)
  with pytest.raises(image.DataError) as e:
    image.build(c, batch_size=8, seed=0)
  message = str(e.value)
  assert "'mnist'" in message and str(tmp_path) in message and 'tfds build mnist' in message


def test_tfds_unknown_name(tmp_path):
  c = data_config(name='no_such_dataset_xyz', data_dir=str(tmp_path), download=False)
  with pytest.raises(image.DataError, match="'no_such_dataset_xyz' is not a TFDS dataset"):
    image.build(c, batch_size=8, seed=0)


@functools.cache
def _local_image_builder():
  """A TFDS image dataset of 12 train and 5 test examples (label = index % 3), registered once
  as 'research_test_images'; prepared as ArrayRecord by each test that uses it."""

  class ResearchTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(12), 'test': self._generate_examples(5)}

    def _generate_examples(self, count):
      for i in range(count):
        yield i, {'image': np.full((4, 4, 1), i, np.uint8), 'label': i % 3}
  return ResearchTestImages


@pytest.fixture
def local_tfds(tmp_path):
  _local_image_builder()(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  return lambda **kw: data_config(name='research_test_images', data_dir=str(tmp_path),
                                  download=False, **kw)


def test_tfds_split_slices_past_the_end_and_unknown_splits_are_named(local_tfds):
  data = image.build(local_tfds(train_split='train[:10]', eval_split='test[:40%]'), 4, seed=0)
  assert (data.num_train, data.num_eval, data.num_classes) == (10, 2, 3)
  with pytest.raises(image.DataError, match=r"Split 'train\[:20\]' of TFDS dataset "
                     r"'research_test_images': .*20.* 12 .*'test' \(5 examples\)"):
    image.build(local_tfds(train_split='train[:20]'), 4, seed=0)
  with pytest.raises(image.DataError, match=r"Split 'validation' .*'train' \(12 examples\)"):
    image.build(local_tfds(eval_split='validation'), 4, seed=0)
  for split in ('train[:0]', 'train[12:]', 'train[5:3]', 'test[100%:]'):  # were a "prepare it"
    with pytest.raises(image.DataError, match=rf"Split '{re.escape(split)}' .* takes no "
                       r"examples, or a slice of it ends before it starts"):
      image.build(local_tfds(train_split=split), 4, seed=0)
  with pytest.raises(image.DataError, match=r"Split 'all\[:5\]' of TFDS dataset"):
    image.build(local_tfds(train_split='all[:5]'), 4, seed=0)  # was a NotImplementedError


def test_train_and_eval_splits_that_share_examples_are_warned_of(local_tfds, mnist_dir, caplog):
  with caplog.at_level('WARNING'):
    image.build(local_tfds(train_split='train[:8]', eval_split='train[8:]'), 4, seed=0)
    image.build(data_config(name='mnist_idx', path=mnist_dir, train_split='test[:8000]',
                            eval_split='test[8000:]'), 4, seed=0)
  assert 'share examples' not in caplog.text  # disjoint
  with caplog.at_level('WARNING'):
    image.build(local_tfds(train_split='train[:50%]+test', eval_split='train[4:7]'), 4, seed=0)
  assert "share examples: 2 of 'train' (rows 4..5)" in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):  # a union that overlaps itself: each row counted once
    image.build(local_tfds(train_split='train[:6]+train[4:]', eval_split='train[4:7]'), 4, 0)
  assert "share examples: 3 of 'train' (rows 4..6). The" in caplog.text
  caplog.clear()
  with caplog.at_level('WARNING'):
    image.build(data_config(name='mnist_idx', path=mnist_dir, train_split='test[:9000]',
                            eval_split='test[-2000:]'), 4, seed=0)
  assert "share examples: 1000 of 'test' (rows 8000..8999)" in caplog.text


def test_idx_and_synthetic_slices_past_the_end_are_refused(mnist_dir):
  with pytest.raises(image.DataError, match=r"'test\[:20000\]' reaches past the 10000 examples"):
    image.idx_source(mnist_dir, 'test[:20000]')
  with pytest.raises(image.DataError, match=r"'test\[-200:\]' reaches past the 100 examples"):
    image.synthetic_linear_source('test[-200:]', 100, 2.0, 0.0, 0.01, seed=0)
  assert len(image.synthetic_linear_source('test[-100:]', 100, 2.0, 0.0, 0.01, seed=0)) == 100
  with pytest.raises(image.DataError, match="splits train and test, not 'validation'"):
    image.synthetic_linear_source('validation[:500]', 100, 2.0, 0.0, 0.01, seed=0)


# ---------------------------------------------------------------------------------------------
# Preprocessing.

def test_preprocess_scales_and_standardises():
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  preprocess = image.make_preprocess(data_config(mean=mean, std=std, crop_padding=4,
                                                 random_flip=True))
  x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  expected = (x / 255.0 - np.array(mean)) / np.array(std)
  # evaluation: normalised, never augmented
  np.testing.assert_allclose(preprocess(jnp.asarray(x), None, train=False), expected,
                             rtol=1e-5, atol=1e-6)
  floats = jnp.asarray(expected, jnp.float32)  # float inputs (e.g. regression) pass through
  np.testing.assert_array_equal(preprocess(floats, None, train=False), floats)


def test_crop_without_padding_or_flip_is_identity():
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  np.testing.assert_array_equal(image._random_crop_flip(x, jax.random.key(1), 0, False), x)
  preprocess = image.make_preprocess(data_config())
  np.testing.assert_array_equal(preprocess(x, jax.random.key(1), train=True), x)


def test_random_crop_is_a_window_of_the_padded_image():
  pad = 2
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 2))
  preprocess = jax.jit(image.make_preprocess(data_config(crop_padding=pad)), static_argnums=2)
  out = np.asarray(preprocess(x, jax.random.key(3), True))
  assert out.shape == x.shape
  padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = []
  for i in range(len(x)):
    windows = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
               if np.array_equal(padded[i, r:r + 6, c:c + 6], out[i])]
    assert windows, f'example {i} is not a crop of its padded image'
    offsets.append(windows[0])
  assert len(set(offsets)) > 1 and any(o != (pad, pad) for o in offsets)  # crops vary


def test_random_flip_mirrors_some_images():
  x = np.asarray(jax.random.normal(jax.random.key(0), (16, 5, 5, 1)))
  preprocess = image.make_preprocess(data_config(random_flip=True))
  out = np.asarray(preprocess(jnp.asarray(x), jax.random.key(4), train=True))
  flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)]
  kept = [np.array_equal(o, xi) for o, xi in zip(out, x)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)
  other = np.asarray(preprocess(jnp.asarray(x), jax.random.key(5), train=True))
  assert not np.array_equal(out, other)  # a different rng flips different images


def test_examples_of_different_shapes_are_a_clear_error():
  source = image._ArraySource(  # pylint: disable=protected-access
      [np.zeros((28, 28, 1), np.uint8), np.zeros((32, 32, 3), np.uint8)], np.zeros(2, np.int32))
  with pytest.raises(image.DataError, match=r"'inputs' have different shapes or dtypes"):
    image.train_batches(source, batch_size=2, seed=0)[0]
  with pytest.raises(image.DataError, match='different shapes'):
    image.eval_batches(source, batch_size=2)[0]


def test_synthetic_linear_splits_take_slices_and_unknown_ones_are_named():
  whole = image.synthetic_linear_source('test', 1000, 2.0, 0.0, 0.01, seed=0)
  part = image.synthetic_linear_source('test[:100]', 1000, 2.0, 0.0, 0.01, seed=0)
  assert len(whole) == 1000 and len(part) == 100
  np.testing.assert_array_equal(part[7]['inputs'], whole[7]['inputs'])
  with pytest.raises(image.DataError, match="splits train and test, not 'validation'"):
    image.synthetic_linear_source('validation', 1000, 2.0, 0.0, 0.01, seed=0)


def test_random_crop_draws_every_offset_including_both_far_edges():
  """Catches random crop offsets drawn from randint(0, 2 * padding) (exclusive: the crop
  shifted fully to the far edge, offset 2p, never drawn) or one past it. Every pixel of the
  image is distinct and non-zero, so each crop reveals its offset in the zero-padded image."""
  pad, n, size = 2, 256, 5
  pixels = np.arange(1, size * size + 1, dtype=np.float32).reshape(1, size, size, 1)
  x = np.repeat(pixels, n, axis=0)
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def offsets(out):
    found = []
    for i in range(n):
      at = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
            if np.array_equal(padded[i, r:r + size, c:c + size], out[i])]
      assert len(at) == 1, f'example {i} is not one crop of its padded image'
      found.append(at[0])
    return found

  crop = jax.jit(image._random_crop_flip, static_argnums=(2, 3))  # pylint: disable=protected-access
  preprocess = image.make_preprocess(data_config(crop_padding=pad))  # the train step's path
  for out in (crop(jnp.asarray(x), jax.random.key(0), pad, False),
              preprocess(jnp.asarray(x), jax.random.key(1), train=True)):
    rows, cols = zip(*offsets(np.asarray(out)))
    assert set(rows) == set(cols) == set(range(2 * pad + 1))  # 0 .. 2p, both edges included
