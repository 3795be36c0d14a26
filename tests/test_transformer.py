"""Tests for the GPT model: shapes, causality, KV cache, attention, scan, remat, GPT-2 parity."""
import functools
import types

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import transformer
from research.models.transformer import GPT

# vocab 50 -> 128 padded rows, so the slicing of the padding is exercised everywhere.
TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tokens(batch=2, time=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, time), 0, TINY['vocab_size'])


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, x):
  return model.apply({'params': params}, x)


@functools.partial(jax.jit, static_argnums=0)
def decode_step(decoder, params, cache, x):
  logits, state = decoder.apply({'params': params, 'cache': cache}, x, mutable=['cache'])
  return logits, state['cache']


@pytest.fixture(scope='module')
def params():
  # Parameters carry logical axis names (for sharding) until unboxed.
  return nn.meta.unbox(jax.jit(GPT(**TINY).init)(jax.random.key(1), tokens())['params'])


def test_shape_dtype_and_padding(params):
  assert params['wte']['embedding'].shape == (128, 32)
  logits = forward(GPT(**TINY), params, tokens())
  assert logits.shape == (2, 12, 50) and logits.dtype == jnp.float32
  bf16 = forward(GPT(**TINY, dtype=jnp.bfloat16), params, tokens())
  assert bf16.shape == (2, 12, 50) and bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, logits, atol=0.05)
  # The padding rows of the tied embedding are never predicted: changing them changes nothing.
  padded = {**params, 'wte': {'embedding': params['wte']['embedding'].at[50:].set(100.0)}}
  np.testing.assert_array_equal(forward(GPT(**TINY), padded, tokens()), logits)


def test_init_follows_gpt2(params):
  assert np.std(params['wte']['embedding']) == pytest.approx(0.02, rel=0.1)
  assert np.std(params['h_0']['c_fc']['kernel']) == pytest.approx(0.02, rel=0.1)
  assert np.std(params['h_0']['mlp_proj']['kernel']) == pytest.approx(0.01, rel=0.1)  # 0.02/sqrt(4)
  assert not np.any(params['h_0']['c_attn']['bias'])
  np.testing.assert_array_equal(params['ln_f']['scale'], 1.0)


def test_causal(params):
  model, x = GPT(**TINY), tokens()
  t = 6
  changed = x.at[:, t].set((x[:, t] + 1) % TINY['vocab_size'])
  a, b = forward(model, params, x), forward(model, params, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.all(np.abs(a[:, t] - b[:, t]).max(-1) > 1e-4)


def test_reference_attention_matches_xla(params):
  x = tokens()
  xla = forward(GPT(**TINY), params, x)
  ref = forward(GPT(**TINY, attention='reference'), params, x)
  np.testing.assert_allclose(ref, xla, atol=1e-5)


def decode(model, params, chunks):
  """Feeds the token chunks through the KV cache; returns the concatenated logits."""
  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), chunks[0][:, :1])['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  outputs = []
  for chunk in chunks:
    logits, cache = decode_step(decoder, params, cache, chunk)
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1)


def gpu(platform_version, compute_capability):
  """A stand-in for a GPU device, as `cudnn_flash_attention` reads one."""
  return types.SimpleNamespace(client=types.SimpleNamespace(platform_version=platform_version),
                               compute_capability=compute_capability)


