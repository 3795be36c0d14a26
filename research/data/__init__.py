"""Input pipelines behind one interface: images and tabular data (image.py), text (text.py).

`build(config)` returns a `Data` whose training batches are a pure function of (seed, step),
so resuming needs only the step. Every evaluation batch carries a 'mask' (1 = a real example).
"""
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from research.data import image
from research.data import text


@dataclasses.dataclass
class Data:
  train_batches: Callable[[int], Iterator[dict]]  # start step -> this process's batches
  eval_batches: Callable[[], Iterable[dict]]      # the eval split once, masked
  input_shape: tuple                              # one example
  input_dtype: Any
  num_classes: int = 0                            # 0: regression or language modelling
  tokenizer: Any = None                           # text only
  eval_split: str = ''                            # what eval_batches evaluates, by name


def _init_from_tokenizer(config, workdir: str | None):
  """For a run started from `config.init_from`: the tokenizer it took from that run (its
  embeddings are of its token ids, so fine-tuning on other text keeps it, where a 'char' or
  'bpe' one would be learnt anew from that text): once the run has saved it, its own copy in
  `workdir` (the other run may be gone); else the other run's; else None."""
  if not config.init_from:
    return None
  candidates = [os.path.join(run, 'tokenizer') for run in (workdir, config.init_from) if run]
  path = next((p for p in candidates if os.path.exists(os.path.join(p, 'tokenizer.json'))),
              None)
  if path is None:
    return None
  tokenizer = text.tokenizers.load(path)
  if tokenizer.kind != config.data.tokenizer:
    raise ValueError(f'config.init_from={config.init_from!r} was trained with tokenizer '
                     f'{tokenizer.kind!r}; set config.data.tokenizer={tokenizer.kind!r} (its '
                     'own, from that run, is used).')
  return tokenizer


def build(config, workdir: str | None = None) -> Data:
  """Builds `config.data` for this process (each process reads only its share); `workdir`: the
  run's, where a run started from config.init_from keeps that run's tokenizer."""
  index, count = jax.process_index(), jax.process_count()
  eval_batch_size = config.eval_batch_size or config.batch_size
  if config.data.name == 'text':
    if (config.data.train_split, config.data.eval_split) != ('train', 'test'):
      raise ValueError('config.data.train_split and eval_split are not used by text data, which '
                       'holds out its own validation text (research/data/text.py): leave them '
                       "at 'train' and 'test'.")
    inherited = _init_from_tokenizer(config, workdir)
    try:
      lm = text.build_lm_data(
          config.data.source, config.data.tokenizer, config.data.seq_len, config.batch_size,
          config.seed, tokenizer=inherited,
          eval_batch_size=eval_batch_size, vocab_size=config.data.vocab_size or None,
          cache_dir=config.data.cache_dir or os.path.expanduser('~/.cache/research/tokenizers'),
          process_index=index, process_count=count, max_bytes=config.data.max_bytes or None,
          max_eval_batches=config.max_eval_batches or None,
          data_dir=config.data.data_dir or None, download=config.data.download)
    except text.tokenizers.UnknownCharacter as e:
      if inherited is None:
        raise
      raise text.tokenizers.UnknownCharacter(e.char, (
          f'character {e.char!r} (U+{ord(e.char):04X}) of config.data.source is not in the '
          f'char alphabet of config.init_from={config.init_from!r} ({len(inherited.chars)} '
          'characters), whose tokenizer this run keeps (its embeddings are of those '
          'characters): remove such characters from the text, or train a new model without '
          'init_from.')) from None
    return Data(train_batches=lm.train.iterate, eval_batches=lambda: lm.eval_batches,
                input_shape=(config.data.seq_len,), input_dtype=np.int32,
                tokenizer=lm.tokenizer, eval_split='validation')
  images = image.build(config.data, config.batch_size, config.seed, index, count,
                       eval_batch_size=eval_batch_size)
  return Data(train_batches=lambda start: image.prefetch(images.train, start),
              eval_batches=lambda: image.prefetch(images.eval_batches),
              input_shape=images.input_shape, input_dtype=np.float32,
              num_classes=images.num_classes, eval_split=config.data.eval_split)
