"""Tests for sampling: greedy decoding against full forward passes, top-k/top-p, streaming."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import sample
from research.models.transformer import GPT

MODEL = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
PROMPT = np.array([[3, 1, 4, 1], [5, 9, 2, 6]], np.int32)


@pytest.fixture(scope='module')
def params():
  return nn.meta.unbox(jax.jit(MODEL.init)(jax.random.key(0), jnp.asarray(PROMPT))['params'])


def test_greedy_matches_full_forward_argmax(params):
  # 4 + 13 - 1 = 16 = block_size: the last token is predicted from a full context.
  got = sample.generate(MODEL, params, PROMPT, max_new_tokens=13, rng=None, temperature=0)
  forward = jax.jit(lambda x: MODEL.apply({'params': params}, x))
  tokens = PROMPT
  for _ in range(13):  # Fixed-length windows so the forward pass compiles once.
    window = np.pad(tokens, ((0, 0), (0, 16 - tokens.shape[1])))
    next_token = np.argmax(forward(window)[:, tokens.shape[1] - 1], axis=-1)
    tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
  np.testing.assert_array_equal(got, tokens[:, 4:])
  assert got.shape == (2, 13) and got.dtype == np.int32


def test_top_k_1_is_greedy_and_callback_streams_every_token(params):
  greedy = sample.generate(MODEL, params, PROMPT, max_new_tokens=6, temperature=0)
  streamed = []
  top1 = sample.generate(MODEL, params, PROMPT, max_new_tokens=6, rng=jax.random.key(1),
                         temperature=1.5, top_k=1, callback=streamed.append)
  np.testing.assert_array_equal(top1, greedy)
  np.testing.assert_array_equal(np.stack(streamed, axis=-1), greedy)


def test_sampling_is_reproducible_and_varies_with_rng(params):
  draw = lambda seed: sample.generate(MODEL, params, PROMPT[0], max_new_tokens=12,
                                      rng=jax.random.key(seed), temperature=2.0, top_p=0.95)
  assert draw(0).shape == (12,)  # A prompt without a batch axis gives tokens without one.
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1))


def test_top_k_filter():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
  kept = np.isfinite(sample.top_k_filter(logits, 2))
  np.testing.assert_array_equal(kept, [[False, True, False, True]])
  assert np.all(np.isfinite(sample.top_k_filter(logits, 10)))


@pytest.mark.parametrize('p, want', [
    (0.4, [False, True, False, False, False]),   # 0.5 alone
    (0.7, [False, True, False, True, False]),    # 0.5 + 0.3 = 0.8 >= 0.7
    (0.9, [False, True, True, True, False]),     # 0.5 + 0.3 + 0.15 = 0.95 >= 0.9
    (0.98, [True, True, True, True, False]),     # ... + 0.04 = 0.99 >= 0.98
    (1.0, [True, True, True, True, True]),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, want):
  probs = jnp.array([0.04, 0.5, 0.15, 0.3, 0.01])
  logits = jnp.log(probs)[None]
  filtered = sample.top_p_filter(logits, p)
  np.testing.assert_array_equal(np.isfinite(filtered), [want])
  np.testing.assert_array_equal(filtered[np.isfinite(filtered)], logits[np.isfinite(filtered)])


def test_too_long_request_raises(params):
  with pytest.raises(ValueError, match='block_size=16'):
    sample.generate(MODEL, params, PROMPT, max_new_tokens=14, temperature=0)
  with pytest.raises(ValueError, match='rng'):
    sample.generate(MODEL, params, PROMPT, max_new_tokens=2)
  for bad in (dict(top_k=-3), dict(top_k=2.5)):  # -3: a JAX traceback
    with pytest.raises(ValueError, match='top_k=.*: use a number of tokens >= 1'):
      sample.generate(MODEL, params, PROMPT, max_new_tokens=2, rng=jax.random.key(0), **bad)
  with pytest.raises(ValueError, match=r'top_p=1.5: use a probability in \(0, 1\]'):
    sample.generate(MODEL, params, PROMPT, max_new_tokens=2, rng=jax.random.key(0), top_p=1.5)
  for bad in (-1.0, float('nan')):  # -1 sampled from the least likely tokens, without a word
    with pytest.raises(ValueError, match='use 0 \\(greedy\\) or a positive number'):
      sample.generate(MODEL, params, PROMPT, max_new_tokens=2, rng=jax.random.key(0),
                      temperature=bad)


def test_sample_text_goes_on_past_the_context(params):
  """max_new_tokens beyond block_size (16) are all produced, continuing from the newest half of
  the context; the first tokens are generate's own, and the rest follow from that half."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from research.data import tokenizers  # pylint: disable=g-import-not-at-top
  class Recording(tokenizers.ByteTokenizer):
    def decode(self, ids):
      self.last = list(ids)  # the last call decodes all the new tokens
      return super().decode(ids)

  tokenizer = Recording()
  model = GPT(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
  weights = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  settings = ml_collections.ConfigDict(dict(prompt='abc', max_new_tokens=40, temperature=0.0,
                                            top_k=0, top_p=0.0))
  streamed = []
  text = sample.sample_text(model, weights, tokenizer, settings, None, stream=streamed.append)
  ids = tokenizer.last
  assert len(ids) == 40 and text.startswith(''.join(streamed))
  prompt = tokenizer.encode('abc')
  first = sample.generate(model, weights, prompt, max_new_tokens=14, temperature=0)
  np.testing.assert_array_equal(ids[:14], first)
  # After the first 14 (3 + 13 fed, the 14th never), the next come from the last 8 tokens alone.
  again = sample.generate(model, weights, np.concatenate([prompt, first])[-8:],
                          max_new_tokens=9, temperature=0)
  np.testing.assert_array_equal(ids[14:23], again)
  assert sample.sample_text(model, weights, tokenizer, settings, None) == text  # not streamed
  # A run trained on windows of 8 (config.data.seq_len < block_size): its positions 8-15 were
  # never trained, and sampling conditions on 8 tokens at most (it ran on to 16).
  text = sample.sample_text(model, weights, tokenizer, settings, None, context_len=8)
  ids = tokenizer.last
  assert len(ids) == 40
  first = sample.generate(model, weights, prompt, max_new_tokens=6, temperature=0)
  np.testing.assert_array_equal(ids[:6], first)  # 3 + 5 fed
  again = sample.generate(model, weights, np.concatenate([prompt, first])[-4:],
                          max_new_tokens=5, temperature=0)
  np.testing.assert_array_equal(ids[6:11], again)


def test_sample_text_needs_a_context_of_two_tokens():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from research.data import tokenizers  # pylint: disable=g-import-not-at-top
  model = GPT(vocab_size=257, block_size=1, n_layer=1, n_head=1, n_embd=8)
  settings = ml_collections.ConfigDict(dict(prompt='a', max_new_tokens=3, temperature=0.0,
                                            top_k=0, top_p=0.0))
  with pytest.raises(ValueError, match='a context of at least 2 tokens'):  # it looped forever
    sample.sample_text(model, None, tokenizers.ByteTokenizer(), settings, None)
  with pytest.raises(ValueError, match=r'it is 1 \(config.model.block_size=16'):
    sample.sample_text(MODEL, None, tokenizers.ByteTokenizer(), settings, None, context_len=1)


def test_a_tail_that_never_makes_a_whole_character_is_still_streamed():
  """The stream holds a piece back while it ends in half a UTF-8 character; a sample that ends
  that way (here every byte is 0xE2, a 3-byte character's lead) used to lose that tail in the
  stream (--mode=sample prints the stream) while the returned text had it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from research.data import tokenizers  # pylint: disable=g-import-not-at-top
  model = GPT(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=32)
  weights = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  weights['ln_f']['scale'] = jnp.zeros_like(weights['ln_f']['scale'])  # logits: 1000 * wte @ e
  weights['ln_f']['bias'] = 1000 * weights['wte']['embedding'][0xE2]
  config = ml_collections.ConfigDict(dict(prompt='Price: ', max_new_tokens=5, temperature=0.0,
                                          top_k=0, top_p=0.0))
  streamed = []
  text = sample.sample_text(model, weights, tokenizers.ByteTokenizer(), config, None,
                            stream=streamed.append)
  assert text and '\ufffd' in text
  assert ''.join(streamed) == text


# Distribution tests: sample_logits on DRAWS identical rows of fixed logits (one call, one key;
# every row is an independent draw), empirical frequencies against numpy.
DRAWS = 20_000
PROBS = np.array([0.5, 0.3, 0.15, 0.04, 0.01])


def frequencies(temperature, top_k=None, top_p=None, seed=0):
  logits = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (DRAWS, 1))
  ids = sample.sample_logits(logits, jax.random.key(seed), temperature, top_k, top_p)
  assert ids.shape == (DRAWS,) and ids.dtype == jnp.int32
  return np.bincount(np.asarray(ids), minlength=len(PROBS)) / DRAWS


def softmax_kept(temperature, keep):
  p = np.exp(np.log(PROBS) / temperature) * np.asarray(keep, np.float64)
  return p / p.sum()


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_sample_logits_frequencies_follow_temperature(temperature):
  """Catches temperature ignored (logits not divided by it): at T=0.5 the top token's
  probability is 0.69, not 0.5; at T=2 it is 0.35."""
  want = softmax_kept(temperature, [1, 1, 1, 1, 1])
  assert np.abs(want - PROBS).max() > 0.1  # the temperature matters by far more than the noise
  np.testing.assert_allclose(frequencies(temperature), want, atol=0.012)


@pytest.mark.parametrize('cut, kept, cut_at_half_temperature, kept_at_half_temperature', [
    # 0.7 keeps {0.5, 0.3}; at T=0.5 the probabilities are [0.69, 0.25, ...], and 0.9 keeps two.
    (dict(top_p=0.7), [1, 1, 0, 0, 0], dict(top_p=0.9), [1, 1, 0, 0, 0]),
    (dict(top_k=2), [1, 1, 0, 0, 0], dict(top_k=3), [1, 1, 1, 0, 0]),
])
def test_sample_logits_frequencies_with_top_p_and_top_k(cut, kept, cut_at_half_temperature,
                                                        kept_at_half_temperature):
  """Catches top_p or top_k ignored: the tokens kept, renormalised, and no others."""
  freq = frequencies(1.0, **cut)
  np.testing.assert_allclose(freq, softmax_kept(1.0, kept), atol=0.012)
  assert freq[np.array(kept) == 0].sum() == 0
  np.testing.assert_allclose(frequencies(0.5, seed=1, **cut_at_half_temperature),
                             softmax_kept(0.5, kept_at_half_temperature), atol=0.012)


def test_each_generated_token_gets_its_own_randomness(params):
  """Catches generate's step reusing one key for every token (no fold_in of the position): at
  a huge temperature the logits hardly matter, so one key gives the same Gumbel noise, and so
  the same token, at every position. With a key per position 12 tokens from ~50 equally likely
  ones are not all the same (chance 50**-11) in any row."""
  tokens = sample.generate(MODEL, params, PROMPT, max_new_tokens=12, rng=jax.random.key(3),
                           temperature=1e6)
  for row in tokens:
    assert len(set(row.tolist())) > 3, row


def make_text_model():
  from research.data import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.ByteTokenizer()
  model = GPT(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)
  weights = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, weights, tokenizer


def test_sample_text_uses_top_k_and_top_p_from_the_config():
  """Catches sample_text dropping config.sample.top_k (or top_p): top_k=1, or a nucleus of
  one token, at temperature 1.5 must give exactly the greedy text; sampling all 257 byte ids
  at 1.5 from a random model does not."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  model, weights, tokenizer = make_text_model()
  settings = lambda **kw: ml_collections.ConfigDict(dict(
      dict(prompt='abc', max_new_tokens=10, temperature=0.0, top_k=0, top_p=0.0), **kw))
  greedy = sample.sample_text(model, weights, tokenizer, settings(), None)
  rng = jax.random.key(5)
  free = sample.sample_text(model, weights, tokenizer, settings(temperature=1.5), rng)
  assert free != greedy  # the sampling itself is not greedy
  for top_k, top_p in [(1, 0.0), (0, 1e-6)]:
    filtered = sample.sample_text(model, weights, tokenizer,
                                  settings(temperature=1.5, top_k=top_k, top_p=top_p), rng)
    assert filtered == greedy, (top_k, top_p)