def test_auto_attention_picks_cudnn_only_where_it_applies(monkeypatch):
  q16 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  assert transformer.attention_for(q16, jnp.ones((1, 1, 8, 8), bool)) == 'xla'  # decoding
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  h100 = gpu('PJRT C API\ncuda 12080', '9.0')
  monkeypatch.setattr(jax, 'devices', lambda: [h100])
  assert transformer.attention_for(q16, None) == 'cudnn'
  for other in (gpu('PJRT C API\ncuda 12080', '7.0'),  # a V100: cuDNN's flash needs Ampere
                gpu('PJRT C API\nrocm 60342', '9.0')):  # ROCm also says 'gpu'
    monkeypatch.setattr(jax, 'devices', lambda device=other: [device])
    assert transformer.attention_for(q16, None) == 'xla'
  monkeypatch.setattr(jax, 'devices', lambda: [gpu('cuda 12080', '8.0')])  # an A100
  assert transformer.attention_for(q16, None) == 'cudnn'
  assert transformer.attention_for(q16.astype(jnp.float32), None) == 'xla'  # cuDNN wants 16-bit
  assert transformer.attention_for(q16, jnp.ones((1, 1, 8, 8), bool)) == 'xla'  # cache mask
  assert transformer.attention_for(jnp.zeros((1, 8, 2, 160), jnp.bfloat16), None) == 'xla'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert transformer.attention_for(q16, None) == 'chunked'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert transformer.attention_for(q16, None) == 'xla'


@pytest.mark.parametrize('features,names,in_dims,shape', [
    ((3, 2, 4), ('embed', None, 'heads', 'kv'), 1, (2, 5, 8)),  # c_attn
    (8, ('heads', 'kv', 'embed'), 2, (2, 5, 2, 4)),             # attn_proj
    (8, ('embed', 'mlp'), 1, (3, 1, 8)),                        # one decoding step
])
def test_dense_same_on_every_backend(monkeypatch, features, names, in_dims, shape):
  """Dense flattens its kernel to a matrix only on CPUs: the accelerator branch (tokens x the
  kernel's own axes) gives the same outputs and gradients, and both match an einsum."""
  dense = transformer.Dense(features, names, in_dims)
  x = jax.random.normal(jax.random.key(0), shape)
  params = jax.tree.map(lambda p: p + 0.1, nn.unbox(dense.init(jax.random.key(1), x)))
  loss = lambda p, x: (dense.apply(p, x) ** 2).sum()
  results = {}
  for backend in ('cpu', 'gpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    results[backend] = (dense.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x))
  kernel, bias = params['params']['kernel'], params['params']['bias']
  letters = 'abcdefgh'[:x.ndim - in_dims], 'xy'[:in_dims], 'pqr'[:kernel.ndim - in_dims]
  expected = jnp.einsum(f'{letters[0]}{letters[1]},{letters[1]}{letters[2]}->'
                        f'{letters[0]}{letters[2]}', x, kernel) + bias
  for backend, (out, grads) in results.items():
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=backend)
  for a, b in zip(jax.tree.leaves(results['cpu']), jax.tree.leaves(results['gpu'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('time,chunk', [(16, 4), (13, 4), (5, 8)])  # ragged last block; one block
def test_chunked_attention_matches_reference_and_its_gradient(time, chunk):
  rng = np.random.default_rng(time)
  q, k, v, g = (jnp.asarray(rng.normal(size=(2, time, 3, 8)), jnp.float32) for _ in range(4))
  reference = lambda q, k, v: transformer.attend(q, k, v, None, 'reference')
  chunked = lambda q, k, v: transformer.chunked_causal_attention(q, k, v, chunk)
  out, vjp = jax.vjp(chunked, q, k, v)
  expected, expected_vjp = jax.vjp(reference, q, k, v)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  for got, want in zip(vjp(g), expected_vjp(g)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('attention', ['auto', 'xla', 'chunked', 'reference'])
def test_kv_cache_matches_full_forward(params, attention):
  model, x = GPT(**TINY, attention=attention), tokens(time=16)  # the whole context
  full = forward(model, params, x)
  one_by_one = decode(model, params, [x[:, i:i + 1] for i in range(16)])
  np.testing.assert_allclose(one_by_one, full, atol=1e-5)
  chunked = decode(model, params, [x[:, :5]] + [x[:, i:i + 1] for i in range(5, 16)])
  np.testing.assert_allclose(chunked, full, atol=1e-5)


def stack_layers(params, n_layer):
  """Unscanned params (h_0, h_1, ...) -> scanned params (h with a leading layer axis)."""
  blocks = [params[f'h_{i}'] for i in range(n_layer)]
  rest = {k: v for k, v in params.items() if not k.startswith('h_')}
  return {**rest, 'h': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def test_scan_layers_same_logits_and_cache(params):
  x = tokens(time=16)
  scanned = GPT(**TINY, scan_layers=True)
  init_shapes = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x)['params'])
  stacked = stack_layers(params, TINY['n_layer'])
  assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, stacked)
  full = forward(GPT(**TINY), params, x)
  np.testing.assert_allclose(forward(scanned, stacked, x), full, atol=1e-5)
  cached = decode(scanned, stacked, [x[:, :5]] + [x[:, i:i + 1] for i in range(5, 16)])
  np.testing.assert_allclose(cached, full, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grad(model, params, x):
  return jax.value_and_grad(lambda p: jnp.mean(forward(model, p, x) ** 2))(params)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_same_outputs_and_grads(params, remat):
  want = loss_and_grad(GPT(**TINY), params, tokens())
  got = loss_and_grad(GPT(**TINY, remat=remat), params, tokens())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


def _temporary_bytes(**fields) -> int:
  """XLA's temporary memory for the loss and gradients of a 4-layer GPT (activations dominate)."""
  model = GPT(**{**TINY, 'block_size': 128, 'n_embd': 64, 'n_layer': 4, **fields})
  x = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)['params'])
  return loss_and_grad.lower(model, shapes, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA's CPU compiler's behaviour")
def test_remat_saves_memory_on_cpus_only_with_scanned_layers(caplog, monkeypatch):
  """Scanned: 'full' keeps a fraction of the activations. Unrolled, XLA's CPU compiler folds the
  recomputation back in and the step keeps them all, so the model warns (if this starts to
  fail on the unrolled side, XLA keeps remat there now and REMAT_ON_CPU can go)."""
  scanned = _temporary_bytes(scan_layers=True)
  assert _temporary_bytes(scan_layers=True, remat='full') < 0.5 * scanned
  unrolled = _temporary_bytes()
  assert _temporary_bytes(remat='full') > 0.9 * unrolled
  monkeypatch.setattr(transformer, '_WARNED', set())
  with caplog.at_level('WARNING'):
    for scan in (True, False, False):  # said once
      GPT.check_fields({'remat': 'full', 'scan_layers': scan})
  assert [r.getMessage() for r in caplog.records] == [transformer.REMAT_ON_CPU.format('full')]


def test_dropout_only_in_training(params):
  model, x = GPT(**TINY, dropout_rate=0.5), tokens()
  np.testing.assert_array_equal(forward(model, params, x), forward(GPT(**TINY), params, x))
  train = jax.jit(lambda seed: model.apply({'params': params}, x, train=True,
                                           rngs={'dropout': jax.random.key(seed)}))
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))


