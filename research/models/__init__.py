"""Model registry: `config.model.name` -> a Flax Linen module class.

Every other key of `config.model` must be a field of that module's dataclass;
a misspelt key is an error that names the valid ones.

Importing this package also makes JAX's random bits fused on CPUs (`fuse_threefry_on_cpu`):
dropout there cost 7% of a training step otherwise.
"""
import dataclasses
import difflib
import importlib
import warnings

from flax import linen as nn
import jax
import jax.numpy as jnp

# name -> "module:Class", imported on first use so that an image experiment never imports
# the transformer code and vice versa.
MODELS = {
    'mlp': 'research.models.mlp:MLP',
    'lenet5': 'research.models.cnn:LeNet5',
    'mnist_cnn': 'research.models.cnn:MnistCNN',
    'resnet': 'research.models.cnn:ResNet',
    'gpt': 'research.models.transformer:GPT',
}

_NOT_FIELDS = ('parent', 'name')


def fuse_threefry_on_cpu() -> bool:
  """Lowers JAX's threefry2x32 hash (behind `jax.random` with its default keys, so behind
  dropout) on CPUs as on GPUs and TPUs: unrolled, so that XLA fuses it into one loop over the
  elements. Returns whether it did.

  On CPUs JAX lowers it as a 5-iteration while loop (smaller programs to compile), which XLA
  cannot fuse: every iteration writes the whole state, two uint32 arrays of the output's size,
  to memory and reads it back. shakespeare_char's dropout masks ([64, 256, 384], 13 per step)
  took 42 ms each that way and 8 ms unrolled, its step 5.8-6.0 s -> 5.4-5.55 s on a 2-core CPU
  (BENCHMARKS.md). The bits are the same (the same hash; tests/test_models.py checks it); the
  step compiled 0.4-0.7 s slower. Programs JAX lowered before this call keep the loop. This
  uses JAX internals (`jax._src`): where they have moved, it warns and JAX's own lowering
  stays (slower dropout on CPUs, the same results).
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    # JAX's own rule for other platforms, registered as JAX registers it there (out of line).
    mlir.register_lowering(threefry2x32.threefry2x32_p,
                           threefry2x32._threefry2x32_lowering_rule,  # pylint: disable=protected-access
                           platform='cpu', inline=False)
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f'research.models: could not fuse JAX\'s threefry on CPUs ({e!r}); dropout '
                  'keeps JAX\'s slower CPU lowering.', stacklevel=2)
    return False
  return True


fuse_threefry_on_cpu()


def model_class(name: str) -> type[nn.Module]:
  if name not in MODELS:
    hint = difflib.get_close_matches(name, MODELS, n=1)
    raise ValueError(
        f'config.model.name={name!r} is not a known model'
        + (f' (did you mean {hint[0]!r}?)' if hint else '')
        + f'; known models: {sorted(MODELS)}.')
  module, cls = MODELS[name].split(':')
  return getattr(importlib.import_module(module), cls)


def model_fields(name: str) -> list[str]:
  return [f.name for f in dataclasses.fields(model_class(name))
          if f.init and f.name not in _NOT_FIELDS]


def check_config(model_config, extra=()):
  """Raises a ValueError naming any key of `config.model` that is not a field of the model."""
  fields = model_fields(model_config.name)
  for key in list(model_config.keys()) + list(extra):
    if key != 'name' and key not in fields:
      hint = difflib.get_close_matches(key, fields, n=1)
      raise ValueError(
          f'config.model.{key} is not a field of model {model_config.name!r}'
          + (f' (did you mean config.model.{hint[0]}?)' if hint else '')
          + f'; its fields are {fields}.')
  for key, value in {**model_config, **dict(extra)}.items():
    if key.endswith('dtype') and not (value == 'auto' and key == 'dtype' or _float_dtype(value)):
      raise ValueError(f'config.model.{key}={value!r}: use float32, bfloat16 or float16'
                       + (" (or 'auto': bfloat16 on GPUs/TPUs, float32 on CPUs)."
                          if key == 'dtype' else '.'))
  check = getattr(model_class(model_config.name), 'check_fields', None)
  if check:  # the model's own checks of its field values (e.g. heads dividing the width)
    check({**{k: v for k, v in model_config.items() if k != 'name'}, **dict(extra)})


def _float_dtype(value) -> bool:
  try:
    return jnp.dtype(value).name in ('float32', 'bfloat16', 'float16')
  except TypeError:  # not a dtype at all ('float8', 3)
    return False


def auto_dtype() -> str:
  """`config.model.dtype='auto'`: bfloat16 activations on accelerators, float32 on CPUs."""
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


def build_model(model_config, **overrides) -> nn.Module:
  """Builds `config.model` into a module; `overrides` are set by the trainer (e.g. dtype)."""
  check_config(model_config, extra=overrides)
  kwargs = {k: v for k, v in model_config.items() if k != 'name'}
  kwargs.update(overrides)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if kwargs.get('dtype') == 'auto':
    kwargs['dtype'] = auto_dtype()
  for key in ('dtype', 'param_dtype'):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return model_class(model_config.name)(**kwargs)
