"""Language-model data: raw text -> token arrays -> batches that are a function of (seed, step).

Sources (`config.data.source`):

  'python_stdlib'      the standard library's own .py files: a corpus on every machine with
                       Python, one document per file (sorted paths; no tests, no site-packages).
                       It differs between Python versions, so compare runs on one version.
  a path or glob       local text files, one document per file (a directory: every file in
                       it, recursively); e.g. '../shared/data/tinyshakespeare.txt'.
  'tfds:NAME'          a TFDS text dataset (feature 'text'), e.g. 'tfds:tiny_shakespeare'
                       or 'tfds:lm1b', with its own train and validation (else test) splits;
                       prepared first if it is not and config.data.download (as image
                       datasets are), else a DataError says how to prepare it.

Train/validation split of local and stdlib sources (they never overlap):
  one document    its first 90% of characters is train, the last 10% validation (nanoGPT's
                  shakespeare_char convention: 1,003,854 / 111,540 characters of tinyshakespeare).
  many documents  every 10th document in sorted order (the 10th, 20th, ...) is validation, the
                  rest train; with fewer than 10 documents the last one is validation. Taking
                  every 10th rather than the last 10% keeps both splits drawn from the whole
                  corpus (the stdlib sorted by path is not uniform).

Each split is tokenized document by document and concatenated with the end-of-text token
between documents into one uint16 array (int32 when the vocabulary needs it).

Training batches are nanoGPT-style random windows: `LMDataset.batch(step)` draws the global
batch's window starts from `np.random.default_rng((seed, step))`, so a batch is a pure function
of (seed, step): resuming needs only the step, and each process takes its contiguous rows of
the same global batch. Validation is fixed: non-overlapping windows from the start of the
validation tokens, so eval loss compares across runs with the same tokenizer and seq_len.
"""
import glob
import os
import sys
import sysconfig
from collections.abc import Iterable
from typing import NamedTuple

from absl import logging
import grain
import numpy as np

from research.data import image
from research.data import tokenizers

VAL_FRACTION = 0.1  # of characters, for a single-document corpus.
VAL_EVERY = 10  # every VAL_EVERY-th document is validation, for a multi-document corpus.
_STDLIB_SKIP = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                          '__pycache__'})


# ----------------------------------------------------------------------------- raw text


def _cap(documents: Iterable[str], max_bytes: int | None) -> list[str]:
  """Takes documents in order until their UTF-8 size reaches max_bytes (the last one cut)."""
  out, left = [], max_bytes
  for doc in documents:
    if left is not None:
      size = len(doc.encode('utf-8'))
      if size >= left:
        out.append(doc.encode('utf-8')[:left].decode('utf-8', errors='ignore'))
        break
      left -= size
    out.append(doc)
  return out


def _read(path: str) -> str:
  with open(path, 'rb') as f:
    return f.read().decode('utf-8', errors='replace')


def stdlib_files() -> list[str]:
  """Sorted paths of the standard library's .py files, without tests and site-packages."""
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
    paths += [os.path.join(dirpath, f) for f in filenames if f.endswith('.py')]
  return sorted(paths, key=lambda p: os.path.relpath(p, root))


def local_files(pattern: str) -> list[str]:
  """Sorted files of a file path, a directory (recursively) or a glob."""
  if os.path.isdir(pattern):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs)
  if os.path.isfile(pattern):
    return [pattern]
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(
        f'config.data.source={pattern!r} is not a file, a directory or a glob that matches any '
        "file; other sources are 'python_stdlib' and 'tfds:NAME'.")
  return paths


def split_documents(documents: list[str]) -> dict[str, list[str]]:
  """The train/validation split of a local corpus (the rules in the module docstring)."""
  if len(documents) == 1:
    n_train = int(len(documents[0]) * (1 - VAL_FRACTION))
    return {'train': [documents[0][:n_train]], 'validation': [documents[0][n_train:]]}
  is_val = [(i + 1) % VAL_EVERY == 0 for i in range(len(documents))]
  if not any(is_val):
    is_val[-1] = True
  return {'train': [d for d, v in zip(documents, is_val) if not v],
          'validation': [d for d, v in zip(documents, is_val) if v]}