def test_gpt2_small_param_count():
  model = GPT(**transformer.gpt_config('small', vocab_size=50257))
  shapes = nn.meta.unbox(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  # 124,475,904 with the embedding padded to 50304 rows (124,439,808 unpadded, as in nanoGPT).
  assert transformer.count_params(shapes) == 124_475_904
  # nanoGPT's count: 6 * (N - wpe) + 12 L C T = 6 * 123,689,472 + 113,246,208.
  non_position = 124_475_904 - shapes['wpe']['embedding'].size
  assert transformer.flops_per_token(non_position, 12, 768, 1024) == 855_383_040


def test_clear_errors():
  with pytest.raises(ValueError, match='config.model.block_size=16'):
    GPT(**TINY).init(jax.random.key(0), tokens(time=17))
  with pytest.raises(ValueError, match='n_embd=30 must be divisible by config.model.n_head=4'):
    GPT(**{**TINY, 'n_embd': 30, 'n_head': 4}).init(jax.random.key(0), tokens())
  with pytest.raises(ValueError, match='config.model.attention'):
    GPT(**TINY, attention='flash').init(jax.random.key(0), tokens())
  with pytest.raises(ValueError, match='config.model.remat'):
    GPT(**TINY, remat='some').init(jax.random.key(0), tokens())
  with pytest.raises(ValueError, match='Unknown GPT size'):
    transformer.gpt_config('tiny')


def test_matches_huggingface_gpt2():
  torch = pytest.importorskip('torch', reason='the GPT-2 parity test needs torch')
  transformers = pytest.importorskip('transformers', reason='the parity test needs transformers')
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
      activation_function='gelu_new', resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
  with torch.no_grad():  # Non-trivial LayerNorm parameters and biases.
    for name, p in hf.named_parameters():
      if 'ln' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
      else:  # weights 10x GPT-2's init: activations of order 1, where GELU's tanh form and
        p.mul_(10.0)  # the exact one move the logits by 9e-4 (at the init scale: 6e-7)
  sd = {k.removeprefix('transformer.'): jnp.asarray(v.numpy()) for k, v in hf.state_dict().items()}

  ours = jax.tree.map(np.array, nn.meta.unbox(
      GPT(**TINY).init(jax.random.key(0), tokens())['params']))
  ours['wte']['embedding'][:50] = sd['wte.weight']  # Padding rows keep their random init.
  ours['wpe']['embedding'] = sd['wpe.weight']
  ours['ln_f'] = {'scale': sd['ln_f.weight'], 'bias': sd['ln_f.bias']}
  # HF Conv1D weights are [in, out] like our kernels, which split heads out of the width:
  # c_attn [C, 3C] -> [C, 3, heads, head_dim], attn_proj [C, C] -> [heads, head_dim, C].
  names = {'c_attn': 'attn.c_attn', 'attn_proj': 'attn.c_proj', 'c_fc': 'mlp.c_fc',
           'mlp_proj': 'mlp.c_proj'}
  for i in range(2):
    layer = ours[f'h_{i}']
    for name, theirs in names.items():
      kernel, bias = sd[f'h.{i}.{theirs}.weight'], sd[f'h.{i}.{theirs}.bias']
      layer[name] = {'kernel': kernel.reshape(layer[name]['kernel'].shape),
                     'bias': bias.reshape(layer[name]['bias'].shape)}
    for name in ('ln_1', 'ln_2'):
      layer[name] = {'scale': sd[f'h.{i}.{name}.weight'], 'bias': sd[f'h.{i}.{name}.bias']}

  x = tokens(time=16)
  with torch.no_grad():
    want = hf(torch.tensor(np.asarray(x), dtype=torch.long)).logits.numpy()
  got = forward(GPT(**TINY), ours, x)
  assert got.shape == want.shape == (2, 16, 50)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_scanned_layers_draw_their_own_dropout_masks(params):
  """Catches nn.scan broadcasting the dropout rng (split_rngs={'dropout': False}): every layer
  would then drop the same units. With one token, the gradient of a layer's mlp_proj bias is
  (its dropout mask / keep) x the upstream gradient, so it is zero exactly where that layer's
  last dropout dropped a unit: the zero patterns of the layers must differ."""
  model = GPT(**TINY, dropout_rate=0.5, scan_layers=True)
  stacked = stack_layers(params, TINY['n_layer'])
  x = tokens(batch=1, time=1)
  weights = jax.random.normal(jax.random.key(3), (1, 1, TINY['vocab_size']))

  @jax.jit
  def bias_grads(seed):
    loss = lambda p: jnp.sum(weights * model.apply(
        {'params': p}, x, train=True, rngs={'dropout': jax.random.key(seed)}))
    return jax.grad(loss)(stacked)['h']['mlp_proj']['bias']  # [layer, n_embd]

  for seed in range(3):
    dropped = np.asarray(bias_grads(seed)) == 0
    assert dropped.shape == (TINY['n_layer'], TINY['n_embd'])
    assert all(0.2 < d.mean() < 0.8 for d in dropped)  # dropout at work in every layer
    assert (dropped[0] != dropped[1]).any(), f'seed {seed}: layers dropped the same units'
