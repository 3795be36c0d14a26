"""Tests of research.data.tokenizers: exact round trips, save/load, the BPE cache, errors."""
import os

import numpy as np
import pytest

from research.data import tokenizers

SHAKESPEARE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                           'tinyshakespeare.txt')
UNICODE = 'Grüße, naïve café — 東京 🚀👩\u200d💻 «ok»\t\r\n  two  spaces\n\n'
# Always present and varied enough to train a small BPE on: this library's own source.
SOURCE_TEXT = open(tokenizers.__file__, encoding='utf-8').read()


@pytest.fixture(scope='module')
def shakespeare():
  if not os.path.exists(SHAKESPEARE):
    pytest.skip(f'{SHAKESPEARE} is absent (see ../shared/data/README.md).')
  with open(SHAKESPEARE, encoding='utf-8') as f:
    return f.read()


def test_byte_round_trip_and_eot():
  tok = tokenizers.build_tokenizer('byte')
  ids = tok.encode(UNICODE)
  assert (tok.vocab_size, tok.eot_id) == (257, 256)
  assert ids.dtype == np.int32 and len(ids) == len(UNICODE.encode('utf-8'))
  assert tok.decode(ids) == UNICODE
  assert tok.decode([72, 105, 256, 33]) == 'Hi<|endoftext|>!'
  # A sampled model can emit invalid UTF-8: decode replaces, never raises.
  assert tok.decode([0xF0, 0x9F, 65]) == '\ufffdA'


def test_char_round_trip_and_unknown_char():
  tok = tokenizers.build_tokenizer('char', train_text='hello world\n')
  assert tok.chars == '\n dehlorw' and tok.vocab_size == 10 and tok.eot_id == 9
  text = 'low\nhold  ol'
  np.testing.assert_array_equal(tok.encode(text), [tok.chars.index(c) for c in text])
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\)"):
    tok.encode('hello z')


def test_char_on_shakespeare(shakespeare):
  tok = tokenizers.build_tokenizer('char', train_text=shakespeare)
  assert tok.vocab_size == 65 + 1
  assert tok.decode(tok.encode(shakespeare)) == shakespeare


def test_bpe_round_trip_on_shakespeare_and_unseen_characters(shakespeare):
  tok = tokenizers.build_tokenizer('bpe', train_text=shakespeare[:100_000], vocab_size=512)
  assert tok.vocab_size == 512
  held_out = shakespeare[-20_000:]
  ids = tok.encode(held_out)
  assert tok.decode(ids) == held_out
  assert len(ids) < 0.7 * len(held_out)  # it learnt merges, not just characters.
  assert tok.eot_id not in ids
  # Characters never seen in training round-trip through byte fallback.
  assert tok.decode(tok.encode(UNICODE)) == UNICODE
  assert tok.decode(tok.encode('<|endoftext|>')) == '<|endoftext|>'  # plain text, not EOT.
  # SentencePiece's own space mark, U+2581, as text: not turned into a space.
  for text in ('snow\u2581man', '\u2581', 'a \u2581 b\u2581\u2581', '\u2581start'):
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode([*tok.encode('a'), tok.eot_id, *tok.encode('b')]) == 'a<|endoftext|>b'


@pytest.mark.parametrize('kind', ['byte', 'char', 'bpe'])
def test_save_load_identical(kind, tmp_path):
  tok = tokenizers.build_tokenizer(kind, train_text=SOURCE_TEXT, vocab_size=400)
  tok.save(str(tmp_path))
  loaded = tokenizers.load(str(tmp_path))
  assert type(loaded) is type(tok)
  assert (loaded.vocab_size, loaded.eot_id) == (tok.vocab_size, tok.eot_id)
  np.testing.assert_array_equal(loaded.encode(SOURCE_TEXT), tok.encode(SOURCE_TEXT))
  assert loaded.decode(tok.encode(SOURCE_TEXT)) == SOURCE_TEXT


def test_a_non_ascii_char_vocabulary_saves_and_loads_under_an_ascii_locale(tmp_path):
  # tokenizer.json was written in the locale's encoding: under LANG=C, UnicodeEncodeError.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  code = ('from research.data import tokenizers\n'
          'tok = tokenizers.build_tokenizer("char", train_text="caf\\u00e9 \\u2581\\u20ac")\n'
          f'tok.save({str(tmp_path)!r})\n'
          f'print(tokenizers.load({str(tmp_path)!r}).decode(tok.encode("\\u20ac caf\\u00e9")) '
          '== "\\u20ac caf\\u00e9")\n')
  env = {**os.environ, 'LC_ALL': 'C', 'LANG': 'C', 'PYTHONUTF8': '0',
         'PYTHONCOERCECLOCALE': '0', 'PYTHONIOENCODING': 'ascii'}
  done = subprocess.run([sys.executable, '-X', 'utf8=0', '-c', code], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False, timeout=120)
  assert done.stdout.strip() == 'True', done.stderr[-2000:]


