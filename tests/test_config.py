"""Tests of research.config: every experiment resolves, and misspelt or missing keys fail with a
message that names the key and the closest valid one."""
import importlib
import pathlib

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import pytest

from research import config
from research import models

EXPERIMENTS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'experiments').glob(
    '*.py') if p.stem != '__init__')


def experiment(name, arg=None):
  return importlib.import_module(f'experiments.{name}').get_config(arg)


def lookup(c, key):
  for part in key.split('.'):
    c = c[part]
  return c


def mnist_mlp_dict():
  """An experiment as a plain, unlocked dict, to add or remove keys."""
  return experiment('mnist_mlp').to_dict()


def test_experiments_found():
  assert {'mnist_mlp', 'mnist_cnn', 'cifar10_resnet', 'linear_regression'} <= set(EXPERIMENTS)


@pytest.mark.parametrize('arg', [None, 'cpu'])
@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_experiment_resolves(name, arg):
  c = experiment(name, arg)
  resolved = config.resolve(c)
  for key in config.REQUIRED:
    assert lookup(resolved, key) == lookup(c, key), key
  assert lookup(resolved, 'model.name') in models.MODELS
  models.build_model(resolved.model)  # every model key is a field of the model


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_cpu_variant_is_smaller(name):
  full, cpu = experiment(name), experiment(name, 'cpu')
  assert cpu.total_steps < full.total_steps
  assert cpu.total_steps * cpu.batch_size < full.total_steps * full.batch_size


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_accelerators_compute_in_bfloat16_except_in_the_tiny_models(name, monkeypatch):
  """bf16 activations with float32 parameters on GPUs and TPUs; float32 in the CPU variants.
  The MLP and the linear regression stay float32 everywhere, so that their numbers (a fitted
  slope to three digits) are the same on every device."""
  float32_everywhere = {'mnist_mlp', 'linear_regression'}
  for backend in ('gpu', 'tpu', 'cpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    model = models.build_model(config.resolve(experiment(name, 'cpu' if backend == 'cpu' else
                                                         None)).model)
    want = 'float32' if backend == 'cpu' or name in float32_everywhere else 'bfloat16'
    assert (jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)) == (want, 'float32'), backend


def test_resolve_fills_defaults():
  required = {'seed': 1, 'batch_size': 8, 'total_steps': 5, 'log_every_steps': 1,
              'eval_every_steps': 5, 'checkpoint_every_steps': 5,
              'model': {'name': 'mlp', 'hidden_sizes': (4,)}, 'data': {'name': 'mnist'},
              'optimizer': {'name': 'sgd', 'learning_rate': 0.5}}
  resolved = config.resolve(ml_collections.ConfigDict(required))
  assert (resolved.seed, resolved.optimizer.name, resolved.optimizer.learning_rate) == (
      1, 'sgd', 0.5)
  assert resolved.optimizer.b2 == config.defaults().optimizer.b2 == 0.999
  assert resolved.keep_checkpoints == 3 and resolved.data.train_split == 'train'


@pytest.mark.parametrize('where,key,value,bad,hint', [
    ((), 'total_step', 5, 'config.total_step', 'config.total_steps'),
    (('optimizer',), 'learning_rte', 0.1, 'config.optimizer.learning_rte',
     'config.optimizer.learning_rate'),
    (('data',), 'crop_paddin', 4, 'config.data.crop_paddin', 'config.data.crop_padding'),
    (('model',), 'hiden_sizes', (4,), 'config.model.hiden_sizes', 'config.model.hidden_sizes'),
])
def test_unknown_key_names_key_and_suggestion(where, key, value, bad, hint):
  d = mnist_mlp_dict()
  node = d
  for part in where:
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError) as e:
    config.resolve(ml_collections.ConfigDict(d))
  assert f'{bad} ' in str(e.value) and f'did you mean {hint}?' in str(e.value)


def test_defaults_are_locked():
  c = config.defaults('mlp')
  c.optimizer.learning_rate = 0.1  # an existing key is fine
  with pytest.raises(AttributeError, match='learning_rte'):
    c.optimizer.learning_rte = 0.1
  with pytest.raises(AttributeError, match='total_step'):
    c.total_step = 5
  with pytest.raises(AttributeError, match='hiden_sizes'):
    c.model.hiden_sizes = (4,)


def parent_of(d: dict, key: str):
  """'parallel.mesh.data' -> (d['parallel']['mesh'], 'data')."""
  *parents, leaf = key.split('.')
  for part in parents:
    d = d[part]
  return d, leaf


@pytest.mark.parametrize('key', config.REQUIRED)
def test_missing_required_key(key):
  d = mnist_mlp_dict()
  node, leaf = parent_of(d, key)
  del node[leaf]
  with pytest.raises(ValueError, match=rf'does not set config\.{key};'):
    config.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize('key', ['total_steps', 'batch_size', 'grad_accum_steps',
                                 'parallel.cpu_batch_parts', 'data.seq_len'])
