"""Tests of research.steps on tiny problems: training lowers the loss, gradient accumulation
gives the whole-batch update, evaluation ignores padding, and the MSE path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config
from research import models
from research import optim
from research import steps
from research.data import image


def setup(model_name='mlp', loss='cross_entropy', num_classes=3, grad_accum_steps=1,
          input_shape=(5,), optimizer=None, concurrent_parts=1, label_smoothing=0.0,
          skip_nonfinite=False, **model_fields):
  if model_name == 'mlp':
    model_fields.setdefault('num_outputs', num_classes)
  model = models.build_model(config.model_config(model_name, **model_fields))
  c = config.defaults().optimizer
  for key, value in (optimizer or {'name': 'adam', 'learning_rate': 0.05}).items():
    c[key] = value
  tx, _ = optim.make_optimizer(c, total_steps=100)
  train_step, eval_step = steps.make_steps(
      model, tx, loss=loss, preprocess=image.make_preprocess(config.defaults().data),
      num_classes=num_classes, grad_accum_steps=grad_accum_steps,
      concurrent_parts=concurrent_parts, label_smoothing=label_smoothing,
      skip_nonfinite=skip_nonfinite)
  state = steps.init_state(model, tx, jax.random.key(0), jnp.zeros((1, *input_shape)))
  return model, state, jax.jit(train_step), jax.jit(eval_step)


def classification_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(5, 3)), -1).astype(np.int32)  # linearly separable
  return {'inputs': jnp.asarray(x), 'targets': jnp.asarray(y)}


def test_train_step_lowers_loss():
  _, state, train_step, _ = setup(hidden_sizes=(16,))
  batch, losses = classification_batch(), []
  for _ in range(15):
    state, metrics = train_step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert int(state.step) == 15
  assert losses[-1] < 0.5 * losses[0]
  assert 0.0 <= float(metrics['accuracy']) <= 1.0 and np.isfinite(float(metrics['grad_norm']))


@pytest.mark.parametrize('accum,parts', [(4, 1), (1, 2), (2, 2)])
def test_grad_accumulation_and_concurrent_parts_match_whole_batch(accum, parts):
  sgd = {'name': 'sgd', 'learning_rate': 0.5, 'momentum': 0.0}
  batch = classification_batch(16)
  results = []
  for a, p in ((1, 1), (accum, parts)):
    _, state, train_step, _ = setup(hidden_sizes=(16,), grad_accum_steps=a, optimizer=sgd,
                                    concurrent_parts=p)
    results.append(train_step(state, batch, jax.random.key(1)))
    hlo = train_step.lower(state, batch, jax.random.key(1)).as_text()
    assert ('stablehlo.while' in hlo) == (a > 1)  # concurrent parts: unrolled, no loop
  (one, m1), (split, m2) = results
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one.params, state.params)
  assert min(jax.tree.leaves(moved)) > 1e-4   # the update is not trivially zero
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one.params, split.params)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)


def test_eval_step_ignores_masked_examples():
  model, state, _, eval_step = setup(hidden_sizes=(16,))
  batch = classification_batch(8)
  batch['mask'] = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  sums = eval_step(state, batch)
  assert float(sums['count']) == 6 and float(sums['confusion'].sum()) == 6
  # the loss sum, from the model's logits with a numpy log-softmax
  logits = np.asarray(model.apply({'params': state.params}, batch['inputs']), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -log_probs[np.arange(8), np.asarray(batch['targets'])]
  np.testing.assert_allclose(sums['loss_sum'], nll[:6].sum(), rtol=1e-5)

  padded = dict(batch, inputs=batch['inputs'].at[7].set(100.0),
                targets=batch['targets'].at[7].set(0))
  jax.tree.map(np.testing.assert_array_equal, eval_step(state, padded), sums)
  real = dict(batch, inputs=batch['inputs'].at[0].set(100.0))
  assert float(eval_step(state, real)['loss_sum']) != float(sums['loss_sum'])


def test_label_smoothing_is_trained_with_and_evaluated_without():
  model, state, train_step, eval_step = setup(hidden_sizes=(16,), label_smoothing=0.1)
  batch = classification_batch(8)
  logits = np.asarray(model.apply({'params': state.params}, batch['inputs']), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -log_probs[np.arange(8), np.asarray(batch['targets'])]
  smoothed = 0.9 * nll - 0.1 * log_probs.mean(-1)  # 0.1 spread over the 3 classes
  sums = eval_step(state, dict(batch, mask=jnp.ones(8)))
  np.testing.assert_allclose(sums['loss_sum'], nll.sum(), rtol=1e-5)  # was the smoothed sum
  _, metrics = train_step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(metrics['loss'], smoothed.mean(), rtol=1e-5)


def test_mse_path():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (32, 1)).astype(np.float32)
  batch = {'inputs': jnp.asarray(x), 'targets': jnp.asarray(2 * x + 1)}
  sgd = {'name': 'sgd', 'learning_rate': 0.3, 'momentum': 0.0}
  model, state, train_step, eval_step = setup(loss='mse', num_classes=0, input_shape=(1,),
                                              num_outputs=1, hidden_sizes=(), optimizer=sgd)
  losses = []
  for _ in range(30):
    state, metrics = train_step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert 'accuracy' not in metrics and losses[-1] < 0.05 * losses[0]
  y = (2 * x + 1 + rng.normal(size=x.shape)).astype(np.float32)  # noisy: a sizeable loss
  sums = eval_step(state, {'inputs': jnp.asarray(x), 'targets': jnp.asarray(y),
                           'mask': jnp.ones(32).at[-2:].set(0)})
  assert 'confusion' not in sums and float(sums['count']) == 30
  w, b = (np.asarray(state.params['Dense_0'][k], np.float64) for k in ('kernel', 'bias'))
  np.testing.assert_allclose(sums['loss_sum'], np.sum(((x @ w + b - y) ** 2)[:30]), rtol=1e-5)


def test_batch_norm_state_updated_by_train_step():
  _, state, train_step, _ = setup('resnet', num_classes=10, input_shape=(6, 6, 3),
                                  stage_sizes=(1,), width=4)
  x = jax.random.normal(jax.random.key(2), (8, 6, 6, 3))
  batch = {'inputs': x, 'targets': jnp.arange(8) % 10}
  new, _ = train_step(state, batch, jax.random.key(1))
  before = state.model_state['batch_stats']['BatchNorm_0']['mean']
  after = new.model_state['batch_stats']['BatchNorm_0']['mean']
  assert not np.allclose(before, after)


def test_unknown_loss_names_the_key():
  model = models.build_model(config.model_config('mlp'))
  with pytest.raises(ValueError, match=r"config\.loss='hinge'"):
    steps.make_steps(model, None, loss='hinge', preprocess=None)


def test_dropout_randomness_is_folded_with_the_step():
  """Catches train_step dropping `fold_in(rng, state.step)`: every step would then draw the
  same dropout masks (and augmentation) from the same rng."""
  _, state, train_step, _ = setup(hidden_sizes=(64,), dropout_rate=0.5)
  batch, rng = classification_batch(), jax.random.key(1)
  loss = lambda s: float(train_step(s, batch, rng)[1]['loss'])
  step3, step4 = state.replace(step=jnp.int32(3)), state.replace(step=jnp.int32(4))
  assert loss(step3) == loss(step3)  # the same step: the same masks
  assert loss(step3) != loss(step4)  # same params, batch and rng, another step: other masks


@pytest.mark.parametrize('accum', [1, 4])
def test_training_accuracy_is_that_of_the_logits_before_the_update(accum):
  """Catches an inverted accuracy (`!=`) and, with gradient accumulation, one divided by the
  number of micro-batches twice (or not at all): the metric must be the whole batch's."""
  model, state, train_step, _ = setup(hidden_sizes=(16,), grad_accum_steps=accum)
  batch = classification_batch(16, seed=3)
  logits = np.asarray(model.apply({'params': state.params}, batch['inputs']))
  expected = np.mean(np.argmax(logits, -1) == np.asarray(batch['targets']))
  assert 0.0 < expected < 1.0 and expected != 0.5  # else 1 - a or a / 4 could look right
  _, metrics = train_step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(float(metrics['accuracy']), expected, rtol=1e-6)