def test_bpe_cache_is_hit(tmp_path, monkeypatch):
  cache = str(tmp_path / 'cache')
  first = tokenizers.build_tokenizer('bpe', SOURCE_TEXT, vocab_size=400, cache_dir=cache)
  models = os.listdir(cache)
  assert len(models) == 1 and models[0].startswith('bpe-') and models[0].endswith('.model')

  def no_training(*args, **kwargs):
    raise AssertionError('the cached BPE model was retrained')
  monkeypatch.setattr(tokenizers, 'train_bpe', no_training)
  second = tokenizers.build_tokenizer('bpe', SOURCE_TEXT, vocab_size=400, cache_dir=cache)
  np.testing.assert_array_equal(second.encode(SOURCE_TEXT), first.encode(SOURCE_TEXT))
  # Another vocab_size (or text) is another key, so it trains.
  with pytest.raises(AssertionError, match='retrained'):
    tokenizers.build_tokenizer('bpe', SOURCE_TEXT, vocab_size=300, cache_dir=cache)


def test_gpt2_works_or_says_why():
  try:
    tok = tokenizers.build_tokenizer('gpt2')
  except RuntimeError as e:
    assert 'tiktoken' in str(e) and "'bpe'" in str(e)
    return
  assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
  assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_build_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match='not one of'):
    tokenizers.build_tokenizer('wordpiece')
  with pytest.raises(ValueError, match='config.data.vocab_size'):
    tokenizers.build_tokenizer('bpe', train_text='some text')
  with pytest.raises(ValueError, match='train_text'):
    tokenizers.build_tokenizer('char')
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tokenizers.load(str(tmp_path))
  for damaged in ('', '{"chars": "ab"}'):  # was json's JSONDecodeError / a KeyError
    (tmp_path / 'tokenizer.json').write_text(damaged)
    with pytest.raises(ValueError, match=r'tokenizer\.json is damaged .*the tokenizer the run'):
      tokenizers.load(str(tmp_path))


@pytest.mark.parametrize('vocab_size, advice', [
    (10, r'10 vs \d+\. \(with byte fallback .* raise config\.data\.vocab_size\)'),
    (100000, r'too high \(100000\)\. \(lower config\.data\.vocab_size to at most \d+: ')])
def test_bpe_vocabulary_size_errors_say_which_way_to_change_it(vocab_size, advice):
  """Too large a vocabulary for the text was told to raise vocab_size, after SentencePiece's
  own '<= N' and its internal source location."""
  text = 'the quick brown fox jumps over the lazy dog\n' * 50
  with pytest.raises(ValueError, match=advice) as error:
    tokenizers.train_bpe(text, vocab_size)
  assert 'trainer_interface' not in str(error.value) and '--character' not in str(error.value)


@pytest.mark.parametrize('kind', ['byte', 'bpe'])
def test_streamed_text_is_the_text_and_decodes_each_token_a_few_times(kind):
  """sample.TextStream, token by token: its pieces join to the whole decode (SentencePiece's
  dropped leading space, multi-byte characters split over tokens, end-of-text included), no
  piece ends in half a character, and the tokens decoded are a few per token, not all of them
  again each time (which was quadratic: 2.7 s of decoding for 4,000 tokens)."""
  from research import sample  # pylint: disable=g-import-not-at-top
  tok = (tokenizers.build_tokenizer('bpe', train_text=SOURCE_TEXT, vocab_size=400)
         if kind == 'bpe' else tokenizers.ByteTokenizer())
  text = ' leading space. ' + UNICODE + SOURCE_TEXT[:1500]
  ids = [*tok.encode(text), tok.eot_id, *tok.encode(' after ' + UNICODE)]
  decoded = []
  decode = tok.decode
  tok.decode = lambda part: decoded.append(len(part)) or decode(part)
  pieces = []
  stream = sample.TextStream(tok, pieces.append)
  for token in ids:
    stream.add(token)
  stream.finish(decode(ids))
  assert ''.join(pieces) == decode(ids) == text + '<|endoftext|> after ' + UNICODE
  assert not any(piece.endswith('\ufffd') for piece in pieces)
  assert sum(decoded) < 12 * len(ids), (sum(decoded), len(ids))
