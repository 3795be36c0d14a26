"""Tests of research.optim: schedules, the weight-decay mask, clipping, and the optimizers
against torch.optim on the same problem."""
import math

import jax
from flax import linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import config
from research import models
from research import optim


def opt_config(**overrides):
  c = config.defaults().optimizer
  for key, value in overrides.items():
    c[key] = value
  return c


def test_constant_schedule():
  schedule = optim.make_schedule(opt_config(learning_rate=0.3), total_steps=100)
  np.testing.assert_allclose([schedule(s) for s in (0, 50, 100)], 0.3, rtol=1e-6)


def test_warmup_cosine_schedule():
  c = opt_config(learning_rate=0.1, schedule='warmup_cosine', warmup_steps=10,
                 min_learning_rate=0.001)
  schedule = optim.make_schedule(c, total_steps=110)
  values = np.array([schedule(s) for s in range(111)])
  np.testing.assert_allclose(values[[0, 5, 10]], [0.0, 0.05, 0.1], rtol=1e-6, atol=1e-9)
  assert values.argmax() == 10                              # peak at the end of warm-up
  # half-way through the cosine: min + (peak - min) * (1 + cos(pi / 2)) / 2
  np.testing.assert_allclose(values[60], 0.001 + 0.099 / 2, rtol=1e-5)
  np.testing.assert_allclose(values[110], 0.001, rtol=1e-5)  # min_learning_rate at the end
  assert np.all(np.diff(values[10:]) <= 1e-9)                # decreasing after the peak


@pytest.mark.parametrize('warmup', [0, 10])
def test_piecewise_schedule_drops_at_fractions(warmup):
  c = opt_config(learning_rate=1.0, schedule='piecewise', warmup_steps=warmup,
                 boundaries=(0.5, 0.75), scales=(0.1, 0.5))
  schedule = optim.make_schedule(c, total_steps=100)
  # drops at exactly steps 50 (x0.1) and 75 (x0.5) of 100, counted from step 0 with warm-up too
  for step, lr in [(warmup + 1, 1.0), (49, 1.0), (50, 0.1), (74, 0.1), (75, 0.05), (100, 0.05)]:
    np.testing.assert_allclose(schedule(step), lr, rtol=1e-6, err_msg=f'step {step}')


def test_piecewise_boundaries_on_one_step_both_drop():
  """0.5 and 0.55 of 10 steps are both step 5: the rate drops by both scales there (one of
  them was lost)."""
  c = opt_config(learning_rate=1.0, schedule='piecewise', boundaries=(0.5, 0.55),
                 scales=(0.1, 0.2))
  schedule = optim.make_schedule(c, total_steps=10)
  for step, lr in [(4, 1.0), (5, 0.02), (9, 0.02)]:
    np.testing.assert_allclose(schedule(step), lr, rtol=1e-6, err_msg=f'step {step}')


SCHEDULES = [dict(learning_rate=0.3), dict(learning_rate=0.3, warmup_steps=10),
             dict(learning_rate=6e-4, min_learning_rate=6e-5, schedule='warmup_cosine',
                  warmup_steps=20),
             dict(learning_rate=1e-3, min_learning_rate=1e-4, schedule='warmup_cosine'),
             dict(learning_rate=0.1, schedule='piecewise', warmup_steps=5,
                  boundaries=(0.5, 0.75), scales=(0.1, 0.5))]


def optax_schedule(c, total_steps):
  """The same schedules composed from optax's own (the trainer's before they became inputs)."""
  lr, warmup = c.learning_rate, c.warmup_steps
  main = {'constant': lambda: optax.constant_schedule(lr),
          'warmup_cosine': lambda: optax.cosine_decay_schedule(
              lr, max(total_steps - warmup, 1), alpha=c.min_learning_rate / lr),
          'piecewise': lambda: optax.piecewise_constant_schedule(
              lr, {int(b * total_steps) - warmup: s for b, s in zip(c.boundaries, c.scales)})
          }[c.schedule]()
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup]) if (
      warmup) else main


@pytest.mark.parametrize('overrides', SCHEDULES)
def test_schedule_from_inputs_is_optax_s(overrides):
  """The rate the compiled step computes from its schedule inputs (traced, as there) against
  optax's schedules, over the run and past its end."""
  c, total = opt_config(**overrides), 200
  counts = jnp.arange(total + 20)
  want = jax.vmap(optax_schedule(c, total))(counts)
  got = jax.jit(jax.vmap(lambda inputs, count: optim.learning_rate(c.schedule, inputs, count),
                         in_axes=(None, 0)))(optim.schedule_inputs(c, total), counts)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('name', ['adamw', 'sgd', 'adam'])
