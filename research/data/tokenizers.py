"""Tokenizers: text <-> token ids, all behind one small interface.

Kinds (`build_tokenizer(kind, ...)`, usually from `config.data.tokenizer`):

  'byte'  the 256 UTF-8 byte values plus an end-of-text token: vocab 257, no training.
  'char'  the sorted distinct characters of the training text plus end-of-text
          (nanoGPT's `shakespeare_char`); an unknown character is an error.
  'bpe'   SentencePiece BPE trained here on the training text, with byte fallback so
          that any text round-trips; cached in `cache_dir` by a hash of (text, vocab_size).
  'gpt2'  tiktoken's GPT-2 encoding, if tiktoken and its vocabulary files are available
          offline (tiktoken is not a dependency of this project).

Every tokenizer has `encode(text)`, `decode(ids)`, `vocab_size`, `eot_id` and
`save(directory)`; `load(directory)` restores any of them from what `save` wrote.
`decode` writes the end-of-text token as '<|endoftext|>' and never fails: byte sequences
that are not valid UTF-8 (a sampled model can produce them) become U+FFFD.
"""
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np

KINDS = ('byte', 'char', 'bpe', 'gpt2')
EOT_TEXT = '<|endoftext|>'
_CONFIG_FILE = 'tokenizer.json'


class Tokenizer:
  """The common interface; subclasses define `_encode`, `_decode` and `_state`."""
  kind: str
  vocab_size: int
  eot_id: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (never contains `eot_id`), as an int32 array."""
    return np.asarray(self._encode(text), np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; each `eot_id` is written as '<|endoftext|>'."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    pieces, start = [], 0
    for pos in [p for p, i in enumerate(ids) if i == self.eot_id] + [len(ids)]:
      pieces.append(self._decode(ids[start:pos]))
      start = pos + 1
    return EOT_TEXT.join(pieces)

  def save(self, directory: str) -> None:
    """Writes `tokenizer.json` (and any model file) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    state = {'kind': self.kind, **self._state(directory)}
    with open(os.path.join(directory, _CONFIG_FILE), 'w', encoding='utf-8') as f:
      json.dump(state, f, ensure_ascii=False)

  def __repr__(self):
    return f'{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})'

  def _encode(self, text: str):
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _state(self, directory: str) -> dict:
    del directory
    return {}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255 and end-of-text 256."""
  kind, vocab_size, eot_id = 'byte', 257, 256

  def _encode(self, text):
    return np.frombuffer(text.encode('utf-8'), np.uint8)

  def _decode(self, ids):
    return bytes(i for i in ids if 0 <= i < 256).decode('utf-8', errors='replace')


class UnknownCharacter(ValueError):
  """Text holds a character (`.char`) outside a 'char' tokenizer's alphabet."""

  def __init__(self, char: str, message: str):
    super().__init__(message)
    self.char = char


class CharTokenizer(Tokenizer):
  """One id per character of a fixed alphabet (sorted), end-of-text last."""
  kind = 'char'

  def __init__(self, chars: str):
    self.chars = ''.join(sorted(set(chars)))
    if not self.chars:
      raise ValueError('the char tokenizer needs a non-empty training text.')
    self.vocab_size = len(self.chars) + 1
    self.eot_id = len(self.chars)
    self._codes = np.array([ord(c) for c in self.chars], np.uint32)

  def _encode(self, text):
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    ids = np.searchsorted(self._codes, codes)
    unknown = codes != self._codes[np.minimum(ids, len(self._codes) - 1)]
    if unknown.any():
      char = chr(codes[np.argmax(unknown)])
      raise UnknownCharacter(char,
          f'character {char!r} (U+{ord(char):04X}) is not in the char tokenizer\'s alphabet of '
          f'{len(self.chars)} characters built from the training text.')
    return ids

  def _decode(self, ids):
    return ''.join(self.chars[i] for i in ids if 0 <= i < len(self.chars))

  def _state(self, directory):
    return {'chars': self.chars}


class BpeTokenizer(Tokenizer):
  """A SentencePiece BPE model with byte fallback; its eos piece is end-of-text."""
  kind = 'bpe'

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    self.eot_id = self._sp.eos_id()
    # SentencePiece writes spaces as U+2581 inside, so a U+2581 in the text would come back as
    # a space: it is encoded as its three UTF-8 byte pieces instead.
    self._u2581 = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in '\u2581'.encode()]

  def _encode(self, text):
    if '\u2581' not in text:
      return self._sp.encode(text)
    ids = []
    for i, part in enumerate(text.split('\u2581')):
      ids.extend(self._u2581 if i else [])
      ids.extend(self._sp.encode(part))
    return ids

  def _decode(self, ids):
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])

  def _state(self, directory):
    with open(os.path.join(directory, 'bpe.model'), 'wb') as f:
      f.write(self.model_proto)
    return {'model': 'bpe.model'}


