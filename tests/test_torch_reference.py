"""The benchmark's PyTorch reference (research/torch_reference.py) is the same network as ours.

BENCHMARKS.md compares our training step with it, so it must compute the same function: with
our parameters copied in, its logits match our GPT's (with and without biases), its autograd
gradients match ours, and it drops out exactly where ours does.
"""
import functools
import importlib

from flax import linen as nn
import jax
import numpy as np
import pytest

from research.models.transformer import GPT

torch = pytest.importorskip('torch', reason='the PyTorch reference needs torch')

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope='module')
def torch_reference():
  # Its import tunes malloc for a benchmark process (research/hostmem.py), not for pytest's.
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('RESEARCH_KEEP_FREED_MEMORY', '0')
    return importlib.import_module('research.torch_reference')


@functools.cache
def our_params(use_bias=True):
  x = jax.numpy.zeros((1, 16), jax.numpy.int32)
  params = nn.meta.unbox(GPT(**TINY, use_bias=use_bias).init(jax.random.key(0), x)['params'])
  # Non-trivial LayerNorms and biases, the other weights 10x GPT-2's init: activations and
  # logits of order 1, where a misplaced or different op (even exact for tanh GELU) shows.
  def perturb(path, p):
    if 'bias' in str(path) or 'scale' in str(path):
      return p + 0.1 * jax.random.normal(jax.random.key(len(str(path))), p.shape)
    return 10 * p  # kernels and embeddings
  return jax.tree_util.tree_map_with_path(perturb, params)


def reference_gpt(torch_reference, params, dropout=0.0, use_bias=True):
  """The reference's GPT (128 rows: our padded table) holding our parameters."""
  reference = torch_reference.GPT(128, TINY['block_size'], TINY['n_layer'], TINY['n_head'],
                                  TINY['n_embd'], use_bias, dropout)
  t = lambda x: torch.tensor(np.asarray(x))

  def linear(module, p):  # our kernel [in..., out...] as a matrix [in, out]; torch's [out, in]
    module.weight.copy_(t(p['kernel'].reshape(-1, module.weight.shape[0])).T)
    if use_bias:
      module.bias.copy_(t(p['bias'].reshape(-1)))

  def norm(module, p):
    module.weight.copy_(t(p['scale']))
    if use_bias:
      module.bias.copy_(t(p['bias']))

  with torch.no_grad():
    reference.wte.weight.copy_(t(params['wte']['embedding']))
    reference.wpe.weight.copy_(t(params['wpe']['embedding']))
    norm(reference.ln_f, params['ln_f'])
    for i, block in enumerate(reference.h):
      for name in ('c_attn', 'attn_proj', 'c_fc', 'mlp_proj'):
        linear(getattr(block, name), params[f'h_{i}'][name])
      for name in ('ln_1', 'ln_2'):
        norm(getattr(block, name), params[f'h_{i}'][name])
  return reference


def tokens():
  return np.random.default_rng(0).integers(0, TINY['vocab_size'], (2, 16))


@pytest.mark.parametrize('use_bias', [True, False])
def test_same_logits_as_ours(torch_reference, use_bias):
  params = our_params(use_bias)
  reference = reference_gpt(torch_reference, params, use_bias=use_bias)
  with torch.no_grad():
    want = reference(torch.tensor(tokens())).numpy()[..., :TINY['vocab_size']]
  got = GPT(**TINY, use_bias=use_bias).apply({'params': params}, tokens())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_drops_out_where_ours_does(torch_reference):
  """Dropout (in training) applies to exactly the embeddings' sum and each block's attention
  and MLP outputs before they are added to the residual stream, in that order, as in
  research/models/transformer.py; with every unit dropped, both models give ln_f(0)."""
  params = our_params()
  reference = reference_gpt(torch_reference, params, dropout=0.0).train()
  dropped, branches = [], []
  for module in reference.modules():
    if isinstance(module, torch.nn.Dropout):
      module.register_forward_hook(lambda m, args, out: dropped.append(args[0]))
  reference.wpe.register_forward_hook(
      lambda m, args, out: branches.append(reference.wte(torch.tensor(tokens())) + out))
  for block in reference.h:
    for module in (block.attn_proj, block.mlp_proj):
      module.register_forward_hook(lambda m, args, out: branches.append(out))
  with torch.no_grad():
    reference(torch.tensor(tokens()))
  assert len(dropped) == len(branches) == 1 + 2 * TINY['n_layer']
  for x, branch in zip(dropped, branches):
    np.testing.assert_array_equal(x.numpy(), branch.numpy())

  reference = reference_gpt(torch_reference, params, dropout=1.0).train()
  with torch.no_grad():
    got = reference(torch.tensor(tokens())).numpy()[..., :TINY['vocab_size']]
  want = np.asarray(params['ln_f']['bias'] @ params['wte']['embedding'][:50].T)
  np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-4)
  ours = GPT(**TINY, dropout_rate=1.0).apply(
      {'params': params}, tokens(), train=True, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(ours, got, atol=1e-4)


def test_same_gradients_as_ours(torch_reference):
  """Our backward pass against PyTorch's autograd: the gradient of the mean cross-entropy with
  respect to every parameter (including the position embeddings', which our GPT computes as a
  contraction with ones rather than a sum over the batch) matches."""
  params = our_params()
  x, y = tokens(), np.roll(tokens(), -1, axis=1)
  reference = reference_gpt(torch_reference, params)
  logits = reference(torch.tensor(x))[..., :TINY['vocab_size']]
  torch.nn.functional.cross_entropy(logits.reshape(-1, TINY['vocab_size']),
                                    torch.tensor(y).reshape(-1)).backward()

  def loss(params):
    logits = GPT(**TINY).apply({'params': params}, x)
    return -jax.numpy.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()
  grads = jax.grad(loss)(params)

  def check(ours, theirs, matrix=False):
    theirs = theirs.grad.numpy()
    ours = np.asarray(ours).reshape(-1, theirs.shape[0]).T if matrix else np.asarray(ours)
    scale = np.abs(theirs).max()
    assert scale > 0
    np.testing.assert_allclose(ours, theirs.reshape(ours.shape), atol=1e-4 * scale)

  def norm(ours, module):
    check(ours['scale'], module.weight)
    check(ours['bias'], module.bias)

  check(grads['wte']['embedding'], reference.wte.weight)
  check(grads['wpe']['embedding'], reference.wpe.weight)
  norm(grads['ln_f'], reference.ln_f)
  for i, block in enumerate(reference.h):
    for name in ('c_attn', 'attn_proj', 'c_fc', 'mlp_proj'):
      check(grads[f'h_{i}'][name]['kernel'], getattr(block, name).weight, matrix=True)
      check(grads[f'h_{i}'][name]['bias'], getattr(block, name).bias)
    for name in ('ln_1', 'ln_2'):
      norm(grads[f'h_{i}'][name], getattr(block, name))


def test_settings_it_does_not_implement_are_refused():
  # It used to train Adam where the config said SGD, and ignore label smoothing.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  done = subprocess.run([sys.executable, '-m', 'research.torch_reference',
                         '--config=experiments/cifar10_resnet.py', '--steps=1'], cwd=ROOT,
                        capture_output=True, text=True, check=False, timeout=300)
  assert done.returncode != 0
  assert "not with config.optimizer.name='sgd', config.label_smoothing=0.1" in done.stderr
