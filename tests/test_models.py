"""Tests of research.models: shapes, hand-counted parameter numbers, dropout, BatchNorm, dtypes,
and the registry's error messages."""
import math

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from research import config
from research import models


def build(name, **fields):
  return models.build_model(config.model_config(name, **fields))


def num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_init(model, input_shape):
  """Parameter shapes only (jax.eval_shape), so that nothing heavy runs."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))


def abstract_apply(model, variables, input_shape, **kwargs):
  return jax.eval_shape(lambda v: model.apply(v, jnp.zeros(input_shape), **kwargs), variables)


# Hand counts: dense(i, o) = i*o + o; conv(k, i, o) = k*k*i*o (+ o with a bias);
# BatchNorm(c) = 2c parameters (scale, bias) plus 2c running statistics (mean, var).
def dense(i, o):
  return i * o + o


def conv(k, i, o, bias=True):
  return k * k * i * o + (o if bias else 0)


def test_lenet5_parameter_count_and_shape():
  # 32x32x3 -conv5-> 28x28x6 -pool-> 14x14x6 -conv5-> 10x10x16 -pool-> 5x5x16 = 400.
  expected = conv(5, 3, 6) + conv(5, 6, 16) + dense(400, 120) + dense(120, 84) + dense(84, 10)
  assert expected == 456 + 2416 + 48120 + 10164 + 850 == 62_006
  model = build('lenet5', num_classes=10)
  variables = abstract_init(model, (2, 32, 32, 3))
  assert num_params(variables['params']) == expected
  assert abstract_apply(model, variables, (3, 32, 32, 3)).shape == (3, 10)


def test_mnist_cnn_parameter_count_and_shape():
  # 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5 -conv3-> 3; flatten 3*3*64 = 576.
  expected = (conv(3, 1, 32) + conv(3, 32, 64) + conv(3, 64, 64) + dense(576, 64)
              + dense(64, 10))
  assert expected == 320 + 18496 + 36928 + 36928 + 650 == 93_322
  model = build('mnist_cnn', num_classes=10)
  variables = abstract_init(model, (2, 28, 28, 1))
  assert num_params(variables['params']) == expected
  assert abstract_apply(model, variables, (3, 28, 28, 1)).shape == (3, 10)


def test_mlp_parameter_count_and_shape():
  expected = dense(784, 512) + dense(512, 512) + dense(512, 10)
  assert expected == 401_920 + 262_656 + 5_130 == 669_706
  model = build('mlp', num_outputs=10, hidden_sizes=(512, 512))
  variables = abstract_init(model, (2, 28, 28, 1))  # flattened to 784
  assert num_params(variables['params']) == expected
  assert abstract_apply(model, variables, (3, 28, 28, 1)).shape == (3, 10)


def test_resnet18_parameter_count_and_shape():
  # CIFAR stem: conv3 3->64 (no bias) + BN(64). Each block: conv3 cin->w + BN(w) + conv3 w->w
  # + BN(w), plus a 1x1 projection conv + BN(w) when the shape changes (first block of stages
  # 2-4). Head: dense 512 -> 10.
  bn_channels = 64
  expected = conv(3, 3, 64, bias=False) + 2 * 64
  cin = 64
  for stage in range(4):
    w = 64 * 2**stage
    for block in range(2):
      expected += conv(3, cin, w, False) + conv(3, w, w, False) + 2 * (2 * w)
      bn_channels += 2 * w
      if block == 0 and stage > 0:
        expected += conv(1, cin, w, False) + 2 * w
        bn_channels += w
      cin = w
  expected += dense(512, 10)
  assert expected == 11_173_962
  model = build('resnet', num_classes=10, stage_sizes=(2, 2, 2, 2), width=64)
  variables = abstract_init(model, (2, 32, 32, 3))
  assert num_params(variables['params']) == expected
  assert num_params(variables['batch_stats']) == 2 * bn_channels  # mean and var
  out = abstract_apply(model, variables, (5, 32, 32, 3))
  assert out.shape == (5, 10) and out.dtype == jnp.float32


def _np_activations():
  """Independent float64 numpy versions (flax's gelu is the tanh approximation)."""
  gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  return {'sigmoid': lambda z: 1 / (1 + np.exp(-z)), 'relu': lambda z: np.maximum(z, 0),
          'tanh': np.tanh, 'gelu': gelu}


@pytest.mark.parametrize('activation', ['sigmoid', 'relu', 'tanh', 'gelu'])
def test_mlp_activation_matches_numpy(activation):
  model = build('mlp', num_outputs=3, hidden_sizes=(7,), activation=activation)
  x = jax.random.normal(jax.random.key(1), (4, 5))
  variables = model.init(jax.random.key(0), x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  hidden = _np_activations()[activation](np.asarray(x, np.float64) @ p['Dense_0']['kernel']
                                         + p['Dense_0']['bias'])
  expected = hidden @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_mlp_initializer_scales():
  stds = {'normal': 0.01, 'lecun_normal': math.sqrt(1 / 784), 'he_normal': math.sqrt(2 / 784),
          'xavier_uniform': math.sqrt(2 / (784 + 512))}  # uniform(+-sqrt(6/(in+out))): std
  mlps = {name: build('mlp', num_outputs=10, hidden_sizes=(512,), kernel_init=name)
          for name in stds}
  kernels = jax.jit(lambda key: {  # one compilation for all four
      name: m.init(key, jnp.zeros((1, 784)))['params']['Dense_0']['kernel']
      for name, m in mlps.items()})(jax.random.key(0))
  for name, std in stds.items():
    assert kernels[name].shape == (784, 512)
    assert abs(float(jnp.std(kernels[name])) / std - 1) < 0.05, name
  assert float(jnp.abs(kernels['xavier_uniform']).max()) <= math.sqrt(6 / (784 + 512))


def test_mlp_output_activation_empty_means_none():
  x = jax.random.normal(jax.random.key(1), (8, 5))
  linear = build('mlp', num_outputs=3, hidden_sizes=())
  assert linear.output_activation == ''  # the default: a string, so the command line can set it
  variables = linear.init(jax.random.key(0), x)
  out = np.asarray(linear.apply(variables, x))
  p = variables['params']['Dense_0']
  np.testing.assert_allclose(out, np.asarray(x) @ p['kernel'] + p['bias'], rtol=1e-5, atol=1e-6)
  assert (out < 0).any()
  relu = build('mlp', num_outputs=3, hidden_sizes=(), output_activation='relu')
  np.testing.assert_allclose(relu.apply(variables, x), np.maximum(out, 0), rtol=1e-6)


def test_mlp_unknown_activation_names_the_key():
  model = build('mlp', activation='swish')
  with pytest.raises(ValueError, match=r'config\.model\.activation'):
    model.init(jax.random.key(0), jnp.zeros((1, 4)))


def test_dropout_only_in_training():
  x = jax.random.normal(jax.random.key(1), (16, 20))
  model = build('mlp', num_outputs=4, hidden_sizes=(64,), dropout_rate=0.5)
  variables = model.init(jax.random.key(0), x)
  no_dropout = build('mlp', num_outputs=4, hidden_sizes=(64,), dropout_rate=0.0)
  reference = no_dropout.apply(variables, x, train=True)
  np.testing.assert_allclose(model.apply(variables, x, train=False), reference, rtol=1e-6)
  train = lambda seed: model.apply(variables, x, train=True,
                                   rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(0), reference)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(2), train(2))


def test_resnet_batchnorm_train_updates_stats_eval_uses_them():
  model = build('resnet', num_classes=10, stage_sizes=(1,), width=4, bn_momentum=0.9)
  evaluate = jax.jit(model.apply)
  train = jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=['batch_stats']))
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  _, updates = train(variables, x)
  # The stem BatchNorm's running mean: 0.9 * 0 + 0.1 * (batch mean of the stem conv output).
  stem = nn.Conv(4, (3, 3), use_bias=False).apply(
      {'params': variables['params']['Conv_0']}, x)
  np.testing.assert_allclose(updates['batch_stats']['BatchNorm_0']['mean'],
                             0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  variables = {'params': variables['params'], **updates}

  other = jax.random.normal(jax.random.key(2), (3, 6, 6, 3))
  batch_a, batch_b = x, jnp.concatenate([x[:1], other])
  # Evaluation: example 0's output does not depend on the rest of the batch.
  eval_a, eval_b, alone = (evaluate(variables, b) for b in (batch_a, batch_b, x[:1]))
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eval_a[0], alone[0], rtol=1e-5, atol=1e-6)
  # Training: it does (batch statistics), which shows the check above can fail.
  assert not np.allclose(train(variables, batch_a)[0][0], train(variables, batch_b)[0][0],
                         rtol=1e-3)


