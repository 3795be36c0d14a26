"""The pure training and evaluation steps.

`train_step(state, batch, rng[, schedule]) -> (state, metrics)` and `eval_step(state, batch) ->
sums` are plain functions of arrays. `research.parallel` compiles them with `jax.jit` over a
device mesh (the default) or wraps them in `jax.pmap`; with `axis_name` set (pmap), gradients
and metrics are averaged across devices with `lax.pmean`, which makes both give the same
numbers.
"""
from typing import Any, Callable

import flax
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import optax

from research import metrics as metrics_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # mutable collections other than params, e.g. {'batch_stats': ...}, or {}


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng, example_inputs,
               unbox: bool = True):
  """A fresh state. unbox=False keeps the models' logical axis names (to derive shardings)."""
  variables = model.init({'params': rng, 'dropout': rng}, example_inputs, train=False)
  params = variables.pop('params')
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), model_state=dict(variables))
  return nn.meta.unbox(state) if unbox else state


def _schedule_count(opt_state):
  """The step count of the optimizer's schedule (optax's ScaleByScheduleState), before this
  update: the count optax evaluates a schedule at."""
  is_count = lambda x: isinstance(x, optax.ScaleByScheduleState)
  (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(x)]
  return state.count


def _apply(model, state, params, inputs, train, rng=None):
  """Runs the model; returns (outputs, updated model_state)."""
  variables = {'params': params, **state.model_state}
  if train and state.model_state:
    return model.apply(variables, inputs, train=True, rngs={'dropout': rng},
                       mutable=list(state.model_state))
  rngs = {'dropout': rng} if train else {}
  return model.apply(variables, inputs, train=train, rngs=rngs), state.model_state