def test_unit_rate_optimizer_scaled_in_the_step_is_the_scheduled_one(name):
  """The trainer's optimizer (unit rate, its updates scaled by the rate from the inputs in
  the step) against optax's with the schedule inside, over a warm-up and a cosine decay."""
  c = opt_config(name=name, learning_rate=0.1, min_learning_rate=0.01, weight_decay=0.1,
                 momentum=0.9, schedule='warmup_cosine', warmup_steps=3)
  x, y, w = quadratic_problem()
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((x @ p['kernel'] - y) ** 2, -1))
  scheduled, _ = optim.make_optimizer(c, total_steps=10)
  unit, _ = optim.make_optimizer(c, total_steps=10, unit_rate=True)
  inputs = optim.schedule_inputs(c, 10)
  a = b = {'kernel': jnp.asarray(w)}
  state_a, state_b = scheduled.init(a), unit.init(b)
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)  # checkpoints still load
  for count in range(12):
    updates, state_a = scheduled.update(jax.grad(loss)(a), state_a, a)
    a = optax.apply_updates(a, updates)
    updates, state_b = unit.update(jax.grad(loss)(b), state_b, b)
    rate = optim.learning_rate(c.schedule, inputs, count)
    b = optax.apply_updates(b, jax.tree.map(lambda u: u * rate, updates))
  assert not np.allclose(a['kernel'], w)
  np.testing.assert_allclose(b['kernel'], a['kernel'], rtol=1e-6)


def test_decay_mask_excludes_vectors():
  model = models.build_model(config.model_config('resnet', stage_sizes=(1, 1), width=4))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  flat = jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))
  names = {jax.tree_util.keystr(path): decay for path, decay in flat}
  assert names["['Conv_0']['kernel']"] and names["['Dense_0']['kernel']"]
  assert not names["['BatchNorm_0']['scale']"] and not names["['Dense_0']['bias']"]
  assert sum(names.values()) == 1 + 2 + 2 + 1 + 1  # stem, 2 per block, projection, head


@pytest.mark.parametrize('scan_layers', [False, True])
def test_decay_mask_of_gpt_by_name_not_rank(scan_layers):
  """Scanned LayerNorm scales and the 2-D qkv bias have ndim > 1 but must not be decayed."""
  model = models.build_model(config.model_config(
      'gpt', vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=8, scan_layers=scan_layers))
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  flat = jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))
  leaves = dict(jax.tree_util.tree_leaves_with_path(params))
  decayed = {jax.tree_util.keystr(k) for k, d in flat if d}
  kept = {jax.tree_util.keystr(k): leaves[k].ndim for k, d in flat if not d}
  assert decayed and all(k.endswith(("['kernel']", "['embedding']")) for k in decayed)
  assert any(k.endswith("['scale']") for k in kept) and any('bias' in k for k in kept)
  if scan_layers:  # the stacked norm scales and biases are 2-D or more, and still kept
    assert max(kept.values()) > 1


@pytest.mark.parametrize('name', ['adamw', 'sgd', 'adam'])
def test_weight_decay_skips_biases(name):
  lr, wd = 0.1, 0.1
  tx, _ = optim.make_optimizer(
      opt_config(name=name, learning_rate=lr, weight_decay=wd, momentum=0.0), total_steps=10)
  params = {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.full((2,), 2.0)}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['bias'], params['bias'])
  if name == 'adamw':     # decoupled: kernel * (1 - lr * wd)
    np.testing.assert_allclose(new['kernel'], 2.0 * (1 - lr * wd), rtol=1e-6)
  elif name == 'sgd':     # L2 gradient wd * kernel, step lr
    np.testing.assert_allclose(new['kernel'], 2.0 - lr * wd * 2.0, rtol=1e-6)
  else:                   # adam normalises the L2 gradient: a step of about lr
    np.testing.assert_allclose(new['kernel'], 2.0 - lr, rtol=1e-5)


def quadratic_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  y = rng.normal(size=(8, 2)).astype(np.float32)
  w0 = rng.normal(size=(3, 2)).astype(np.float32)
  return x, y, w0


def run_optax(c, steps=6):
  x, y, w = quadratic_problem()
  loss = lambda w: 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, -1))
  tx, _ = optim.make_optimizer(c, total_steps=100)
  params = {'kernel': jnp.asarray(w)}  # a weight by name, so weight decay applies
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.grad(lambda p: loss(p['kernel']))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params['kernel'])


def run_torch(torch, make, steps=6):
  x, y, w = (torch.tensor(a) for a in quadratic_problem())
  w.requires_grad_(True)
  opt = make([w])
  for _ in range(steps):
    opt.zero_grad()
    (0.5 * ((x @ w - y) ** 2).sum(-1).mean()).backward()
    opt.step()
  return w.detach().numpy()


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('weight_decay', [0.0, 0.05])
def test_sgd_matches_torch(nesterov, weight_decay):
  torch = pytest.importorskip('torch')
  c = opt_config(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=nesterov,
                 weight_decay=weight_decay)
  expected = run_torch(torch, lambda p: torch.optim.SGD(
      p, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay))
  assert not np.allclose(expected, quadratic_problem()[2])  # the parameters moved
  np.testing.assert_allclose(run_optax(c), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name,weight_decay', [('adam', 0.0), ('adam', 0.05), ('adamw', 0.05)])
def test_adam_matches_torch(name, weight_decay):
  torch = pytest.importorskip('torch')
  c = opt_config(name=name, learning_rate=0.05, b1=0.8, b2=0.99, eps=1e-6,
                 weight_decay=weight_decay)
  cls = {'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[name]
  expected = run_torch(torch, lambda p: cls(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6,
                                            weight_decay=weight_decay))
  np.testing.assert_allclose(run_optax(c), expected, rtol=1e-5, atol=1e-6)


def test_grad_clipping_by_global_norm():
  tx, _ = optim.make_optimizer(opt_config(name='sgd', learning_rate=1.0, momentum=0.0,
                                          grad_clip_norm=1.0), total_steps=10)
  params = {'a': jnp.zeros(2), 'b': jnp.zeros((1, 1))}
  big = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[4.0]])}   # global norm 5
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates['b'], [[-0.8]], rtol=1e-6)
  assert math.isclose(float(optax.tree.norm(updates)), 1.0, rel_tol=1e-6)
  small = {'a': jnp.array([0.3, 0.0]), 'b': jnp.array([[0.4]])}  # global norm 0.5: unchanged
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], [-0.3, 0.0], rtol=1e-6)


