"""Optax optimizer and learning-rate schedule from `config.optimizer`.

The trainer's compiled step takes the schedule's numbers (`schedule_inputs`: the peak rate,
warm-up, decay length, ...) as arguments, not as constants in it: the optimizer runs at a unit
rate and the step scales its updates by `learning_rate(inputs, count)`. So a sweep over
learning rates, or a run extended by `total_steps`, reuses the compiled step from JAX's
persistent compilation cache. The rates are optax's schedules' to float32 rounding (a cosine
computed from inputs rounds differently from one folded from constants: within 1e-6, tested).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ('constant', 'warmup_cosine', 'piecewise')


def schedule_inputs(opt_config, total_steps: int) -> dict[str, np.ndarray]:
  """The numbers of `config.optimizer.schedule` over `total_steps`, as float32 arrays:
  constant | warmup_cosine | piecewise (each with optional linear warm-up)."""
  name, lr, warmup = opt_config.schedule, opt_config.learning_rate, opt_config.warmup_steps
  if name not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule={name!r}: use constant, warmup_cosine or '
                     'piecewise.')
  inputs = {'peak': lr, 'warmup': warmup}
  if name == 'warmup_cosine':
    inputs['decay_steps'] = max(total_steps - warmup, 1)
    alpha = opt_config.min_learning_rate / lr if lr else 0.0
    inputs['alpha'], inputs['one_minus_alpha'] = alpha, 1 - alpha  # in float64, as optax
  elif name == 'piecewise':
    # boundaries are fractions of training, e.g. (0.5, 0.75) with scales (0.1, 0.1); counted
    # after the warm-up, as optax's schedules joined after it are (one scale per boundary).
    # Boundaries that round to one step drop there by the product of their scales (a dict of
    # step -> scale kept only the last: a drop was lost on short runs).
    drops = {}
    for b, s in zip(opt_config.boundaries, opt_config.scales):
      step = int(b * total_steps) - warmup
      drops[step] = drops.get(step, 1.0) * s
    inputs['boundaries'], inputs['scales'] = sorted(drops), [drops[b] for b in sorted(drops)]
  return {key: np.asarray(value, np.float32) for key, value in inputs.items()}


def learning_rate(name: str, inputs, count):
  """Schedule `name`'s rate at optimizer step `count`, from `schedule_inputs` (arrays or
  tracers): optax's linear warm-up joined to its cosine decay, piecewise constant or constant
  schedule, written over those inputs."""
  peak, warmup = inputs['peak'], inputs['warmup']

  def main(step):  # the schedule after the warm-up, from its own step 0
    if name == 'warmup_cosine':
      decay_steps = inputs['decay_steps']
      step = jnp.minimum(step, decay_steps)
      cosine_decay = 0.5 * (1 + jnp.cos(jnp.pi * step / decay_steps))
      return peak * (inputs['one_minus_alpha'] * cosine_decay + inputs['alpha'])
    if name == 'piecewise':
      value = peak
      for i in range(inputs['boundaries'].shape[0]):
        indicator = jnp.maximum(0.0, jnp.sign(inputs['boundaries'][i] - step))
        value = value * indicator + (1 - indicator) * inputs['scales'][i] * value
      return value
    return peak * jnp.ones_like(step, jnp.float32)

  frac = 1 - jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1)
  warming = peak - peak * frac
  return jnp.where(count < warmup, warming, main(count - warmup))


def make_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """The schedule as a function of the step (on the host: logging, the resume's checks)."""
  inputs = schedule_inputs(opt_config, total_steps)
  return lambda count: learning_rate(opt_config.schedule, inputs, count)


DECAYED = frozenset({'kernel', 'embedding'})  # Flax's names for weight matrices and tables


def decay_mask(params):
  """Weight decay applies to weights (Flax `kernel`s and `embedding`s), never to biases or norms.

  By name, not by rank: a stacked (scanned) LayerNorm scale or a [3, heads, head_dim] attention
  bias has more than one dimension but is no weight matrix.
  """
  def is_weight(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED
  return jax.tree_util.tree_map_with_path(is_weight, params)


def make_optimizer(opt_config, total_steps: int, unit_rate: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax optimizer, its schedule). unit_rate: the optimizer runs at rate 1 (its state as with
  the schedule: a step count) and the caller scales its updates by the schedule's rate, as the
  trainer's compiled step does with `learning_rate(schedule, inputs, count)`."""
  schedule = make_schedule(opt_config, total_steps)
  rate = (lambda count: 1.0) if unit_rate else schedule
  name, wd = opt_config.name, opt_config.weight_decay
  if name == 'sgd':
    tx = optax.sgd(rate, momentum=opt_config.momentum or None,
                   nesterov=opt_config.nesterov)
    if wd:  # L2 regularisation added to the gradient, as in classic SGD recipes
      tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)
  elif name == 'adam':
    tx = optax.adam(rate, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)
  elif name == 'adamw':
    tx = optax.adamw(rate, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                     weight_decay=wd, mask=decay_mask)
  else:
    raise ValueError(f'config.optimizer.name={name!r}: use sgd, adam or adamw.')
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx, schedule
