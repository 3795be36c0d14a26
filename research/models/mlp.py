"""Multi-layer perceptron; with no hidden layers it is linear (or logistic) regression."""
from typing import Any, Sequence

from flax import linen as nn
import jax.numpy as jnp

ACTIVATIONS = {'sigmoid': nn.sigmoid, 'relu': nn.relu, 'tanh': nn.tanh, 'gelu': nn.gelu}
INITIALIZERS = {
    'xavier_uniform': nn.initializers.xavier_uniform(),
    'lecun_normal': nn.initializers.lecun_normal(),
    'he_normal': nn.initializers.he_normal(),
    'normal': nn.initializers.normal(stddev=0.01),
}


def lookup(table: dict, key: str, what: str):
  if key not in table:
    raise ValueError(f'config.model.{what}={key!r} is not one of {sorted(table)}.')
  return table[key]


class MLP(nn.Module):
  """Flattens its input, then Dense -> activation (-> dropout) per hidden size, then Dense."""
  num_outputs: int = 10
  hidden_sizes: Sequence[int] = (128,)
  activation: str = 'relu'
  kernel_init: str = 'lecun_normal'
  dropout_rate: float = 0.0
  # After the last Dense, e.g. 'relu' for the Linear+ReLU regression model; '' (the default):
  # none. A string, not None, so that --config.model.output_activation= can set it.
  output_activation: str = ''
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    act = lookup(ACTIVATIONS, self.activation, 'activation')
    init = lookup(INITIALIZERS, self.kernel_init, 'kernel_init')
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for width in self.hidden_sizes:
      x = act(nn.Dense(width, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_outputs, kernel_init=init, dtype=self.dtype,
                 param_dtype=self.param_dtype)(x)
    if self.output_activation:
      x = lookup(ACTIVATIONS, self.output_activation, 'output_activation')(x)
    return x.astype(jnp.float32)