def _read_tfds_splits(tfds, builder, name: str, split: str | None, data_dir: str | None,
                      max_bytes: int | None) -> dict[str, list[str]]:
  splits = builder.info.splits
  if split is None:
    split = 'test' if splits and 'validation' not in splits else 'validation'
  out = {}
  for key, tfds_split in (('train', 'train'), ('validation', split)):
    try:
      source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
      docs = (source[i]['text'] for i in range(len(source)))  # mock_data breaks __getitems__.
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises many kinds here)
      if not builder.is_prepared() or 'file format' not in str(e):
        raise
      # Prepared as TFRecord (the `tfds build` default): no random access, so read in order.
      docs = (ex['text'] for ex in tfds.as_numpy(builder.as_dataset(split=tfds_split)))
    docs = (d.decode('utf-8', errors='replace') if isinstance(d, bytes) else str(d) for d in docs)
    out[key] = _cap(docs, max_bytes)
  return out


def tfds_documents(name: str, split: str | None = None, data_dir: str | None = None,
                   max_bytes: int | None = None, download: bool = False) -> dict[str, list[str]]:
  """The 'text' of a TFDS dataset's train and validation (else test) split.

  A dataset that is not prepared is downloaded and prepared first if `download` (as image
  datasets are, by `image.prepare_tfds`); when that cannot be done (no network, or download
  False) an `image.DataError` says how to prepare it elsewhere.

  Args:
    name: the TFDS name, optionally with config and version ('lm1b/plain_text:1.1.0').
    split: the evaluation split; by default 'validation' if the dataset has it, else 'test'.
    data_dir: where the prepared dataset is; by default TFDS's own ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    max_bytes: a cap on the text read from each split.
    download: let TFDS download and prepare a missing dataset (config.data.download).

  Returns:
    {'train': documents, 'validation': documents}.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    with image.quiet_tfds_lookup():
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise image.DataError(f'config.data.source=tfds:{name}: TFDS has no dataset named {name!r} '
                          '(see https://www.tensorflow.org/datasets/catalog).') from None
  with image.quiet_tfds_lookup():
    try:
      return _read_tfds_splits(tfds, builder, name, split, data_dir, max_bytes)
    except Exception as e:  # pylint: disable=broad-except
      if builder.is_prepared():
        raise
      failure = e
  with image.quiet_tfds_lookup():  # outside `except`: no TFDS traceback
    image.prepare_tfds(name, data_dir, download, failure, 'Or train on local text instead: '
                       '--config.data.source=PATH (a file, a folder or a glob of .txt files).')
  builder = tfds.builder(name, data_dir=data_dir)  # its splits are known once prepared
  return _read_tfds_splits(tfds, builder, name, split, data_dir, max_bytes)


def load_text(source: str, max_bytes: int | None = None, data_dir: str | None = None,
              download: bool = False) -> dict[str, list[str]]:
  """Reads `source` into {'train': documents, 'validation': documents}.

  Args:
    source: 'python_stdlib', 'tfds:NAME' or a local path/directory/glob.
    max_bytes: a cap on the text read: on the whole corpus before the split for local and
      stdlib sources (documents in sorted order, the last one cut), on each split for TFDS.
    data_dir: the TFDS data directory.
    download: TFDS: download and prepare the dataset if it is not prepared.

  Returns:
    The documents of each split.
  """
  if source.startswith('tfds:'):
    splits = tfds_documents(source[len('tfds:'):], data_dir=data_dir, max_bytes=max_bytes,
                            download=download)
  else:
    paths = stdlib_files() if source == 'python_stdlib' else local_files(source)
    splits = split_documents(_cap(map(_read, paths), max_bytes)) if paths else {}
  for key in ('train', 'validation'):
    if not any(splits.get(key, ())):
      raise ValueError(f'config.data.source={source!r}: the {key} split has no text '
                       '(no documents, or only empty ones).')
  return splits


# ----------------------------------------------------------------------------- tokens


def tokenize(documents: list[str], tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """Encodes each document and joins them with `tokenizer.eot_id` in between."""
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  eot = np.array([tokenizer.eot_id], dtype)
  parts = []
  for i, doc in enumerate(documents):
    if i:
      parts.append(eot)
    parts.append(tokenizer.encode(doc).astype(dtype))
  return np.concatenate(parts)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(f'batch size {batch_size} must divide evenly over {process_count} '
                     f'processes, and process_index={process_index} be below that count.')
  n = batch_size // process_count
  return slice(process_index * n, (process_index + 1) * n)


class LMDataset:
  """Training batches of random windows; `batch(step)` is a pure function of (seed, step).

  Attributes:
    tokens: the token array windows are cut from.
    seq_len: T, the length of inputs and targets.
    batch_size: B, the global batch size; this process gets rows `rows` of each global batch.
    seed: with the step, the seed of the window starts.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    if len(tokens) < seq_len + 1:
      raise ValueError(f'{len(tokens)} tokens are too few for windows of seq_len + 1 = '
                       f'{seq_len + 1}; lower config.data.seq_len or use more text.')
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.rows = _local_rows(batch_size, process_index, process_count)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`: {'inputs', 'targets'}, int32 [B/P, T]."""
    rng = np.random.default_rng((self.seed, step))
    starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
    return _windows(self.tokens, starts[self.rows], self.seq_len)

  def iterate(self, start_step: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
    """batch(start_step), batch(start_step + 1), ..., `prefetch` of them made ahead in a thread."""
    steps = grain.MapDataset.range(start_step, sys.maxsize).map(self.batch)
    return iter(steps.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed validation batches: every whole non-overlapping window from the first token, once.

  The last batch is filled up with copies of the first window, masked out ('mask' 0; real
  windows 1), so that shapes are static; this process gets its rows of each.
  """
  n_windows = (len(tokens) - 1) // seq_len
  if n_windows < 1:
    raise ValueError(f'the validation split has {len(tokens)} tokens, too few for one window '
                     f'of {seq_len} + 1 tokens; lower config.data.seq_len or use more text.')
  n_batches = -(-n_windows // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  rows = _local_rows(batch_size, process_index, process_count)
  windows = np.arange(n_batches * batch_size).reshape(n_batches, batch_size)
  mask = (windows < n_windows).astype(np.float32)
  starts = np.where(windows < n_windows, windows, 0) * seq_len
  return [dict(_windows(tokens, s[rows], seq_len), mask=m[rows]) for s, m in zip(starts, mask)]


class LMData(NamedTuple):
  tokenizer: tokenizers.Tokenizer
  train: LMDataset
  eval_batches: list[dict[str, np.ndarray]]


def build_lm_data(source: str, tokenizer_kind: str, seq_len: int, batch_size: int, seed: int,
                  eval_batch_size: int | None = None, vocab_size: int | None = None, cache_dir: str | None = None,
                  process_index: int = 0, process_count: int = 1,
                  max_bytes: int | None = None, max_eval_batches: int | None = None,
                  data_dir: str | None = None, download: bool = False,
                  tokenizer: tokenizers.Tokenizer | None = None) -> LMData:
  """Everything the trainer needs for language modelling, from config values.

  Args:
    source: see the module docstring.
    tokenizer_kind: 'byte', 'char', 'bpe' or 'gpt2' (see `tokenizers`). A 'char' alphabet is
      taken from both splits (so validation never meets an unknown character, as in nanoGPT);
      'bpe' is trained on the train split only.
    seq_len: T.
    batch_size: the global training batch size.
    eval_batch_size: the global validation batch size (default: batch_size).
    seed: the seed of the training windows.
    vocab_size: the 'bpe' vocabulary size.
    cache_dir: where trained 'bpe' models are cached.
    process_index: this process (jax.process_index()).
    process_count: the number of processes (jax.process_count()).
    max_bytes: a cap on the text read (see `load_text`).
    max_eval_batches: a cap on the validation batches.
    data_dir: the TFDS data directory.
    download: TFDS: download and prepare the dataset if it is not prepared.
    tokenizer: one to use instead of building `tokenizer_kind` (another run's, to fine-tune it).

  Returns:
    LMData(tokenizer, train LMDataset, list of validation batches).
  """
  splits = load_text(source, max_bytes=max_bytes, data_dir=data_dir, download=download)
  learn_from = {'char': splits['train'] + splits['validation'], 'bpe': splits['train']}
  if tokenizer is None:
    tokenizer = tokenizers.build_tokenizer(
        tokenizer_kind, train_text='\n'.join(learn_from.get(tokenizer_kind, [])) or None,
        vocab_size=vocab_size, cache_dir=cache_dir)
  train_tokens = tokenize(splits['train'], tokenizer)
  val_tokens = tokenize(splits['validation'], tokenizer)
  logging.info('%s: %d train and %d validation documents -> %d / %d tokens (%s, vocab %d).',
               source, len(splits['train']), len(splits['validation']), len(train_tokens),
               len(val_tokens), tokenizer_kind, tokenizer.vocab_size)
  train = LMDataset(train_tokens, seq_len, batch_size, seed, process_index, process_count)
  evals = eval_batches(val_tokens, seq_len, eval_batch_size or batch_size, max_eval_batches,
                       process_index, process_count)
  return LMData(tokenizer, train, evals)