def nonfinite_batch(batch, row=0):
  return dict(batch, inputs=batch['inputs'].at[row].set(jnp.inf))


@pytest.mark.parametrize('accum', [1, 2])
def test_skipped_step_keeps_batch_norm_statistics(accum):
  """Catches nonfinite=skip restoring params and optimizer state but not model_state: the
  BatchNorm statistics of a batch holding an inf would be kept (NaN from then on)."""
  _, state, train_step, _ = setup('resnet', num_classes=10, input_shape=(6, 6, 3),
                                  stage_sizes=(1,), width=4, skip_nonfinite=True,
                                  grad_accum_steps=accum)
  x = jax.random.normal(jax.random.key(2), (8, 6, 6, 3))
  batch = {'inputs': x, 'targets': jnp.arange(8) % 10}
  new, metrics = train_step(state, nonfinite_batch(batch), jax.random.key(1))
  assert float(metrics['skipped']) == 1.0  # once per step, also with micro-batches
  assert int(new.step) == 1
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(new.model_state, state.model_state)  # bitwise: the skipped batch left no trace
  same(new.params, state.params)
  same(new.opt_state, state.opt_state)
  # The same batch without the inf is not skipped and does move the statistics.
  good, metrics = train_step(state, batch, jax.random.key(1))
  assert float(metrics['skipped']) == 0.0
  before = state.model_state['batch_stats']['BatchNorm_0']['mean']
  assert not np.allclose(good.model_state['batch_stats']['BatchNorm_0']['mean'], before)


