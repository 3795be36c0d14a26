"""The benchmark's PyTorch reference (research/torch_reference.py) is the same network as ours.

BENCHMARKS.md compares our training step with it, so it must compute the same function: with
our parameters copied in, its logits match our GPT's, and it drops out where ours does.
"""
from flax import linen as nn
import jax
import numpy as np
import pytest

from research.models.transformer import GPT

torch = pytest.importorskip('torch', reason='the PyTorch reference needs torch')
torch_reference = pytest.importorskip('research.torch_reference')

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def copy_into(reference, params):
  """Our Flax parameters into the reference's modules (torch Linear weights are [out, in])."""
  t = lambda x: torch.tensor(np.asarray(x))
  def linear(module, p):  # our kernel [in..., out...] as a matrix [in, out]
    module.weight.copy_(t(p['kernel'].reshape(-1, module.weight.shape[0])).T)
    module.bias.copy_(t(p['bias'].reshape(-1)))
  norm = lambda module, p: (module.weight.copy_(t(p['scale'])), module.bias.copy_(t(p['bias'])))
  with torch.no_grad():
    reference.wte.weight.copy_(t(params['wte']['embedding']))  # all 128 padded rows
    reference.wpe.weight.copy_(t(params['wpe']['embedding']))
    norm(reference.ln_f, params['ln_f'])
    for i, block in enumerate(reference.h):
      ours = params[f'h_{i}']
      for name in ('c_attn', 'attn_proj', 'c_fc', 'mlp_proj'):
        linear(getattr(block, name), ours[name])
      for name in ('ln_1', 'ln_2'):
        norm(getattr(block, name), ours[name])


@pytest.fixture(scope='module')
def params():
  x = jax.numpy.zeros((1, 16), jax.numpy.int32)
  params = nn.meta.unbox(GPT(**TINY).init(jax.random.key(0), x)['params'])
  # Non-trivial LayerNorms and biases, the other weights 10x GPT-2's init: activations and
  # logits of order 1, where a misplaced or different op (even exact for tanh GELU) shows.
  def perturb(path, p):
    if 'bias' in str(path) or 'scale' in str(path):
      return p + 0.1 * jax.random.normal(jax.random.key(len(str(path))), p.shape)
    return 10 * p  # kernels and embeddings
  return jax.tree_util.tree_map_with_path(perturb, params)


def reference_gpt(dropout):
  return torch_reference.GPT(128, TINY['block_size'], TINY['n_layer'], TINY['n_head'],
                             TINY['n_embd'], True, dropout)


def test_same_logits_as_ours(params):
  x = np.random.default_rng(0).integers(0, 50, (2, 16))
  reference = reference_gpt(dropout=0.0)
  copy_into(reference, params)
  with torch.no_grad():
    want = reference(torch.tensor(x)).numpy()[..., :TINY['vocab_size']]
  got = GPT(**TINY).apply({'params': params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_drops_out_where_ours_does(params):
  """Dropout on the embeddings and on each residual branch, at the config's rate: with every
  unit dropped, each block adds nothing and the embeddings are zero, so the logits are those of
  ln_f(0) for every token (ln_f's bias against the embedding table)."""
  reference = reference_gpt(dropout=1.0).train()
  copy_into(reference, params)
  x = np.random.default_rng(0).integers(0, 50, (2, 16))
  with torch.no_grad():
    got = reference(torch.tensor(x)).numpy()[..., :TINY['vocab_size']]
  want = np.asarray(params['ln_f']['bias'] @ params['wte']['embedding'][:50].T)
  np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-5)
  ours = GPT(**TINY, dropout_rate=1.0).apply(
      {'params': params}, x, train=True, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(ours, got, atol=1e-5)
  assert [m.p for m in reference.modules() if isinstance(m, torch.nn.Dropout)] == [1.0] * 3