class Gpt2Tokenizer(Tokenizer):
  """tiktoken's 'gpt2' encoding (vocab 50257, end-of-text 50256)."""
  kind, vocab_size, eot_id = 'gpt2', 50257, 50256  # tiktoken's, set again from it below

  def __init__(self):
    try:
      import tiktoken  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise RuntimeError(
          "tokenizer 'gpt2' needs tiktoken, which is not installed (it is not a dependency of "
          "this project): `pip install tiktoken`, or use tokenizer 'bpe' or 'byte'.") from e
    try:
      self._enc = tiktoken.get_encoding('gpt2')
    except Exception as e:  # pylint: disable=broad-except  (network errors vary by backend)
      raise RuntimeError(
          "tokenizer 'gpt2': tiktoken is installed but could not load the GPT-2 vocabulary "
          f'({type(e).__name__}: {e}). Without network access, copy its files into a '
          "directory named by $TIKTOKEN_CACHE_DIR, or use tokenizer 'bpe' or 'byte'.") from e
    self.vocab_size = self._enc.n_vocab
    self.eot_id = self._enc.eot_token

  def _encode(self, text):
    return self._enc.encode_ordinary(text)

  def _decode(self, ids):
    return self._enc.decode(ids, errors='replace')


# Training options for 'bpe'; part of the cache key, so changing them retrains.
_BPE_OPTIONS = dict(
    model_type='bpe', byte_fallback=True, character_coverage=1.0,
    # Exact round trips: no normalization, no whitespace cleanup, no dummy prefix.
    normalization_rule_name='identity', remove_extra_whitespaces=False,
    add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
    unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, eos_piece=EOT_TEXT,
    user_defined_symbols=['\n'], max_sentence_length=1 << 16, minloglevel=2)


def train_bpe(text: str, vocab_size: int) -> bytes:
  """Trains a SentencePiece BPE model on the lines of `text`; returns the model proto."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  lines = [line for line in text.splitlines() if line]
  if not lines:
    raise ValueError("tokenizer 'bpe' needs a non-empty training text.")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        num_threads=os.cpu_count() or 1, **_BPE_OPTIONS)
  except RuntimeError as e:
    # SentencePiece's own advice names its flags ('--character_coverage'): left out.
    reason = re.split(r'\s(?:Please|Increase)\b', str(e).split('] ', 1)[-1])[0].strip()
    most = re.search(r'<= (\d+)', str(e))
    hint = (f'lower config.data.vocab_size{f" to at most {most[1]}" if most else ""}: the text '
            'has no more pieces to merge' if 'too high' in reason else 'with byte fallback the '
            'vocabulary needs 256 byte pieces + 3 more + the distinct characters of the text; '
            'raise config.data.vocab_size')
    raise ValueError(f"tokenizer 'bpe' with vocab_size={vocab_size}: {reason} ({hint}).") from e
  return model.getvalue()


def build_tokenizer(kind: str, train_text: str | None = None, vocab_size: int | None = None,
                    cache_dir: str | None = None) -> Tokenizer:
  """Builds a tokenizer of `kind`; 'char' and 'bpe' learn from `train_text`.

  Args:
    kind: one of KINDS.
    train_text: the text a 'char' alphabet or 'bpe' model is learnt from.
    vocab_size: the 'bpe' vocabulary size (required there; the others fix their own).
    cache_dir: where 'bpe' keeps trained models, as `bpe-<hash>.model`, the hash covering
      the text, vocab_size and training options; a second build with the same inputs loads it.

  Returns:
    The tokenizer.
  """
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'gpt2':
    return Gpt2Tokenizer()
  if kind not in ('char', 'bpe'):
    raise ValueError(f'tokenizer kind {kind!r} is not one of {KINDS}.')
  if not train_text:
    raise ValueError(f'tokenizer {kind!r} is learnt from text; pass a non-empty train_text.')
  if kind == 'char':
    return CharTokenizer(train_text)
  if not vocab_size:
    raise ValueError("tokenizer 'bpe' needs a vocabulary size (config.data.vocab_size).")
  if cache_dir is None:
    return BpeTokenizer(train_bpe(train_text, vocab_size))
  key = hashlib.sha256(json.dumps([vocab_size, _BPE_OPTIONS]).encode())
  key.update(train_text.encode('utf-8', errors='surrogatepass'))
  path = os.path.join(cache_dir, f'bpe-{key.hexdigest()[:16]}.model')
  if not os.path.exists(path):
    proto = train_bpe(train_text, vocab_size)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as f:  # atomic publish
      f.write(proto)
    os.replace(f.name, path)
  with open(path, 'rb') as f:
    return BpeTokenizer(f.read())


def load(directory: str) -> Tokenizer:
  """Restores the tokenizer that `Tokenizer.save(directory)` wrote."""
  path = os.path.join(directory, _CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no saved tokenizer at {path} (written by Tokenizer.save).')
  with open(path, encoding='utf-8') as f:
    try:
      state = json.load(f)
    except ValueError as e:
      state = e
  if not isinstance(state, dict) or 'kind' not in state:
    raise ValueError(f'{path} is damaged ({state if isinstance(state, ValueError) else "no kind"}'
                     '): it is the tokenizer the run trained with. Copy it back from a copy of '
                     "the run, or train anew in a new workdir (the checkpoints' token ids "
                     'belong to that tokenizer).')
  kind = state['kind']
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'char':
    return CharTokenizer(state['chars'])
  if kind == 'bpe':
    with open(os.path.join(directory, state['model']), 'rb') as f:
      return BpeTokenizer(f.read())
  if kind == 'gpt2':
    return Gpt2Tokenizer()
  raise ValueError(f'{path}: unknown tokenizer kind {kind!r}; known kinds are {KINDS}.')
