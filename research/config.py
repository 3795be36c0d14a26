"""Every key the trainer reads, with its default, and validation of experiment configs.

An experiment file sets what it needs; `resolve(config)` fills in the rest from `defaults()`
and rejects keys the trainer does not know (a misspelt key would otherwise be silently
ignored), naming the closest valid key. `config.model` is checked against the chosen model's
own fields (see research/models). Everything here runs before anything is compiled.
"""
import dataclasses
import difflib
import functools
import math

import jax.numpy as jnp
import ml_collections

from research import models

# Every experiment sets these, so that forks and scripts can rely on them.
REQUIRED = ('seed', 'batch_size', 'total_steps', 'log_every_steps', 'eval_every_steps',
            'checkpoint_every_steps', 'model.name', 'data.name', 'optimizer.name',
            'optimizer.learning_rate')

# config.data.name: these, or any TFDS dataset name (research/data).
DATA_NAMES = "'text' (language modelling), 'mnist_idx', 'synthetic_linear'"


def model_config(name: str, **fields) -> ml_collections.ConfigDict:
  """Every field of model `name` with its default (dtypes as names), updated with `fields`."""
  c = ml_collections.ConfigDict({'name': name})
  for field in dataclasses.fields(models.model_class(name)):
    if field.init and field.name not in ('name', 'parent'):
      value = field.default
      if field.name.endswith('dtype'):
        value = jnp.dtype(value).name
      c[field.name] = value
  models.check_config(ml_collections.ConfigDict({'name': name, **fields}))
  c.update(fields)
  return c