@pytest.mark.parametrize('name,fields,shape', [
    ('mlp', {'hidden_sizes': (8,)}, (2, 6)),
    ('lenet5', {}, (2, 32, 32, 3)),
    ('mnist_cnn', {}, (2, 28, 28, 1)),
    ('resnet', {'stage_sizes': (2, 2, 2, 2), 'width': 64}, (2, 32, 32, 3)),
])
def test_bfloat16_compute_float32_params(name, fields, shape):
  model = build(name, dtype='bfloat16', **fields)
  variables = abstract_init(model, shape)  # dtypes only: nothing is computed
  assert {a.dtype for a in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}
  out, state = abstract_apply(model, variables, shape, capture_intermediates=True,
                              mutable=['intermediates'])
  inner = [a for path, a in jax.tree_util.tree_leaves_with_path(state['intermediates'])
           if len(path) > 2]  # submodules' outputs, not the model's own (cast) output
  assert inner and {a.dtype for a in inner} == {jnp.dtype('bfloat16')}
  assert out.dtype == jnp.float32


@pytest.mark.parametrize('name,fields,shape', [
    ('lenet5', {}, (8, 32, 32, 3)),
    ('mnist_cnn', {}, (8, 28, 28, 1)),
    ('resnet', {'stage_sizes': (1, 1), 'width': 8}, (8, 32, 32, 3)),  # BatchNorm in training
])
def test_image_models_in_bfloat16_agree_with_float32(name, fields, shape):
  """The image experiments compute in bf16 on accelerators (`model.dtype='auto'`): the loss and
  the gradients with bf16 activations stay close to float32's, BatchNorm's batch statistics
  included (bf16 keeps 8 bits of mantissa: about 2 decimal digits)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  labels = jnp.arange(shape[0]) % 10

  def loss_and_grads(dtype):
    model = build(name, num_classes=10, dtype=dtype, **fields)
    variables = jax.jit(model.init)(jax.random.key(0), x)  # float32 parameters either way

    def loss(params):
      logits = model.apply({**variables, 'params': params}, x, train=True, mutable=True)[0]
      assert logits.dtype == jnp.float32
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  (loss32, grads32), (loss16, grads16) = loss_and_grads('float32'), loss_and_grads('bfloat16')
  assert abs(float(loss16) - float(loss32)) < 0.02 * float(loss32)
  g32, g16 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)])
              for t in (grads32, grads16))
  assert g16.dtype == np.float32
  cosine = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
  assert 0.98 < cosine, cosine  # measured: LeNet 0.991, the MNIST CNN 0.998, ResNet 0.9999
  assert abs(np.linalg.norm(g16) / np.linalg.norm(g32) - 1) < 0.05


def test_unknown_model_name_suggests_close_match():
  with pytest.raises(ValueError, match=r"'mpl'.*did you mean 'mlp'"):
    models.model_class('mpl')
  with pytest.raises(ValueError, match=r"'resnte'.*did you mean 'resnet'"):
    models.build_model(ml_collections.ConfigDict({'name': 'resnte'}))


def test_unknown_model_field_suggests_close_match():
  bad = ml_collections.ConfigDict({'name': 'mlp', 'hiden_sizes': (4,)})
  with pytest.raises(ValueError,
                     match=r'config\.model\.hiden_sizes.*did you mean config\.model\.hidden_sizes'):
    models.build_model(bad)
  with pytest.raises(ValueError, match=r'config\.model\.widht.*config\.model\.width'):
    config.model_config('resnet', widht=16)


@pytest.mark.parametrize('shape', [(2, 26, 26, 3), (2, 11, 11, 4)])  # even; odd (last row dropped)
def test_max_pool_2x2_matches_flax_max_pool_and_its_gradient(shape):
  from research.models import cnn
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)  # no ties
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(cnn.max_pool_2x2(x), flax_pool(x))
  g = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape), jnp.float32)
  ours = jax.vjp(cnn.max_pool_2x2, x)[1](g)[0]
  np.testing.assert_allclose(ours, jax.vjp(flax_pool, x)[1](g)[0], atol=1e-6)


@pytest.mark.parametrize('kernel,channels,features,size', [
    ((5, 5), 3, 6, 12),    # tiles of 4 output columns, built from each tile's span
    ((3, 3), 1, 6, 12),    # tiles of 4 over 11 columns: padded to 12, sliced back
    ((3, 3), 1, 32, 12),   # tile 1 (im2col), built from column shifts
    ((3, 3), 2, 12, 12),   # tiles of 2 over 11 columns, from strided shifts, padded
    ((5, 5), 3, 6, 4),     # a kernel larger than the input: lax's (empty) result
    ((3, 3), 32, 6, 12),   # tile 4 over 288 input features
    ((3, 3), 72, 6, 12),   # kh * kw * channels above the threshold: lax's own convolution
])
def test_patch_conv_matches_lax_convolution_and_its_gradients(kernel, channels, features, size):
  from research.models import cnn
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, channels)), jnp.float32)
  conv = lambda impl: nn.Conv(features, kernel, padding='VALID', conv_general_dilated=impl)
  params = conv(None).init(jax.random.key(0), x)
  ours = lambda p, x: conv(cnn.patch_conv).apply(p, x)
  lax_conv = lambda p, x: conv(None).apply(p, x)
  np.testing.assert_allclose(ours(params, x), lax_conv(params, x), rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=lax_conv(params, x).shape), jnp.float32)
  got, want = jax.vjp(ours, params, x)[1](g), jax.vjp(lax_conv, params, x)[1](g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  hlo = jax.jit(ours).lower(params, x).as_text()
  if kernel[0] * kernel[1] * channels <= cnn.PATCH_CONV_MAX_K and size >= kernel[0]:
    assert 'convolution' not in hlo and 'dot_general' in hlo
  else:
    assert 'convolution' in hlo


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch):
  c = config.model_config('gpt', vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8,
                          dtype='auto')
  assert models.build_model(c).dtype == jnp.float32  # this CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert models.build_model(c).dtype == jnp.bfloat16
  assert models.build_model(c).param_dtype == jnp.float32


def test_threefry_fused_on_cpu_same_bits():
  """`models.fuse_threefry_on_cpu` (applied on import): no while loop left in a program that
  draws dropout masks, and the hash gives the bits of JAX's own CPU lowering (its 5-iteration
  loop, traced here directly) for random keys and counters."""
  from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
  # What the import registered, before calling it again here.
  hlo = jax.jit(lambda key: jax.random.bernoulli(key, 0.8, (64, 384))).lower(
      jax.random.key(0)).compile().as_text()
  assert 'while' not in hlo
  assert models.fuse_threefry_on_cpu()
  k1, k2, x1, x2 = (jax.random.bits(jax.random.key(i), (1000,), jnp.uint32) for i in range(4))
  k1, k2 = k1[0], k2[0]
  fused = jax.jit(threefry2x32.threefry_2x32)(jnp.stack([k1, k2]), jnp.concatenate([x1, x2]))
  looped = jax.jit(lambda *a: threefry2x32._threefry2x32_lowering(*a, use_rolled_loops=True))(
      k1, k2, x1, x2)
  np.testing.assert_array_equal(fused, jnp.concatenate(looped))
  assert len(np.unique(np.asarray(fused))) > 1900  # not a constant


def test_threefry_fusion_warns_where_jax_internals_moved(monkeypatch):
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  def moved(*args, **kwargs):
    raise TypeError('register_lowering() got an unexpected keyword argument')
  monkeypatch.setattr(mlir, 'register_lowering', moved)
  with pytest.warns(UserWarning, match="could not fuse JAX's threefry"):
    assert not models.fuse_threefry_on_cpu()


def torch_cnn_forward(torch, params, x, name):
  """An independent PyTorch forward of LeNet-5 / the Keras MNIST CNN from Flax's weights:
  conv (VALID) -> ReLU -> 2x2 max-pool blocks, flatten in Flax's NHWC order, dense layers with
  a ReLU after every hidden one."""
  F = torch.nn.functional
  t = lambda a: torch.tensor(np.asarray(a))
  h = t(x).permute(0, 3, 1, 2)  # NHWC -> NCHW
  convs = sorted(k for k in params if k.startswith('Conv_'))
  denses = sorted(k for k in params if k.startswith('Dense_'))
  pooled = {'lenet5': 2, 'mnist_cnn': 2}[name]  # the first two convolutions are pooled
  for i, k in enumerate(convs):
    h = F.relu(F.conv2d(h, t(params[k]['kernel']).permute(3, 2, 0, 1), t(params[k]['bias'])))
    if i < pooled:
      h = F.max_pool2d(h, 2)
  h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # flatten as NHWC
  for i, k in enumerate(denses):
    h = h @ t(params[k]['kernel']) + t(params[k]['bias'])
    if i < len(denses) - 1:
      h = F.relu(h)
  return h.numpy()


@pytest.mark.parametrize('name,shape', [('lenet5', (4, 32, 32, 3)), ('mnist_cnn', (4, 28, 28, 1))])
def test_cnn_forward_matches_torch_reference(name, shape):
  """Catches a missing (or extra) activation or pooling layer, e.g. LeNet's ReLU after the
  120-unit dense layer dropped, which the parameter counts cannot see."""
  torch = pytest.importorskip('torch')
  model = build(name, num_classes=10)
  x = np.asarray(jax.random.normal(jax.random.key(1), shape), np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(x))['params']
  got = np.asarray(model.apply({'params': params}, jnp.asarray(x)))
  with torch.no_grad():
    expected = torch_cnn_forward(torch, params, x, name)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def resnet_with_intermediates(stage_sizes=(2, 2)):
  model = build('resnet', num_classes=10, stage_sizes=stage_sizes, width=4)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  logits, state = model.apply(variables, x, capture_intermediates=True)
  out = lambda name: state['intermediates'][name]['__call__'][0]
  return variables, logits, out


def test_resnet_head_is_global_average_pool():
  """Catches the global average pool replaced (e.g. by a max pool): the logits are the Dense
  head applied to the spatial mean of the last residual block's output."""
  variables, logits, out = resnet_with_intermediates()
  features = out('ResidualBlock_3')  # [batch, 4, 4, 8] after stage 2's stride-2 block
  assert features.shape == (3, 4, 4, 8)
  assert not np.allclose(features.mean((1, 2)), features.max((1, 2)))  # pools differ here
  head = variables['params']['Dense_0']
  expected = features.mean((1, 2)) @ head['kernel'] + head['bias']
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_resnet_blocks_zero_init_their_last_batchnorm_scale():
  """Catches the zero initialisation of each residual block's last BatchNorm scale (Goyal et
  al. 2017) dropped: that scale starts at 0 (the others at 1), so at initialisation every
  block is its shortcut: relu(x) for an identity one, relu(projection(x)) otherwise."""
  variables, _, out = resnet_with_intermediates()
  params = variables['params']
  blocks = sorted(k for k in params if k.startswith('ResidualBlock_'))
  assert len(blocks) == 4
  for name in blocks:
    block = params[name]
    np.testing.assert_array_equal(block['BatchNorm_1']['scale'], 0.0, err_msg=name)
    np.testing.assert_array_equal(block['BatchNorm_0']['scale'], 1.0, err_msg=name)
    if 'BatchNorm_2' in block:  # the projection shortcut's norm is not zeroed
      np.testing.assert_array_equal(block['BatchNorm_2']['scale'], 1.0, err_msg=name)
  # Behaviour: the first block has an identity shortcut, so its output is its (non-negative,
  # post-ReLU) input, the stem's relu(BatchNorm(conv(x))).
  stem = nn.relu(out('BatchNorm_0'))
  np.testing.assert_allclose(out('ResidualBlock_0'), stem, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out('ResidualBlock_1'), stem, rtol=1e-6, atol=1e-6)