def test_skip_mode_reports_the_optimizer_update_count():
  """Catches metrics['updates'] off by one: it is the optimizer's count after the step, i.e.
  the number of updates made so far (a skipped step adds none); the loop logs the learning
  rate of schedule(updates - 1), that of the last update made."""
  _, state, train_step, _ = setup(hidden_sizes=(16,), skip_nonfinite=True)
  batch = classification_batch()
  reported = []
  for b in (batch, nonfinite_batch(batch), batch, batch, nonfinite_batch(batch, 5)):
    state, metrics = train_step(state, b, jax.random.key(1))
    reported.append((int(metrics['updates']), float(metrics['skipped'])))
  assert reported == [(1, 0.0), (1, 1.0), (2, 0.0), (3, 0.0), (3, 1.0)]
  assert int(state.step) == 5


def test_the_rate_from_schedule_inputs_follows_the_optimizer_s_count():
  """The trainer's step: a unit-rate optimizer whose updates the step scales by the rate of
  the optimizer's own count (with nonfinite=skip, skipped steps do not advance it), from
  inputs passed in. The same parameters as optax's optimizer with the schedule inside."""
  model = models.build_model(config.model_config('mlp', hidden_sizes=(16,), num_outputs=3))
  c = config.defaults().optimizer
  c.name, c.learning_rate, c.schedule, c.warmup_steps = 'adamw', 0.05, 'warmup_cosine', 2
  preprocess = image.make_preprocess(config.defaults().data)
  finals = []
  for unit in (False, True):
    tx, _ = optim.make_optimizer(c, total_steps=8, unit_rate=unit)
    train_step, _ = steps.make_steps(
        model, tx, loss='cross_entropy', preprocess=preprocess, num_classes=3,
        skip_nonfinite=True, learning_rate=(
            lambda inputs, count: optim.learning_rate(c.schedule, inputs, count)) if unit else None)
    train_step = jax.jit(train_step)
    state = steps.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 5)))
    batch = classification_batch()
    for b in (batch, nonfinite_batch(batch), batch, batch, batch, batch):
      state, _ = train_step(state, b, jax.random.key(1), optim.schedule_inputs(c, 8))
    finals.append(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *finals)