def defaults(model: str | None = None, **model_fields) -> ml_collections.ConfigDict:
  """All trainer keys with their defaults; with `model`, all of that model's fields too.

  The result is locked: assigning a key that does not exist (a typo) raises at once, and every
  key can be overridden from the command line (--config.data.path=...).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64                # global, across all devices and processes
  c.total_steps = 1000
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.loss = 'cross_entropy'         # cross_entropy | mse
  c.label_smoothing = 0.0
  c.grad_accum_steps = 1           # micro-batches per update
  c.max_eval_batches = 0           # 0: the whole eval split
  c.eval_batch_size = 0            # global; 0: batch_size
  c.nonfinite = 'stop'             # a NaN/inf loss or gradient: stop | skip (the update)
  c.init_from = ''                 # a workdir whose newest parameters (and BatchNorm
                                   # statistics) start a new run (its tokenizer too, for
                                   # language models)

  # keys checked against the model's fields
  c.model = model_config(model, **model_fields) if model else ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.name = ''                 # 'text', 'mnist_idx', 'synthetic_linear' or a TFDS name
  c.data.data_dir = ''             # TFDS data_dir; '' = TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.download = True           # let TFDS download and prepare a missing dataset
  c.data.path = ''                 # mnist_idx: folder with the IDX files (.gz or not)
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.mean = (0.0,)             # after scaling uint8 images to [0, 1]
  c.data.std = (1.0,)
  c.data.crop_padding = 0          # random crop after zero-padding by this many pixels
  c.data.random_flip = False
  c.data.num_examples = 1000       # synthetic_linear
  c.data.slope = 2.0
  c.data.intercept = 0.0
  c.data.noise = 0.1
  # data.name = 'text': language modelling (research/data/text.py)
  c.data.source = 'python_stdlib'  # 'python_stdlib' | a path, folder or glob | 'tfds:NAME'
  c.data.tokenizer = 'byte'        # byte | char | bpe | gpt2
  c.data.vocab_size = 0            # bpe: the vocabulary to train
  c.data.seq_len = 256
  c.data.max_bytes = 0             # 0: all the text
  c.data.cache_dir = ''            # trained tokenizers; '' = ~/.cache/research/tokenizers

  c.sample = ml_collections.ConfigDict()  # language models: samples written at each eval
  c.sample.prompt = '\n'
  c.sample.max_new_tokens = 64     # 0: no samples
  c.sample.temperature = 0.8
  c.sample.top_k = 0               # 0: off
  c.sample.top_p = 0.0             # 0: off

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'        # sgd | adam | adamw
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'constant'  # constant | warmup_cosine | piecewise
  c.optimizer.warmup_steps = 0
  c.optimizer.min_learning_rate = 0.0  # warmup_cosine: the final learning rate
  c.optimizer.boundaries = (0.5, 0.75)  # piecewise: fractions of total_steps
  c.optimizer.scales = (0.1, 0.1)
  c.optimizer.momentum = 0.9       # sgd
  c.optimizer.nesterov = False
  c.optimizer.b1 = 0.9             # adam, adamw
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # adamw: decoupled; sgd, adam: L2, added to the gradient (torch.optim.SGD/Adam's weight_decay).
  # Never applied to biases and norm scales.
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0  # 0: no clipping

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = 'jit'          # jit (a device mesh) | pmap
  c.parallel.num_devices = 0       # 0: every device of every process
  # Mesh axis sizes (-1: the devices left over); their product is the number of devices.
  c.parallel.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Logical axis name -> mesh axes, first match wins (research/parallel.py).
  c.parallel.rules = (
      ('batch', ('data', 'fsdp')),  # activations: the batch is split over data and fsdp
      ('embed', 'fsdp'),            # parameters: FSDP shards the model width
      ('vocab', 'tensor'),          # tensor parallelism: vocabulary, heads, MLP width
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('kv', None), ('length', None), ('layers', None))
  # XLA options for compiling the steps on CPUs, 'name=value,...' (research/parallel.py), e.g.
  # 'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE' (matmuls in Eigen; a list
  # option takes several values, 'name=A,B'); ''
  # for XLA's defaults; 'auto': matmuls in Eigen on x86 CPUs without AVX-512, where that
  # measured faster, else XLA's defaults (parallel.auto_cpu_options).
  c.parallel.cpu_compiler_options = 'auto'
  # On CPUs: each (micro-)batch computed as this many independent parts of one program, which
  # XLA's runtime runs at the same time on different cores (the same update, BatchNorm and
  # dropout aside: each part is normalised by its own statistics and draws its own dropout
  # masks; BENCHMARKS.md).
  c.parallel.cpu_batch_parts = 1
  c.lock()
  return c


def _flat_keys(config, prefix=''):
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ml_collections.ConfigDict) and key != 'model':
      yield from _flat_keys(value, path + '.')
    else:
      yield path


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns defaults() updated with `config`; raises ValueError on unknown or missing keys."""
  known = set(_flat_keys(defaults()))
  given = set(_flat_keys(config))
  for key in sorted(given - known):
    hint = difflib.get_close_matches(key, known, n=1)
    raise ValueError(f'Unknown config key config.{key}'
                     + (f' (did you mean config.{hint[0]}?)' if hint else '')
                     + '. Known keys are listed in research/config.py.')
  for key in REQUIRED:
    node = config
    for part in key.split('.'):
      if part not in node:
        raise ValueError(f'The experiment does not set config.{key}; every experiment must set '
                         f'{", ".join(REQUIRED)}.')
      node = node[part]
  resolved = defaults()
  model = config.model
  with resolved.unlocked(), resolved.model.unlocked():
    resolved.update(config)  # recursive for nested ConfigDicts
    resolved.model = ml_collections.ConfigDict(model.to_dict())
  models.check_config(resolved.model)
  if not isinstance(resolved.data.name, str) or not resolved.data.name.strip():
    raise ValueError(f'config.data.name={resolved.data.name!r} names no dataset: set it to '
                     f"{DATA_NAMES} or the name of a TFDS dataset (e.g. 'mnist', 'cifar10'; "
                     'see https://www.tensorflow.org/datasets/catalog).')
  if resolved.nonfinite not in ('stop', 'skip'):
    raise ValueError(f'config.nonfinite={resolved.nonfinite!r}: use stop or skip.')
  get = lambda key: functools.reduce(lambda node, part: node[part], key.split('.'), resolved)
  for key in ('total_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
              'batch_size', 'grad_accum_steps', 'parallel.cpu_batch_parts', 'data.seq_len',
              'keep_checkpoints'):  # 0 would have Orbax delete every checkpoint, old ones too
    value = get(key)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'config.{key} must be a positive integer, got {value!r}.')
  for key, zero in (('max_eval_batches', 'the whole eval split'), ('eval_batch_size', 'batch_size'),
                    ('parallel.num_devices', 'every device'), ('data.max_bytes', 'all the text'),
                    ('data.crop_padding', 'no crop')):
    value = get(key)
    if not isinstance(value, int) or value < 0:
      raise ValueError(f'config.{key} must be 0 ({zero}) or a positive integer, got '
                       f'{value!r}.')
  for key, low, high in RANGES:
    if key == 'model.dropout_rate' and 'dropout_rate' not in resolved.model:
      continue
    value = get(key)
    closed = key in CLOSED_ABOVE
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not (low <= value <= high if closed else low <= value < high)):
      allowed = (f'>= {low}' if high == math.inf else
                 f'in [{low}, {high}{"]" if closed else ")"}')
      raise ValueError(f'config.{key} must be a number {allowed}, got {value!r}.')
  _check_normalisation(resolved.data)
  _check_piecewise(resolved.optimizer)
  if resolved.data.vocab_size and resolved.data.tokenizer != 'bpe':
    raise ValueError(f'config.data.vocab_size={resolved.data.vocab_size} is the size of a bpe '
                     f'vocabulary to learn; tokenizer {resolved.data.tokenizer!r} has its own: '
                     'leave it at 0.')
  return resolved


