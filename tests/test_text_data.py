"""Tests of research.data.text: sources, splits, and batches as a pure function of (seed, step)."""
import functools
import itertools
import os
import threading
import time

import numpy as np
import pytest

from research import config as config_lib
from research import data as data_lib
from research.data import image
from research.data import text
from research.data import tokenizers

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                           'tinyshakespeare.txt')
needs_shakespeare = pytest.mark.skipif(
    not os.path.exists(SHAKESPEARE),
    reason=f'{SHAKESPEARE} is absent (see ../shared/data/README.md).')


def test_python_stdlib_corpus_is_present_and_deterministic():
  files = text.stdlib_files()
  assert len(files) > 100
  assert not any(f'{os.sep}{d}{os.sep}' in f for f in files for d in ('site-packages', 'test'))
  splits = text.load_text('python_stdlib', max_bytes=300_000)
  assert splits == text.load_text('python_stdlib', max_bytes=300_000)
  docs = splits['train'] + splits['validation']
  assert 299_990 < sum(len(d.encode('utf-8')) for d in docs) <= 300_000  # cut at a character.
  assert len(splits['validation']) == len(docs) // 10  # every 10th document.
  assert splits['validation'][0] == text._read(files[9])


def test_split_by_document_never_overlaps():
  docs = [f'doc {i}' for i in range(25)]
  splits = text.split_documents(docs)
  assert splits['validation'] == ['doc 9', 'doc 19']
  assert sorted(splits['train'] + splits['validation']) == sorted(docs)
  assert text.split_documents(['a', 'b', 'c']) == {'train': ['a', 'b'], 'validation': ['c']}


@needs_shakespeare
def test_tinyshakespeare_char_split_is_90_10():
  with open(SHAKESPEARE, encoding='utf-8') as f:
    full = f.read()
  data = text.build_lm_data(SHAKESPEARE, 'char', seq_len=64, batch_size=8, seed=0)
  tok, train = data.tokenizer, data.train
  assert len(full) == 1_115_394 and tok.vocab_size == 65 + 1
  assert len(train.tokens) == 1_003_854 and train.tokens.dtype == np.uint16
  val_tokens = text.tokenize(text.load_text(SHAKESPEARE)['validation'], tok)
  assert len(val_tokens) == 111_540
  # Train is exactly the first 90% of characters and validation exactly the rest.
  assert tok.decode(train.tokens) == full[:1_003_854]
  assert tok.decode(val_tokens) == full[1_003_854:]
  # Validation batches are all the non-overlapping windows of the validation tokens, once.
  windows = 111_539 // 64
  assert len(data.eval_batches) == -(-windows // 8)
  assert sum(b['mask'].sum() for b in data.eval_batches) == windows
  np.testing.assert_array_equal(data.eval_batches[0]['inputs'][0], val_tokens[:64])
  np.testing.assert_array_equal(data.eval_batches[0]['inputs'][1], val_tokens[64:128])


def test_windows_are_contiguous_and_targets_shifted():
  tokens = np.arange(10_000, dtype=np.int32)  # window content reveals its start.
  ds = text.LMDataset(tokens, seq_len=16, batch_size=8, seed=3)
  batch = ds.batch(7)
  assert batch['inputs'].shape == batch['targets'].shape == (8, 16)
  assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
  np.testing.assert_array_equal(batch['targets'], batch['inputs'] + 1)
  np.testing.assert_array_equal(batch['inputs'], batch['inputs'][:, :1] + np.arange(16))
  assert batch['targets'].max() < len(tokens)


def test_batch_is_a_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.int32)
  a = text.LMDataset(tokens, seq_len=16, batch_size=8, seed=0)
  b = text.LMDataset(tokens, seq_len=16, batch_size=8, seed=0)
  for step in (0, 1, 12345):
    np.testing.assert_array_equal(a.batch(step)['inputs'], b.batch(step)['inputs'])
  assert not np.array_equal(a.batch(0)['inputs'], a.batch(1)['inputs'])
  other_seed = text.LMDataset(tokens, seq_len=16, batch_size=8, seed=1)
  assert not np.array_equal(a.batch(0)['inputs'], other_seed.batch(0)['inputs'])
  # The prefetching iterator yields the same batches, from any start step.
  for step, batch in zip(itertools.count(5), itertools.islice(a.iterate(start_step=5), 3)):
    np.testing.assert_array_equal(batch['inputs'], a.batch(step)['inputs'])