def make_steps(model: nn.Module, tx: optax.GradientTransformation, *, loss: str,
               preprocess: Callable, num_classes: int = 0, label_smoothing: float = 0.0,
               grad_accum_steps: int = 1, concurrent_parts: int = 1,
               skip_nonfinite: bool = False, axis_name: str | None = None,
               learning_rate: Callable | None = None):
  """Builds (train_step, eval_step) for `loss` in {'cross_entropy', 'mse'}.

  num_classes > 0 adds accuracy to the metrics and a confusion matrix to evaluation.
  label_smoothing applies to the training loss; evaluation reports the plain cross-entropy.
  grad_accum_steps > 1 splits each batch into that many micro-batches whose gradients are
  averaged before one update (the same update as the whole batch, in less memory).
  concurrent_parts > 1 computes each of those as that many parts, the accumulation loop unrolled
  by as much: independent pieces of one program, which XLA's CPU runtime runs at the same time
  on different cores (the same update again, in more memory). Both are exact for models without
  BatchNorm or dropout; with them, each micro-batch or part is normalised by its own statistics
  (as in any gradient accumulation) and draws its own dropout masks, so the update differs from
  the whole batch's (by as much as another dropout seed would).
  skip_nonfinite: a step whose loss, gradients or updated parameters are not finite leaves the
  state unchanged (except the step counter) and reports metrics['skipped'] = 1; the optimizer's
  own count (its schedule's step) is reported as metrics['updates']. Without it,
  metrics['finite'] says whether they were (the training loop stops at a 0).
  learning_rate(schedule, count): for `tx` made with `unit_rate` (research/optim.py), the rate
  its updates are scaled by at the optimizer's step `count`; `schedule` is then the train
  step's fourth argument (`optim.schedule_inputs`), so that it is no constant of the step.
  """
  if loss == 'cross_entropy':
    per_example_loss = lambda out, y: metrics_lib.cross_entropy(out, y, label_smoothing)
    eval_loss = metrics_lib.cross_entropy  # evaluation: the plain loss, without smoothing
  elif loss == 'mse':
    per_example_loss = eval_loss = metrics_lib.squared_error
  else:
    raise ValueError(f'config.loss={loss!r}: use cross_entropy or mse.')
  mean = (lambda x: lax.pmean(x, axis_name)) if axis_name else (lambda x: x)

  def grads_and_metrics(state, inputs, targets, rng):
    def loss_fn(params):
      outputs, model_state = _apply(model, state, params, inputs, True, rng)
      return per_example_loss(outputs, targets).mean(), (outputs, model_state)

    (loss_value, (outputs, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    metrics = {'loss': loss_value}
    if num_classes:
      metrics['accuracy'] = jnp.mean(jnp.argmax(outputs, -1) == targets)
    return grads, metrics, model_state

  def train_step(state: TrainState, batch, rng, schedule=None):
    rng = jax.random.fold_in(rng, state.step)
    if axis_name:  # different augmentation and dropout on each device
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    preprocess_rng, model_rng = jax.random.split(rng)
    inputs = preprocess(batch['inputs'], preprocess_rng, train=True)
    targets = batch['targets']
    micro_batches = grad_accum_steps * concurrent_parts
    if micro_batches == 1:
      grads, metrics, model_state = grads_and_metrics(state, inputs, targets, model_rng)
    else:
      # Micro-batch i takes rows i, i + k, i + 2k, ... (k micro-batches): with the batch split
      # over devices, each device computes its share of every micro-batch from its own rows.
      split = lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1)

      def micro_step(carry, micro):
        grads_sum, metrics_sum, model_state = carry
        micro_state = state.replace(model_state=model_state)
        grads, metrics, model_state = grads_and_metrics(
            micro_state, micro[0], micro[1], jax.random.fold_in(model_rng, micro[2]))
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (add(grads_sum, grads), add(metrics_sum, metrics), model_state), None

      zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
      metrics_shape = jax.eval_shape(
          lambda: grads_and_metrics(state, split(inputs)[0], split(targets)[0], model_rng)[1])
      carry = (zeros(state.params), zeros(metrics_shape), state.model_state)
      (grads, metrics, model_state), _ = lax.scan(
          micro_step, carry, (split(inputs), split(targets), jnp.arange(micro_batches)),
          unroll=concurrent_parts)
      grads, metrics = jax.tree.map(lambda x: x / micro_batches, (grads, metrics))

    grads, metrics = mean(grads), mean(metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if learning_rate is not None:
      rate = learning_rate(schedule, _schedule_count(state.opt_state))
      updates = jax.tree.map(lambda u: u * rate.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    # The parameters too: an update can overflow them from a finite loss and gradients. Leaf by
    # leaf (a norm of large finite parameters could itself overflow).
    params_finite = jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]).all()
    ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']) & params_finite
    if not skip_nonfinite:
      metrics['finite'] = ok.astype(jnp.float32)
    else:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      model_state = keep(model_state, state.model_state)
      metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
      # Skipped steps keep the optimizer's step count, so its schedule lags the step by as
      # many: the loop logs the learning rate of this count (that of the last update made).
      counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                if getattr(path[-1], 'name', None) == 'count']
      if counts:
        metrics['updates'] = counts[-1]
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  def eval_step(state: TrainState, batch):
    """Sums over the real (mask == 1) examples; the caller adds them up across batches."""
    inputs = preprocess(batch['inputs'], None, train=False)
    outputs, _ = _apply(model, state, state.params, inputs, False)
    mask = batch['mask']
    per_example = eval_loss(outputs, batch['targets'])
    per_example = per_example.reshape(mask.shape[0], -1).mean(-1)  # tokens -> one per example
    sums = {'loss_sum': jnp.sum(per_example * mask), 'count': jnp.sum(mask)}
    if num_classes:
      predictions = jnp.argmax(outputs, -1)
      sums['confusion'] = metrics_lib.confusion_matrix(batch['targets'], predictions,
                                                       num_classes, mask)
    return lax.psum(sums, axis_name) if axis_name else sums

  return train_step, eval_step