def test_non_positive_counts_rejected(key):
  d = mnist_mlp_dict()
  node, leaf = parent_of(d, key)
  node[leaf] = 0
  with pytest.raises(ValueError, match=rf'config\.{key} must be a positive integer'):
    config.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize('key, bad, good', [
    ('model.dropout_rate', 1.5, 0.5), ('optimizer.learning_rate', -1.0, 0.0),
    ('label_smoothing', 1.0, 0.1), ('optimizer.b2', 1.0, 0.95),
    ('optimizer.weight_decay', float('nan'), 0.1), ('optimizer.warmup_steps', -5, 5),
    ('sample.top_p', 1.5, 1.0), ('sample.top_k', -3, 5), ('seed', -1, 7)])
def test_numbers_out_of_range_rejected(key, bad, good):
  """They trained without a word (a negative learning rate reached a loss of 7e7)."""
  d = mnist_mlp_dict()
  node, leaf = parent_of(d, key)
  node[leaf] = good
  config.resolve(ml_collections.ConfigDict(d))
  node[leaf] = bad
  with pytest.raises(ValueError, match=rf'config\.{key} must be a number (>=|in)'):
    config.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize('key', ['data.max_bytes', 'data.crop_padding'])
def test_negative_sizes_rejected(key):
  """max_bytes=-1 trained on one file less a byte; crop_padding=-1 failed inside JAX."""
  d = mnist_mlp_dict()
  node, leaf = parent_of(d, key)
  node[leaf] = 0
  config.resolve(ml_collections.ConfigDict(d))
  node[leaf] = -1
  with pytest.raises(ValueError, match=rf'config\.{key} must be 0 \(.+\) or a positive integer'):
    config.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize('mean, std, message', [
    ((0.1,), (0.0,), 'each must be > 0'),  # trained to NaN, advised a lower learning rate
    ((0.1, 0.2), (1.0, 2.0, 3.0), 'one per image channel or one for all'),
    ((0.1,), ('a',), 'tuples of numbers')])
def test_bad_image_normalisation_rejected(mean, std, message):
  ok = mnist_mlp_dict()
  ok['data']['mean'], ok['data']['std'] = (0.1, 0.2, 0.3), (0.25,)  # one std for all channels
  config.resolve(ml_collections.ConfigDict(ok))
  d = mnist_mlp_dict()
  d['data']['mean'], d['data']['std'] = mean, std
  with pytest.raises(ValueError, match=message):
    config.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize('boundaries, scales', [
    ((2, 3), (0.1, 0.1)),          # step numbers: the rate never dropped
    ((0.9, 0.2), (0.1, 0.1)),      # out of order
    ((0.5, 0.5), (0.1, 0.1)),      # one boundary twice: its second scale was lost
    ((0.5, 0.75), (0.1,)),         # a boundary without a scale was dropped silently
    ((0.5,), (-1.0,))])            # a negative rate ascends the loss
def test_bad_piecewise_schedule_rejected(boundaries, scales):
  d = mnist_mlp_dict()
  d['optimizer']['schedule'] = 'piecewise'
  d['optimizer']['boundaries'], d['optimizer']['scales'] = (0.5, 0.75), (0.1, 0.1)
  config.resolve(ml_collections.ConfigDict(d))
  d['optimizer']['boundaries'], d['optimizer']['scales'] = boundaries, scales
  with pytest.raises(ValueError, match='increasing fractions of total_steps'):
    config.resolve(ml_collections.ConfigDict(d))
  d['optimizer']['schedule'] = 'constant'  # read only by the piecewise schedule
  config.resolve(ml_collections.ConfigDict(d))


@pytest.mark.parametrize('key, value', [('dtype', 'float8'), ('dtype', 'int32'),
                                        ('param_dtype', 'auto')])
def test_model_dtypes_other_than_floats_rejected(key, value):
  d = mnist_mlp_dict()
  d['model'][key] = value
  with pytest.raises(ValueError, match=rf"config\.model\.{key}='{value}': use float32"):
    config.resolve(ml_collections.ConfigDict(d))
  d['model'][key] = 'bfloat16'
  config.resolve(ml_collections.ConfigDict(d))


def test_an_unknown_remat_policy_is_refused_when_the_config_is_read(caplog):
  """It was refused only when the model was built, after a warning that 'bogus' saves no
  memory on CPUs."""
  c = experiment('gpt_small', 'nano')
  c.model.remat = 'bogus'
  with pytest.raises(ValueError, match=r"config\.model\.remat='bogus' is not 'none', 'full'"):
    config.resolve(c)
  assert 'saves no memory' not in caplog.text
  d = experiment('gpt_small', 'nano').to_dict()
  d['model']['remat'] = True  # an experiment file's (was a TypeError from hasattr)
  with pytest.raises(ValueError, match=r"config\.model\.remat=True: use 'none', 'full'"):
    config.resolve(ml_collections.ConfigDict(d))