def test_train_batches_are_made_ahead_in_a_background_thread():
  """After the loop takes batch 5, batches 6 and 7 are made without being asked for, off the
  calling thread (the loop does not wait for its next batch)."""
  dataset = text.LMDataset(np.arange(10_000, dtype=np.int32), seq_len=16, batch_size=8, seed=0)
  made, make = [], dataset.batch
  def recorded(step):
    made.append((step, threading.get_ident()))
    return make(step)
  dataset.batch = recorded
  it = dataset.iterate(start_step=5, prefetch=2)
  np.testing.assert_array_equal(next(it)['inputs'], make(5)['inputs'])
  deadline = time.monotonic() + 30  # a bound on the wait, not a timing: usually milliseconds
  while len(made) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  assert [step for step, _ in made[:3]] == [5, 6, 7], made
  assert threading.get_ident() not in {thread for _, thread in made}


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shares_concatenate_to_the_global_batch(process_count):
  tokens = np.arange(10_000, dtype=np.int32)
  everything = text.LMDataset(tokens, seq_len=16, batch_size=8, seed=0).batch(3)
  shares = [text.LMDataset(tokens, 16, 8, 0, i, process_count).batch(3)
            for i in range(process_count)]
  assert shares[0]['inputs'].shape == (8 // process_count, 16)
  for key in ('inputs', 'targets'):
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), everything[key])
  evals = text.eval_batches(tokens, 16, 8, max_batches=3)
  eval_shares = [text.eval_batches(tokens, 16, 8, 3, i, process_count)
                 for i in range(process_count)]
  for k, batch in enumerate(evals):
    for key in ('inputs', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([s[k][key] for s in eval_shares]), batch[key])
  with pytest.raises(ValueError, match='divide evenly'):
    text.LMDataset(tokens, 16, batch_size=6, process_index=0, process_count=4)


def test_eval_batches_are_fixed_non_overlapping_windows():
  tokens = np.arange(1_000, dtype=np.int32)
  batches = text.eval_batches(tokens, seq_len=10, batch_size=4)
  assert len(batches) == 25  # 99 whole windows: 24 batches and 3 in the last
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(100) < 99)  # the filler masked out
  starts = np.concatenate([b['inputs'][:, 0] for b in batches])
  np.testing.assert_array_equal(starts[mask == 1], np.arange(99) * 10)  # each window once
  np.testing.assert_array_equal(batches[-1]['targets'][:3, -1], [970, 980, 990])
  assert len(text.eval_batches(tokens, 10, 4, max_batches=2)) == 2
  with pytest.raises(ValueError, match='too few for one window'):
    text.eval_batches(tokens[:10], seq_len=10, batch_size=4)


def test_documents_are_joined_with_eot(tmp_path):
  for name, content in [('a.txt', 'ab'), ('b.txt', 'c'), ('c.txt', 'ba')]:
    (tmp_path / name).write_text(content)
  splits = text.load_text(str(tmp_path / '*.txt'))
  assert splits == {'train': ['ab', 'c'], 'validation': ['ba']}
  tok = tokenizers.build_tokenizer('byte')
  np.testing.assert_array_equal(text.tokenize(splits['train'], tok), [97, 98, 256, 99])


def test_bpe_on_python_stdlib(tmp_path):
  data = text.build_lm_data('python_stdlib', 'bpe', seq_len=32, batch_size=4, seed=0,
                            vocab_size=512, cache_dir=str(tmp_path), max_bytes=200_000)
  assert data.tokenizer.vocab_size == 512 and len(os.listdir(tmp_path)) == 1
  batch = data.train.batch(0)
  assert batch['inputs'].max() < 512 and data.eval_batches
  val = text.load_text('python_stdlib', max_bytes=200_000)['validation']
  assert data.tokenizer.decode(data.tokenizer.encode(val[0])) == val[0]


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    splits = text.load_text('tfds:tiny_shakespeare', data_dir=str(tmp_path))
    assert len(splits['train']) == len(splits['validation']) == 6
    assert all(isinstance(d, str) and d for d in splits['train'])
    data = text.build_lm_data('tfds:tiny_shakespeare', 'byte', seq_len=8, batch_size=2, seed=0,
                              data_dir=str(tmp_path))
  assert data.train.batch(0)['inputs'].shape == (2, 8)
  assert (data.train.tokens == 256).sum() == 5  # EOT between the 6 documents.


