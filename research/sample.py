"""Autoregressive sampling from a trained GPT with its KV cache.

    new_tokens = generate(model, params, prompt, max_new_tokens=100, rng=jax.random.key(0),
                          temperature=0.8, top_k=50, callback=print)

The model is cloned with `decode=True`; an empty cache is built for the prompt's batch size,
the whole prompt is fed in one call, then each sampled token is fed back one at a time. Both
go through one jitted step, compiled once for the prompt's length and once for a single token,
and reused across calls with the same model and sampling settings.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def top_k_filter(logits, k: int):
  """Sets all but the k largest logits (and those tied with the k-th) to -inf."""
  kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
  """Nucleus filtering: keeps the smallest set of most likely tokens whose probability is >= p.

  A token is kept when the probability of the tokens more likely than it is still below p
  (tokens tied with the last one kept are kept too); the others are set to -inf.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_logits(logits, rng, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Samples token ids [batch] from logits [batch, vocab]; temperature 0 is greedy (argmax)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    logits = top_k_filter(logits, top_k)
  if top_p is not None and top_p < 1:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('decoder', 'temperature', 'top_k', 'top_p'),
                   donate_argnames='cache')  # The cache is updated in place.
def _step(decoder, params, cache, tokens, rng, i, temperature, top_k, top_p):
  """Feeds tokens [batch, time] through the cache; samples the token that follows them."""
  logits, state = decoder.apply({'params': params, 'cache': cache}, tokens, mutable=['cache'])
  rng = jax.random.fold_in(rng, i)
  return state['cache'], sample_logits(logits[:, -1], rng, temperature, top_k, top_p)