def test_parse_arg():
  assert config.parse_arg(None) == set()
  assert config.parse_arg('cpu') == {'cpu'}
  assert config.parse_arg('a,b', allowed=('a', 'b', 'c')) == {'a', 'b'}
  with pytest.raises(ValueError, match=r"\['gpu'\]"):
    config.parse_arg('cpu,gpu')


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiments_reject_unknown_arg(name):
  with pytest.raises(ValueError, match='runlocal'):
    experiment(name, 'runlocal')


def test_model_config_lists_every_field():
  c = config.defaults('mlp', hidden_sizes=(32,)).model
  assert set(c.keys()) - {'name'} == set(models.model_fields('mlp'))
  assert c.hidden_sizes == (32,) and c.activation == 'relu' and c.dtype == 'float32'


@pytest.mark.parametrize('name', ['', '  '])
def test_unset_data_name_names_the_key_and_the_accepted_values(name):
  d = mnist_mlp_dict()
  d['data']['name'] = name
  with pytest.raises(ValueError, match=r"config\.data\.name=.* names no dataset") as e:
    config.resolve(ml_collections.ConfigDict(d))
  for accepted in ("'text'", "'mnist_idx'", "'synthetic_linear'", 'TFDS'):
    assert accepted in str(e.value)


@pytest.mark.parametrize('value, want', [('relu', 'relu'), ('', '')])
def test_mlp_output_activation_can_be_set_from_the_command_line(value, want):
  """As launch.py parses it: a None-valued field could not be overridden at all."""
  path = pathlib.Path(__file__).parents[1] / 'experiments' / 'linear_regression.py'
  argv = ['launch.py', f'--config={path}:cpu', f'--config.model.output_activation={value}']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.model.output_activation == want
  assert config.defaults('mlp').model.output_activation == ''  # '': no output activation


@pytest.mark.parametrize('text, message', [
    ('{"seed": 0, "batch', r'config\.json is not a config written by a run \(Unterminated'),
    ('[1, 2]', r'config\.json is not a config written by a run: it has no seed\.'),
    ('{}', r'config\.json is not a config written by a run: it has no seed\.')])
def test_a_config_json_that_is_not_a_run_s_is_named(tmp_path, text, message):
  """'[1, 2]' was ml_collections' AttributeError, '{}' "The experiment does not set config.seed"
  in eval and "AttributeError: 'model'" in sample mode (research/sample.py reads it too)."""
  from research import saved_config  # pylint: disable=g-import-not-at-top
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ValueError, match=message):
    saved_config.get_config(str(tmp_path))


def test_saved_config_round_trip_and_the_argv_it_completes(tmp_path):
  """research/saved_config.py: a workdir's config.json as an experiment file. JSON's lists come
  back as tuples (an override of a tuple field failed on a list), and launch.py's argv gets
  --config pointing at it the way absl reads the flags (-workdir, the last --workdir)."""
  import json  # pylint: disable=g-import-not-at-top
  from experiments import mnist_cnn  # pylint: disable=g-import-not-at-top
  from research import saved_config  # pylint: disable=g-import-not-at-top
  original = config.resolve(mnist_cnn.get_config('cpu'))
  (tmp_path / 'config.json').write_text(original.to_json_best_effort())
  loaded = saved_config.get_config(str(tmp_path))
  assert loaded.data.mean == original.data.mean and isinstance(loaded.data.mean, tuple)
  assert loaded.parallel.rules == original.parallel.rules
  assert json.loads(loaded.to_json_best_effort()) == json.loads(original.to_json_best_effort())
  argv = ['launch.py', '-workdir=/nowhere', f'--workdir={tmp_path}', '--mode', 'eval']
  completed = saved_config.with_saved_config(argv)
  assert completed[1].startswith('--config=') and completed[1].endswith(f':{tmp_path}')
  assert completed[2:] == argv[1:]
  assert saved_config.with_saved_config(['launch.py', '--config=x.py', f'--workdir={tmp_path}'])[
      1] == '--config=x.py'  # an explicit experiment wins
  assert saved_config.with_saved_config(['launch.py', f'--workdir={tmp_path}', '--mode=sample'])[
      1:] == [f'--workdir={tmp_path}', '--mode=sample']  # sample reads config.json itself
  for argv, message in ((['launch.py', f'--workdir={tmp_path / "typo"}', '--config.seed=1'],
                         'config.json is missing'),
                        (['launch.py', f'--workdir={tmp_path}', '--mode=sample',
                          '--config.sample.temperature=0'], 'not --config.KEY overrides')):
    with pytest.raises(SystemExit, match=message):
      saved_config.with_saved_config(argv)


def test_a_vocabulary_size_only_for_bpe():
  """--config.data.vocab_size=100 with the char tokenizer was silently ignored."""
  d = mnist_mlp_dict()
  d['data'].update(name='text', tokenizer='char', vocab_size=100)
  with pytest.raises(ValueError, match=r"vocab_size=100 is the size of a bpe vocabulary to "
                                       r"learn; tokenizer 'char' has its own"):
    config.resolve(ml_collections.ConfigDict(d))
  d['data'].update(tokenizer='bpe')
  config.resolve(ml_collections.ConfigDict(d))