@functools.cache
def _local_text_builder():
  """A TFDS builder of 8 train and 3 test documents, registered once as 'research_test_text'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ResearchTestText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(0, 8), 'test': self._generate_examples(100, 3)}

    def _generate_examples(self, first, count):
      for i in range(first, first + count):
        yield i, {'text': f'document {i} h\xe9llo'}
  return ResearchTestText


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_tfds_source_prepared_locally(tmp_path, file_format):
  """A prepared dataset without a 'validation' split: its 'test' split is used.

  'tfrecord' (the `tfds build` default) has no random access, so it is read in order.
  """
  pytest.importorskip('tensorflow_datasets')
  _local_text_builder()(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
  splits = text.load_text('tfds:research_test_text', data_dir=str(tmp_path))
  assert sorted(splits['train']) == sorted(f'document {i} h\xe9llo' for i in range(8))
  assert sorted(splits['validation']) == [f'document {i} h\xe9llo' for i in (100, 101, 102)]


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(image.DataError) as e:  # launch.py prints a DataError without a traceback
    text.load_text('tfds:tiny_shakespeare', data_dir=str(tmp_path), download=False)
  message = str(e.value)
  assert "'tiny_shakespeare' is not prepared" in message and str(tmp_path) in message
  assert 'config.data.download is False' in message
  assert 'tfds build tiny_shakespeare --file_format=array_record' in message
  assert 'Or train on local text instead: --config.data.source=PATH' in message
  with pytest.raises(image.DataError, match='no dataset named'):
    text.load_text('tfds:no_such_dataset_xyz', data_dir=str(tmp_path))


def test_unprepared_tfds_dataset_offline_is_a_data_error(tmp_path, monkeypatch):
  """config.data.download=True (the default) reaches the text source; offline it says so.

  The network check is patched to 'offline' so the test never waits on a real download.
  """
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(image, '_network_reachable', lambda *args, **kwargs: False)
  c = config_lib.defaults()
  c.data.name, c.data.source, c.data.data_dir = 'text', 'tfds:tiny_shakespeare', str(tmp_path)
  assert c.data.download
  with pytest.raises(image.DataError) as e:
    data_lib.build(c)
  message = str(e.value)
  assert "'tiny_shakespeare' is not prepared" in message and 'no network' in message
  assert str(tmp_path) in message
  assert 'tfds build tiny_shakespeare --file_format=array_record' in message


def test_unprepared_tfds_dataset_is_prepared_when_download_is_allowed(tmp_path, monkeypatch):
  """Like image datasets, a missing text dataset is prepared (here one made locally)."""
  pytest.importorskip('tensorflow_datasets')
  builder_class = _local_text_builder()
  monkeypatch.setattr(image, '_network_reachable', lambda *args, **kwargs: True)
  with pytest.raises(image.DataError, match='config.data.download is False'):
    text.load_text('tfds:research_test_text', data_dir=str(tmp_path), download=False)
  # Several processes would each download and write it: refused, before any network use.
  monkeypatch.setattr(image.jax, 'process_count', lambda: 2)
  with pytest.raises(image.DataError, match='a run of 2 processes does not download it: '
                                            'prepare it before the run'):
    text.load_text('tfds:research_test_text', data_dir=str(tmp_path), download=True)
  assert not builder_class(data_dir=str(tmp_path)).is_prepared()
  monkeypatch.setattr(image.jax, 'process_count', lambda: 1)
  splits = text.load_text('tfds:research_test_text', data_dir=str(tmp_path), download=True)
  assert builder_class(data_dir=str(tmp_path)).is_prepared()
  assert sorted(splits['validation']) == [f'document {i} h\xe9llo' for i in (100, 101, 102)]
  assert len(splits['train']) == 8


def test_empty_or_missing_corpus_is_a_clear_error(tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match='has no text'):
    text.load_text(str(tmp_path / 'empty.txt'))
  (tmp_path / 'sub').mkdir()
  with pytest.raises(ValueError, match='has no text'):
    text.load_text(str(tmp_path / 'sub'))
  with pytest.raises(FileNotFoundError, match='python_stdlib'):
    text.load_text(str(tmp_path / 'nothing-*.txt'))
  with pytest.raises(ValueError, match='too few'):
    text.LMDataset(np.arange(10), seq_len=10, batch_size=1)


def test_window_starts_cover_every_possible_start_including_the_last():
  """Catches an off-by-one in LMDataset.batch's random window starts: the last window (whose
  target is the last token) was never drawn, nor, with the range one too long, a start past
  it (a window running off the end). Window content reveals its start."""
  tokens = np.arange(20, dtype=np.int32)
  seq_len = 4  # windows of 5 tokens: starts 0..15
  ds = text.LMDataset(tokens, seq_len=seq_len, batch_size=8, seed=0)
  starts = set()
  for step in range(200):
    batch = ds.batch(step)
    np.testing.assert_array_equal(batch['inputs'], batch['inputs'][:, :1] + np.arange(seq_len))
    starts.update(batch['inputs'][:, 0].tolist())
  assert starts == set(range(len(tokens) - seq_len))
  assert max(ds.batch(step)['targets'].max() for step in range(200)) == len(tokens) - 1


def test_bpe_is_learnt_from_the_train_split_only(tmp_path):
  """Catches the BPE tokenizer being trained on train + validation text (validation text
  leaking into the vocabulary). The validation document (every 10th) is made of characters
  and a word the training documents never use: none of them may be a piece of the learnt
  vocabulary, so the validation text is encoded as byte fallbacks."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = ['the', 'cat', 'sat', 'on', 'mat', 'and', 'dog', 'ran', 'far', 'away']
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(10):
    body = ' '.join(rng.choice(words, 400)) + '\n'
    (corpus / f'{i:02d}.txt').write_text(body if i != 9 else 'Ж zyzzyva ' * 200 + '\n',
                                         encoding='utf-8')
  splits = text.load_text(str(corpus))
  assert splits['validation'] == [('Ж zyzzyva ' * 200) + '\n']  # the 10th document
  data = text.build_lm_data(str(corpus), 'bpe', seq_len=8, batch_size=2, seed=0,
                            vocab_size=300, cache_dir=str(tmp_path / 'cache'))
  sp = spm.SentencePieceProcessor(model_proto=data.tokenizer.model_proto)
  train_chars = set(''.join(splits['train']))
  learnt = [sp.id_to_piece(i).replace('\u2581', ' ') for i in range(sp.vocab_size())
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
  assert len(learnt) > 20  # characters and merges of the training text
  assert 'the' in learnt or ' the' in learnt or 'the ' in learnt
  unseen = [piece for piece in learnt if not set(piece) <= train_chars]
  assert not unseen, f'pieces learnt from the validation text: {unseen}'
  # Each byte of the unseen word is its own byte-fallback token.
  assert len(data.tokenizer.encode('zyzzyva')) == 7
  assert len(data.tokenizer.encode('Ж')) == len('Ж'.encode('utf-8'))


def test_text_data_refuses_split_settings_it_does_not_use(tmp_path):
  """Text holds out its own validation text: an eval_split override was accepted and ignored
  (and --mode=eval recorded its name against the validation text's figures)."""
  from experiments import gpt_small  # pylint: disable=g-import-not-at-top
  source = tmp_path / 'text.txt'
  source.write_text('hello world. ' * 200)
  config = gpt_small.get_config('cpu')
  config.data.source, config.data.seq_len = str(source), 16
  assert data_lib.build(config).eval_split == 'validation'
  config.data.eval_split = 'train[:1000]'
  with pytest.raises(ValueError, match='not used by text data'):
    data_lib.build(config)