def generate(model, params, prompt_tokens, *, max_new_tokens: int, rng=None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             callback: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
  """Samples `max_new_tokens` tokens after `prompt_tokens` with the model's KV cache.

  Args:
    model: a `GPT` module (its `decode` field is ignored).
    params: its parameters (`variables['params']`).
    prompt_tokens: int token ids [batch, time], or [time] for one sequence.
    max_new_tokens: how many tokens to sample; the prompt and all new tokens but the last (which
      is never fed back) must fit in block_size.
    rng: a `jax.random.key`; may be None only when temperature is 0.
    temperature: softmax temperature; 0 takes the most likely token.
    top_k: if set, sample among the k most likely tokens only.
    top_p: if set, sample among the smallest set of tokens with probability >= top_p.
    callback: called with each new token as it is produced, shaped like the prompt without its
      time axis (so a CLI can stream text); this waits for each token on the host.

  Returns:
    The new tokens only, int32 [batch, max_new_tokens] (or [max_new_tokens]).
  """
  prompt = np.asarray(prompt_tokens, np.int32)
  tokens = jnp.asarray(prompt.reshape(-1, prompt.shape[-1]))
  batch, length = tokens.shape
  if length == 0:
    raise ValueError('generate needs a prompt of at least one token.')
  if length + max_new_tokens - 1 > model.block_size:  # the last new token is not fed back
    raise ValueError(f'Prompt of {length} tokens + max_new_tokens={max_new_tokens} exceeds '
                     f'config.model.block_size={model.block_size} + 1.')
  if not temperature >= 0:  # also NaN
    raise ValueError(f'temperature={temperature}: use 0 (greedy) or a positive number.')
  if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
    raise ValueError(f'top_k={top_k}: use a number of tokens >= 1 (or 0/None: all of them).')
  if top_p is not None and not 0 < top_p <= 1:  # also NaN
    raise ValueError(f'top_p={top_p}: use a probability in (0, 1] (or 0/None: off).')
  if rng is None and temperature != 0:
    raise ValueError('generate needs an rng to sample with temperature > 0.')
  rng = jax.random.key(0) if rng is None else rng

  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens[:, :1])['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  new_tokens = []
  for i in range(max_new_tokens):
    cache, tokens = _step(decoder, params, cache, tokens, rng, i, temperature, top_k, top_p)
    new_tokens.append(tokens)
    if callback is not None:
      callback(np.asarray(tokens).reshape(prompt.shape[:-1]))
    tokens = tokens[:, None]
  out = np.asarray(jnp.stack(new_tokens, axis=-1)) if new_tokens else np.zeros((batch, 0))
  return out.astype(np.int32).reshape(*prompt.shape[:-1], max_new_tokens)


def sample_text(model, params, tokenizer, sample_config, rng,
                stream: Callable[[str], None] | None = None,
                context_len: int | None = None) -> str:
  """Text continuing `sample_config.prompt` (temperature, top_k and top_p from the config).

  `stream(piece)` receives the text as it is produced (whole characters only). `context_len`:
  the most tokens each prediction conditions on; pass the run's config.data.seq_len, the
  windows it was trained on (default: the model's block_size; positions past seq_len were
  never trained). All `max_new_tokens` are produced, however many that is: when the context is
  full, sampling goes on from its last context_len // 2 tokens (the cache rebuilt from them),
  as nanoGPT's sampling crops its context to the newest tokens. A prompt longer than the
  context keeps its end.
  """
  context_len = min(context_len or model.block_size, model.block_size)
  if context_len < 2:
    raise ValueError(f'Sampling needs a context of at least 2 tokens (one to condition on and '
                     f'one to predict); it is {context_len} (config.model.block_size='
                     f'{model.block_size}, config.data.seq_len).')
  prompt = tokenizer.encode(sample_config.prompt)
  if not len(prompt):
    prompt = np.array([tokenizer.eot_id], np.int32)  # start a new document
  context = prompt[-context_len:]
  streamer = TextStream(tokenizer, stream) if stream is not None else None
  produced = streamer.ids if streamer else []

  remaining, segment = sample_config.max_new_tokens, 0
  while remaining > 0:
    count = min(remaining, context_len + 1 - len(context))
    segment_rng = rng if segment == 0 or rng is None else jax.random.fold_in(rng, segment)
    new = generate(model, params, context, max_new_tokens=count, rng=segment_rng,
                   temperature=sample_config.temperature, top_k=sample_config.top_k or None,
                   top_p=sample_config.top_p or None, callback=streamer and streamer.add)
    if streamer is None:  # without a callback generate does not wait for each token
      produced.extend(int(token) for token in new)
    context = np.concatenate([context, new])[-(context_len // 2):]
    remaining, segment = remaining - count, segment + 1
  text = tokenizer.decode(produced)
  if streamer:
    streamer.finish(text)
  return text


class TextStream:
  """Streams the text of tokens given one at a time (`add`), whole characters only: a piece
  waits while it ends in half a UTF-8 character.

  Each token decodes only the tokens since the piece before the last one streamed, twice (with
  and without the new ones: the difference is the new text), as vLLM's incremental
  detokenisation does, not all the tokens so far (quadratic: 2.7 s of decoding for 4,000
  tokens). The window starts at a token already streamed, so a tokenizer that drops the space
  starting a text (SentencePiece) drops it from both decodes alike.
  """

  def __init__(self, tokenizer, stream: Callable[[str], None]):
    self.tokenizer, self.stream = tokenizer, stream
    self.ids, self.pieces = [], []
    self.start = self.done = 0  # the window decoded; the end of what has been streamed

  def add(self, token):
    self.ids.append(int(token))
    before = self.tokenizer.decode(self.ids[self.start:self.done])
    text = self.tokenizer.decode(self.ids[self.start:])
    if len(text) > len(before) and not text.endswith('\ufffd'):  # a whole character more
      self.pieces.append(text[len(before):])
      self.stream(self.pieces[-1])
      self.start, self.done = self.done, len(self.ids)

  def finish(self, text: str):
    """`text`, the whole decode: streams a tail held back for a character never whole."""
    shown = ''.join(self.pieces)
    if text != shown:
      self.stream(text[len(shown):])


def load_trained(workdir: str):
  """(model, params, tokenizer, config) of the newest checkpoint of a language-model run that
  loads (a damaged newer one is said and left in place).

  The parameters are on one device, so a run trained on many devices samples on a machine
  with one.
  """
  import os  # pylint: disable=g-import-not-at-top
  from research import checkpoint  # pylint: disable=g-import-not-at-top
  from research import models  # pylint: disable=g-import-not-at-top
  from research import saved_config  # pylint: disable=g-import-not-at-top
  from research.data import tokenizers  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} does not exist: pass the --workdir of a trained run.')
  config = saved_config.get_config(workdir)
  if not os.path.isdir(os.path.join(workdir, 'tokenizer')):
    raise FileNotFoundError(f'{workdir} has no tokenizer/: it is not a language-model run.')
  tokenizer = tokenizers.load(os.path.join(workdir, 'tokenizer'))
  # On this process's first device, whatever devices and layout the run was trained with.
  params = checkpoint.restore_params(workdir, hint=': train first')
  model = models.build_model(config.model)
  return model, params, tokenizer, config