def test_unknown_names_raise_naming_the_key():
  with pytest.raises(ValueError, match=r"config\.optimizer\.name='adamm'"):
    optim.make_optimizer(opt_config(name='adamm'), total_steps=10)
  with pytest.raises(ValueError, match=r"config\.optimizer\.schedule='cosine'"):
    optim.make_optimizer(opt_config(schedule='cosine'), total_steps=10)


# Gradients of very different global norms (10, 0.5, 3): clipping at 1 changes the first and
# last, and later Adam/momentum steps depend on the earlier (clipped) gradients.
CLIP_GRADS = [np.array([[6.0, 0.0], [0.0, 8.0]], np.float32),
              np.array([[0.3, -0.4], [0.0, 0.0]], np.float32),
              np.array([[-1.0, 2.0], [2.0, 0.0]], np.float32)]


def run_optax_on_grads(tx, grads_seq):
  params = {'kernel': jnp.zeros((2, 2))}
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update({'kernel': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params['kernel'])


def run_torch_clipped(torch, make, grads_seq, max_norm):
  w = torch.zeros((2, 2), requires_grad=True)
  opt = make([w])
  for g in grads_seq:
    opt.zero_grad()
    w.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_([w], max_norm)  # clips the gradient, before the step
    opt.step()
  return w.detach().numpy()


def test_adam_clips_gradients_before_the_update():
  """Catches the clipping transform chained after Adam (clipping its updates, not the
  gradients): the result must equal plain Adam fed gradients rescaled to global norm <= 1."""
  c = opt_config(name='adam', learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 grad_clip_norm=1.0)
  tx, _ = optim.make_optimizer(c, total_steps=100)
  clipped = [g / max(1.0, np.linalg.norm(g)) for g in CLIP_GRADS]
  assert np.isclose(np.linalg.norm(CLIP_GRADS[0]), 10.0)
  expected = run_optax_on_grads(optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8), clipped)
  unclipped = run_optax_on_grads(optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8), CLIP_GRADS)
  assert not np.allclose(expected, unclipped, atol=1e-4)  # the clipping matters here
  np.testing.assert_allclose(run_optax_on_grads(tx, CLIP_GRADS), expected, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'adam'])
def test_grad_clipping_matches_torch_clip_grad_norm(name):
  """Same as above against torch: clip_grad_norm_ then the optimizer's step. SGD with lr != 1
  and momentum also catches clipping after the optimizer (lr=1, momentum 0 does not)."""
  torch = pytest.importorskip('torch')
  if name == 'sgd':
    c = opt_config(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=False,
                   weight_decay=0.0, grad_clip_norm=1.0)
    make = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
  else:
    c = opt_config(name='adam', learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=0.0, grad_clip_norm=1.0)
    make = lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.9, 0.999), eps=1e-8)
  tx, _ = optim.make_optimizer(c, total_steps=100)
  expected = run_torch_clipped(torch, make, CLIP_GRADS, max_norm=1.0)
  np.testing.assert_allclose(run_optax_on_grads(tx, CLIP_GRADS), expected, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('name', ['adam', 'adamw'])
def test_adam_eps_from_config_is_used(name):
  """Catches config.optimizer.eps being ignored (optax's default 1e-8 used instead): with
  eps=0.1 and gradients of about that size, the update differs from eps=1e-8 by ~2x."""
  torch = pytest.importorskip('torch')
  grads = [0.1 * g / np.linalg.norm(g) for g in CLIP_GRADS]
  c = opt_config(name=name, learning_rate=0.1, b1=0.9, b2=0.999, eps=0.1, weight_decay=0.0,
                 grad_clip_norm=0.0)
  tx, _ = optim.make_optimizer(c, total_steps=100)
  cls = {'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[name]
  expected = run_torch_clipped(torch, lambda p: cls(p, lr=0.1, betas=(0.9, 0.999), eps=0.1,
                                                     weight_decay=0.0), grads, max_norm=1e9)
  tiny_eps = run_optax_on_grads(optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8), grads)
  assert not np.allclose(expected, tiny_eps, rtol=0.1)  # eps matters at this scale
  np.testing.assert_allclose(run_optax_on_grads(tx, grads), expected, rtol=1e-5, atol=1e-6)
