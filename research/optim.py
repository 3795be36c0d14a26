"""Optax optimizer and learning-rate schedule from `config.optimizer`."""
import jax
import optax


def make_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """constant | warmup_cosine | piecewise (each with optional linear warmup)."""
  lr, warmup = opt_config.learning_rate, opt_config.warmup_steps
  name = opt_config.schedule
  if name == 'constant':
    main = optax.constant_schedule(lr)
  elif name == 'warmup_cosine':
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                       alpha=opt_config.min_learning_rate / lr if lr else 0.0)
  elif name == 'piecewise':
    # boundaries are fractions of training, e.g. (0.5, 0.75) with scales (0.1, 0.1).
    boundaries = {int(b * total_steps) - warmup: s
                  for b, s in zip(opt_config.boundaries, opt_config.scales)}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise ValueError(f'config.optimizer.schedule={name!r}: use constant, warmup_cosine or '
                     'piecewise.')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


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


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
  schedule = make_schedule(opt_config, total_steps)
  name, wd = opt_config.name, opt_config.weight_decay
  if name == 'sgd':
    tx = optax.sgd(schedule, momentum=opt_config.momentum or None,
                   nesterov=opt_config.nesterov)
    if wd:  # L2 regularisation added to the gradient, as in classic SGD recipes
      tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)
  elif name == 'adam':
    tx = optax.adam(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)
  elif name == 'adamw':
    tx = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                     weight_decay=wd, mask=decay_mask)
  else:
    raise ValueError(f'config.optimizer.name={name!r}: use sgd, adam or adamw.')
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  return tx, schedule