def _numbers(value) -> bool:
  return isinstance(value, (tuple, list)) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _check_normalisation(data):
  """Images are (x - mean) / std per channel: values per channel or one for all, std > 0."""
  mean, std = data.mean, data.std
  if (not _numbers(mean) or not _numbers(std) or not mean or not std
      or len(mean) != len(std) and 1 not in (len(mean), len(std))):
    raise ValueError(f'config.data.mean={mean!r} and config.data.std={std!r} must be tuples of '
                     'numbers, one per image channel or one for all (e.g. (0.5,) and (0.25,)).')
  if min(std) <= 0:
    raise ValueError(f'config.data.std={std!r}: images are divided by it, so each must be > 0.')


def _check_piecewise(optimizer):
  """piecewise: the rate is multiplied by scales[i] at boundaries[i] * total_steps."""
  boundaries, scales = optimizer.boundaries, optimizer.scales
  if optimizer.schedule != 'piecewise':
    return
  if (not _numbers(boundaries) or not _numbers(scales) or len(boundaries) != len(scales)
      or any(not 0 < b < 1 for b in boundaries)
      or any(a >= b for a, b in zip(boundaries, boundaries[1:]))
      or min(scales, default=0) < 0):
    raise ValueError(
        f'config.optimizer.boundaries={boundaries!r} with scales={scales!r}: boundaries are '
        'increasing fractions of total_steps in (0, 1) (e.g. (0.5, 0.75), not step numbers), '
        'each with a scale >= 0 that multiplies the rate from there on (e.g. (0.1, 0.1)).')


# Number keys and their allowed ranges [low, high): values outside would train without error
# and mean nothing (a negative learning rate ascends the loss; dropout 1.5 scales by -2).
RANGES = (('label_smoothing', 0, 1), ('model.dropout_rate', 0, 1),
          ('optimizer.learning_rate', 0, math.inf), ('optimizer.min_learning_rate', 0, math.inf),
          ('optimizer.warmup_steps', 0, math.inf), ('optimizer.momentum', 0, 1),
          ('optimizer.b1', 0, 1), ('optimizer.b2', 0, 1), ('optimizer.eps', 0, math.inf),
          ('optimizer.weight_decay', 0, math.inf), ('optimizer.grad_clip_norm', 0, math.inf),
          ('sample.temperature', 0, math.inf), ('sample.top_k', 0, math.inf),
          ('sample.top_p', 0, 1),
          ('seed', 0, 2**31))  # numpy's generators refuse a negative seed (at the first batch)
CLOSED_ABOVE = {'sample.top_p'}  # 1 allowed: the whole distribution


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}, for comparing configs."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def parse_arg(arg: str | None, allowed=('cpu',)) -> set[str]:
  """`--config=experiments/X.py:cpu` -> {'cpu'}; comma-separated; unknown options fail."""
  options = set(filter(None, (arg or '').split(',')))
  unknown = options - set(allowed)
  if unknown:
    raise ValueError(f'Unknown experiment argument(s) {sorted(unknown)}; this experiment '
                     f'accepts {list(allowed)}.')
  return options
