"""The real train_and_evaluate / evaluate / launch.py, on mocked TFDS data and synthetic data."""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from research import checkpoint
from research import parallel
from research import train
from research.data import image
from tests.conftest import ROOT, xla_flags

EXPERIMENTS = ['mnist_mlp', 'mnist_cnn', 'cifar10_lenet', 'cifar10_resnet', 'linear_regression']


def cpu_config(name, **overrides):
  config = importlib.import_module(f'experiments.{name}').get_config('cpu')
  config.total_steps, config.log_every_steps = 3, 1
  config.eval_every_steps = config.checkpoint_every_steps = 3
  config.batch_size = 16
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def after_each_train_step(on_step, patch=setattr):
  """Has each train step of the runs train.setup builds from now on call `on_step(number of
  steps run so far)` once it returns; `patch`: how train.setup is replaced (monkeypatch.setattr
  in a test, setattr in a subprocess of its own)."""
  setup = train.setup
  def counting_setup(*args, **kwargs):
    exp = setup(*args, **kwargs)
    step, calls = exp.compiled.train_step, [0]
    def counted(*step_args):
      out = step(*step_args)
      calls[0] += 1
      on_step(calls[0])
      return out
    exp.compiled.train_step = counted
    return exp
  patch(train, 'setup', counting_setup)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_experiment_trains_and_evaluates(name, tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(cpu_config(name), str(tmp_path))
  records = read_metrics(tmp_path)
  train_lines = [r for r in records if r['split'] == 'train']
  assert [r["step"] for r in train_lines] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) and r['examples_per_sec'] > 0 for r in train_lines)
  eval_line = [r for r in records if r['split'] == 'eval'][-1]
  assert eval_line['step'] == 3 and eval_line['loss'] == pytest.approx(result['loss'])
  assert result['num_examples'] == (40 if name != 'linear_regression' else 1000)
  if name != 'linear_regression':
    assert {'accuracy', 'precision', 'recall', 'f1'} <= set(result)
    confusion = np.loadtxt(tmp_path / 'confusion_matrix.csv', delimiter=',')
    assert confusion.shape == (10, 10) and confusion.sum() == 40
  assert json.loads((tmp_path / 'config.json').read_text())['model']['name']
  assert os.listdir(tmp_path / 'tensorboard')
  assert os.path.isdir(tmp_path / 'checkpoints' / '3')


def final_params(config, workdir):
  exp = train.setup(config, workdir)
  state, step = train.restore_or_init(exp)
  return step, jax.device_get(exp.compiled.get_state(state).params)


def test_resume_is_exact(tmp_path):
  """2N steps straight == N steps, an interruption, and a relaunch for the other N."""
  config = cpu_config('mnist_mlp', total_steps=8, checkpoint_every_steps=4,
                      eval_every_steps=8, log_every_steps=1)
  config.optimizer.schedule, config.optimizer.warmup_steps = 'warmup_cosine', 2  # schedule position
  config.model.dropout_rate = 0.3                                                 # dropout rng
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    train.train_and_evaluate(config, straight)
    # The "interrupted" run: everything the straight run had written up to step 4.
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))
    with open(os.path.join(resumed, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in read_metrics(straight) if r['step'] <= 4)
    assert final_params(config, resumed)[0] == 4
    train.train_and_evaluate(config, resumed)
    (step_a, params_a), (step_b, params_b) = (final_params(config, d) for d in (straight, resumed))
  assert step_a == step_b == 8
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ('time', 'examples_per_sec')}
                      for r in rs if r['step'] > 4]
  after_a, after_b = strip(read_metrics(straight)), strip(read_metrics(resumed))
  assert len(after_a) == 5 and after_a == after_b  # train steps 5-8 and the eval at 8


def test_eval_mode_matches_final_eval_and_finished_run_does_not_retrain(tmp_path, capsys):
  config = cpu_config('mnist_cnn')
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    trained = train.train_and_evaluate(config, str(tmp_path))
    evaluated = train.evaluate(config, str(tmp_path))
    other = config.copy_and_resolve_references()
    other.data.eval_split = 'train'  # --mode=eval on other data, at the same step
    other.max_eval_batches, other.eval_batch_size = 1, 8
    on_train = train.evaluate(other, str(tmp_path))
    lines_before = len(read_metrics(tmp_path))
    again = train.train_and_evaluate(config, str(tmp_path))
  assert evaluated == pytest.approx(trained) and on_train != pytest.approx(trained)
  assert [r['eval_split'] for r in read_metrics(tmp_path) if r['split'] == 'eval'] == [
      'test', 'test', 'train']  # each evaluation says which data it used
  # The finished run's evaluation (was {}), on its own eval split (was the newest line).
  assert again == pytest.approx(trained)
  assert 'already finished' in capsys.readouterr().out
  assert len(read_metrics(tmp_path)) == lines_before


def test_evaluate_without_checkpoint_says_so(tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
      train.evaluate(cpu_config('mnist_cnn'), str(tmp_path))


@pytest.fixture
def no_compilation(monkeypatch):
  """Makes building the compiled steps fail, to show an error comes before any compilation."""
  def fail(*args, **kwargs):
    raise AssertionError('compile_steps was reached')
  monkeypatch.setattr(parallel, 'compile_steps', fail)


@pytest.mark.parametrize('mean, std', [((0.1, 0.2, 0.3), (1.0, 1.0, 1.0)),
                                       ((0.1, 0.2), (1.0, 2.0))])
def test_a_normalisation_for_other_channels_fails_before_compilation(tmp_path, no_compilation,
                                                                     mean, std):
  """Three means for MNIST's one channel made three-channel images: Flax's ScopeParamShapeError
  inside the first step."""
  config = cpu_config('mnist_cnn', **{'data.mean': mean, 'data.std': std})
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=r"the images of 'mnist' have 1 channel\(s\)"):
      train.setup(config, str(tmp_path))


def test_a_model_vocabulary_other_than_the_tokenizer_s_fails_before_compilation(
    tmp_path, no_compilation):
  """It was replaced by the tokenizer's size without a word."""
  config = cpu_config('gpt_small', **{'model.vocab_size': 10, 'data.max_bytes': 100_000})
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size=10, but the vocabulary is "
                     r"the tokenizer's \(257 tokens of config\.data\.tokenizer='byte'\)"):
    train.setup(config, str(tmp_path))
  config.model.vocab_size = 257  # the same as the tokenizer's (a saved config.json's): fine
  with pytest.raises(AssertionError, match='compile_steps was reached'):
    train.setup(config, str(tmp_path))


def test_unknown_config_key_fails_before_compilation(tmp_path, no_compilation):
  config = cpu_config('mnist_cnn')
  with config.unlocked():
    config.optimizer.learning_rte = 0.1
  with pytest.raises(ValueError, match=r'config\.optimizer\.learning_rte.*learning_rate'):
    train.train_and_evaluate(config, str(tmp_path))


def test_batch_size_not_divisible_by_devices_fails_before_compilation(tmp_path, no_compilation):
  assert jax.device_count() == 8
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=r'config\.batch_size=12 is not divisible .* \(8 = mesh'):
      train.train_and_evaluate(cpu_config('mnist_cnn', batch_size=12), str(tmp_path))


def test_model_outputs_must_match_the_dataset_classes(tmp_path, no_compilation):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=r"num_outputs=3, but 'mnist' has 10 classes"):
      train.train_and_evaluate(cpu_config('mnist_mlp', **{'model.num_outputs': 3}), str(tmp_path))


def test_unprepared_dataset_fails_before_compilation(tmp_path, no_compilation):
  config = cpu_config('mnist_cnn', **{'data.data_dir': str(tmp_path / 'tfds'),
                                      'data.download': False})
  with pytest.raises(image.DataError, match=r"(?s)'mnist' is not prepared in .*tfds.*tfds build mnist"
                     r'.*--config.data.name=mnist_idx --config.data.path=FOLDER'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def launch_command(*args, mock_tfds=False):
  """The command line and environment that run launch.py (under TFDS mock data if asked)."""
  if mock_tfds:
    code = ('import sys, runpy, tensorflow_datasets as tfds\n'
            'sys.argv = ["launch.py"] + sys.argv[1:]\n'
            'with tfds.testing.mock_data(num_examples=40, '
            'policy=tfds.testing.MockPolicy.USE_CODE):\n'
            '  runpy.run_path("launch.py", run_name="__main__")\n')
    command = [sys.executable, '-c', code, *args]
  else:
    command = [sys.executable, 'launch.py', *args]
  return command, {**os.environ, 'XLA_FLAGS': xla_flags(2)}


def run_launch(*args, mock_tfds=False, env=None):
  """Runs launch.py in a fresh interpreter and waits for it."""
  command, base_env = launch_command(*args, mock_tfds=mock_tfds)
  env = {**base_env, **(env or {})}
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_relaunch_takes_the_compiled_step_from_the_persistent_cache(tmp_path):
  """launch.py turns JAX's persistent compilation cache on (in ~/.cache/research): the same
  config in a new workdir (or a resume) loads its train and eval steps instead of compiling
  them again; so does one with another learning rate, warm-up and length (the schedule's
  numbers are inputs of the step: they were constants in it, and each such run compiled)."""
  env = {'HOME': str(tmp_path), 'JAX_LOG_COMPILES': '1',  # the default folder, under HOME:
         'JAX_COMPILATION_CACHE_DIR': '',  # (conftest.py sets one for the tests' launches)
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}  # these steps compile in < 1 s
  hits = []
  for run, steps, rate in (('a', 2, 0.1), ('b', 2, 0.1), ('c', 3, 0.05)):
    done = run_launch('--config=experiments/linear_regression.py:cpu',
                      f'--config.total_steps={steps}', f'--config.optimizer.learning_rate={rate}',
                      '--config.optimizer.warmup_steps=1', f'--workdir={tmp_path / run}', env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    hits.append(re.findall(r"Persistent compilation cache hit for '(jit_\w+)'", done.stderr))
  assert hits[0] == [] and {'jit_train_step', 'jit_eval_step'} <= set(hits[1])
  assert 'jit_train_step' in hits[2]
  assert os.listdir(tmp_path / '.cache' / 'research' / 'jax_compilation_cache')


def test_launch_trains_resumes_and_evaluates(tmp_path):
  workdir = str(tmp_path / 'run')
  args = ['--config=experiments/linear_regression.py:cpu', f'--workdir={workdir}',
          '--config.total_steps=40', '--config.log_every_steps=10',
          '--config.eval_every_steps=20', '--config.checkpoint_every_steps=20']
  cache = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  first = run_launch(*args, env=cache)
  assert first.returncode == 0, first.stderr[-3000:]
  assert os.listdir(tmp_path / 'jax_cache')  # compiled steps kept for the relaunches
  assert 'learned parameters: Dense_0/bias=' in first.stdout
  assert 'starting from scratch' in first.stdout
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert config['total_steps'] == 40 and config['data']['name'] == 'synthetic_linear'
  more = run_launch(*args[:-4], '--config.total_steps=60', '--config.log_every_steps=10',
                    '--config.eval_every_steps=20', '--config.checkpoint_every_steps=20')
  assert more.returncode == 0, more.stderr[-3000:]
  assert 'resuming from step 40' in more.stdout
  assert [r['step'] for r in read_metrics(workdir) if r['split'] == 'eval'] == [20, 40, 60]
  evaluated = run_launch(*args, '--mode=eval')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'eval at step 60' in evaluated.stdout
  # --workdir alone: the run's own config.json, with overrides applied to it.
  partial = run_launch(f'--workdir={workdir}', '--mode=eval', '--config.max_eval_batches=2')
  assert 'eval at step 60 (test): loss' in partial.stdout, partial.stderr[-3000:]
  assert 'num_examples 64\n' in partial.stdout  # 2 batches of 32
  extended = run_launch(f'--workdir={workdir}', '--config.total_steps=80')
  assert 'resuming from step 60' in extended.stdout, extended.stderr[-3000:]
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['total_steps'] == 80
  assert [r['step'] for r in read_metrics(workdir) if r['split'] == 'eval'] == [20, 40, 60, 60,
                                                                              60, 80]


def test_launch_with_tfds_and_a_config_argument(tmp_path):
  result = run_launch('--config=experiments/mnist_cnn.py:cpu', f'--workdir={tmp_path}',
                      '--config.total_steps=4', '--config.batch_size=8',
                      '--config.optimizer.learning_rate=0.01', mock_tfds=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval at step 4' in result.stdout
  assert json.loads((tmp_path / 'config.json').read_text())['optimizer']['learning_rate'] == 0.01


def test_launch_rejects_an_unknown_override(tmp_path):
  result = run_launch('--config=experiments/mnist_cnn.py:cpu', f'--workdir={tmp_path}',
                      '--config.optimizer.learning_rte=0.1')
  assert result.returncode != 0
  assert 'learning_rte' in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')
  # A key of another model (the CNN has no dropout_rate): named, no traceback.
  result = run_launch('--config=experiments/mnist_cnn.py:cpu', f'--workdir={tmp_path}',
                      '--config.model.dropout_rate=0.1')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert ('a --config override names a key the experiment does not have: '
          'config.model.dropout_rate.' in result.stderr)
  # A shortened name gets its closest key too (ml_collections' own hint missed this one).
  result = run_launch('--config=experiments/mnist_mlp.py:cpu', f'--workdir={tmp_path}',
                      '--config.model.dropout', '0.1')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert ('does not have: config.model.dropout (did you mean config.model.dropout_rate?)'
          in result.stderr)
  # Named where the path stops resolving; a valid override beside it is not blamed.
  result = run_launch('--config=experiments/mnist_mlp.py:cpu', f'--workdir={tmp_path}',
                      '--config.seed=1', '--config.modle.seed=2')
  assert 'does not have: config.modle (did you mean config.model?)' in result.stderr
  # An indexed override of a list field is valid: not the one blamed.
  (tmp_path / 'listed.py').write_text(
      'from research import config as config_lib\n'
      'def get_config(arg=None):\n'
      "  return config_lib.defaults('mlp', hidden_sizes=(8, 8))\n")
  result = run_launch(f'--config={tmp_path}/listed.py', f'--workdir={tmp_path}/run',
                      '--config.model.hidden_sizes[0]=3', '--config.model.dropout=0.1')
  assert 'does not have: config.model.dropout (did you mean config.model.dropout_rate?)' in (
      result.stderr)


def test_launch_usage_mistakes_are_one_line(tmp_path):
  """A missing experiment file was a 43-line chained traceback; usage errors printed the usage
  text (about 40 lines) before the message."""
  cases = [(['--config=experiments/mnist_cn.py:cpu'],
            "no such file 'experiments/mnist_cn.py' (did you mean experiments/mnist_cnn.py?)"),
           (['--config', 'gpt_small.py'],
            "no such file 'gpt_small.py' (did you mean experiments/gpt_small.py?)"),
           ([f'--workdir={tmp_path}', '--mode=eval'], 'config.json'),
           (['--config=experiments/shakespeare_char.py:gpu'],  # was within a traceback
            "shakespeare_char.py:gpu: Unknown experiment argument(s) ['gpu']"),
           ([], 'Pass --config=experiments/X.py'),
           (['--config=experiments/linear_regression.py:cpu', '--workdir='],  # was runs/...
            '--workdir is empty'),
           (['--config=experiments/linear_regression.py:cpu', '--mode=eval',
             f'--workdir={tmp_path}/mistyped'], 'No checkpoint in')]
  for args, message in cases:
    result = run_launch(*args)
    assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
    assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr[-2000:])
  assert not os.path.exists(tmp_path / 'mistyped')  # eval made its checkpoints/ and left it


def test_only_our_own_raise_statements_lose_their_traceback():
  # launch.py (and the benchmark) print our checks' errors as one line; an error of an
  # operation in our code (an unpacking) or raised elsewhere keeps its traceback.
  code = """
import os
from research import cli
def errors(filename):
  namespace = {}
  exec(compile('def check():\\n  raise ValueError(\\"x\\")\\n'
               'def unpack():\\n  a, b = [1, 2, 3]\\n', filename, 'exec'), namespace)
  found = []
  for name in ('check', 'unpack'):
    try:
      namespace[name]()
    except ValueError as e:
      found.append(cli.raised_here(e))
  return found
print(errors(os.path.abspath('research/not_a_file.py')), errors('/elsewhere/lib.py'))
"""
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        check=False, timeout=120)
  assert done.stdout.split() == ['[True,', 'False]', '[False,', 'False]'], done.stderr[-2000:]


@pytest.mark.parametrize('experiment', ['mnist_mlp', 'shakespeare_char'])
def test_a_missing_tfds_dataset_is_only_its_data_error(tmp_path, experiment):
  # TFDS warned "Variant folder ... has no dataset_info.json" twice before the DataError.
  result = run_launch(f'--config=experiments/{experiment}.py:cpu', f'--workdir={tmp_path}/run',
                      f'--config.data.data_dir={tmp_path}/tfds')
  assert result.returncode != 0
  assert result.stderr.startswith('DataError: TFDS dataset'), result.stderr[:2000]
  assert 'Variant folder' not in result.stderr and 'Traceback' not in result.stderr


def test_a_bad_config_value_is_one_line_without_a_traceback(tmp_path):
  result = run_launch('--config=experiments/gpt_small.py:cpu', f'--workdir={tmp_path}',
                      '--config.optimizer.name=adamm')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().endswith(
      "ValueError: config.optimizer.name='adamm': use sgd, adam or adamw."), result.stderr[-2000:]


@pytest.mark.parametrize('mode', ['eval', 'sample'])
def test_eval_and_sample_need_the_workdir_of_a_run(tmp_path, mode):
  # Run from an empty folder, where a default workdir (runs/...) would appear.
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'),
       f'--config={os.path.join(ROOT, "experiments", "linear_regression.py")}:cpu',
       f'--mode={mode}'], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 1
  assert f'--mode={mode} needs the --workdir of a trained run' in result.stderr
  assert not os.listdir(tmp_path)  # no new run folder left behind


@pytest.mark.parametrize('mode, flag', [('train', '--seed=3'), ('eval', '--temperature=0.5'),
                                        ('train', '--prompt=def '), ('eval', '--top_p=0.9')])
def test_launch_rejects_sample_flags_outside_sample_mode(tmp_path, mode, flag):
  result = run_launch('--config=experiments/linear_regression.py:cpu', f'--workdir={tmp_path}',
                      f'--mode={mode}', flag)
  assert result.returncode == 1
  name = flag.split('=')[0]
  assert f'{name} is only used with --mode=sample, not --mode={mode}' in result.stderr
  assert 'Traceback' not in result.stderr and not os.listdir(tmp_path)  # nothing was run


def test_launch_explains_a_dataset_it_cannot_download(tmp_path):
  """Offline, the default (download=True) fails fast with instructions, no traceback."""
  if image._network_reachable():  # pylint: disable=protected-access
    pytest.skip('this machine has network: the test would download cifar10')
  result = run_launch('--config=experiments/cifar10_lenet.py:cpu', f'--workdir={tmp_path}/run',
                      f'--config.data.data_dir={tmp_path}/tfds')
  assert result.returncode == 1
  assert "DataError: TFDS dataset 'cifar10' is not prepared" in result.stderr
  assert 'tfds build cifar10' in result.stderr and str(tmp_path / 'tfds') in result.stderr
  assert 'Traceback' not in result.stderr


def test_throughput_counts_the_steps_finished_since_the_last_write(monkeypatch):
  """Windows are written one step late: when a window's metrics arrive its steps have finished
  and the next one is running. Seconds per step are the time since the last write over the
  steps finished since (counting steps as dispatched gave the first window of a run logging
  every step 5x its real speed). A window written with no step finished since the last (one
  ending at an eval or checkpoint, written at once; a 1-step run) repeats the last figure
  instead of dividing ~0 s (which logged 25M tokens/s)."""
  now = [100.0]
  monkeypatch.setattr(train.time, 'time', lambda: now[0])
  clock = train._Clock()  # pylint: disable=protected-access
  now[0] += 30.0  # the first step, compilation included
  assert clock.first_step_done(1) == 30.0
  assert clock.seconds_per_step(1) == 30.0  # the first step's own window: that step
  now[0] += 0.5  # step 2 runs; the window of steps 1-2 arrives when it has finished
  assert clock.seconds_per_step(2) == 0.5
  now[0] += 1.5  # steps 3-5
  assert clock.seconds_per_step(5) == 0.5
  now[0] += 0.001  # the final window, written at once
  assert clock.seconds_per_step(5) == 0.5
  now[0] += 7.0  # an evaluation, then a step
  clock.mark(5)
  now[0] += 0.25
  assert clock.seconds_per_step(6) == 0.25


def test_logged_throughput_is_level_from_the_first_window(tmp_path):
  """End to end: logging every step, the first windows' examples/s are those of the rest."""
  workdir = str(tmp_path / 'run')
  config = cpu_config('gpt_small', total_steps=10, eval_every_steps=10, checkpoint_every_steps=10,
                      max_eval_batches=1, **{'model.n_layer': 1, 'sample.max_new_tokens': 0,
                                             'data.max_bytes': 300_000})
  train.train_and_evaluate(config, workdir)
  speeds = [r['examples_per_sec'] for r in read_metrics(workdir) if r['split'] == 'train']
  typical = np.median(speeds[1:])
  # The first window is the first step, compilation included: slower, never faster.
  assert speeds[0] < typical and max(speeds) < 3 * typical, speeds


def test_logged_throughput_is_level_when_dispatch_waits(tmp_path):
  """launch.py runs one-device CPU steps on the calling thread (research/hostmem.py): the step
  after a window has finished too when the window is written. Not counting it made the first
  window of k steps read (k-1)/k of the speed, and a last 1-step window, written at once, 1000x
  (MFU 1014%). In a fresh process, as launch.py sets it up, on a clock that advances one second
  per finished step (dispatch waits for each step, asserted): a wall clock made this test fail
  at random when the machine was busy (a window 1.41x the median)."""
  code = f'''
from research import hostmem
hostmem.keep_freed_memory()
import time, types
import jax
from tests.test_train import cpu_config
from research import train
assert not jax.config.read('jax_cpu_enable_async_dispatch')
from tests.test_train import after_each_train_step
finished = [0]  # steps run: a step returns once it has run (dispatch waits)
train.time = types.SimpleNamespace(time=lambda: float(finished[0]), perf_counter=time.perf_counter)
after_each_train_step(lambda n: finished.__setitem__(0, n))
config = cpu_config('gpt_small', total_steps=9, log_every_steps=2, eval_every_steps=9,
                    checkpoint_every_steps=9, max_eval_batches=1,
                    **{{'model.n_layer': 1, 'sample.max_new_tokens': 0, 'data.max_bytes': 300_000,
                       'parallel.num_devices': 1}})
train.train_and_evaluate(config, {str(tmp_path)!r})
assert finished[0] == 9, finished
'''
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  speeds = [r['examples_per_sec'] for r in read_metrics(tmp_path) if r['split'] == 'train']
  # Steps 2, 4, 6, 8 and the last one alone, each 16 examples in one (fake) second.
  assert speeds == [16.0] * 5, speeds


def test_metrics_are_written_without_waiting_for_the_step_in_flight(tmp_path):
  """The last window's metrics are fetched while the next step runs: writing them must not
  queue work behind that step (jnp.stack of the window, or evaluating the learning-rate
  schedule with JAX, did, and so waited for it). The step in flight here is seconds of
  matmuls; the write, which takes milliseconds, must return before they are done."""
  import types  # pylint: disable=g-import-not-at-top
  from research import writer as writer_lib  # pylint: disable=g-import-not-at-top
  window = [{'loss': jax.numpy.float32(i), 'grad_norm': jax.numpy.float32(2 * i)}
            for i in range(3)]
  config = cpu_config('mnist_mlp', total_steps=10)
  schedule = optax.cosine_decay_schedule(1.0, 10)
  learning_rates = train._LearningRates(schedule)  # pylint: disable=protected-access
  exp = types.SimpleNamespace(config=config, learning_rates=learning_rates,
                              flops_per_token=0.0, ckpt=None)
  writer = writer_lib.MetricWriter(str(tmp_path))
  clock = train._Clock()  # pylint: disable=protected-access
  slow = jax.jit(lambda x: jax.lax.fori_loop(0, 400, lambda i, y: jax.numpy.tanh(y @ x), x))
  x = jax.numpy.eye(1024) * 0.5
  slow = slow.lower(x).compile()
  jax.block_until_ready(window)  # the window's metrics computed
  in_flight = slow(x)
  train._write_train(exp, writer, 3, window, clock)  # pylint: disable=protected-access
  assert not in_flight.is_ready()  # the write returned while the "step" was still running
  jax.block_until_ready(in_flight)
  writer.close()
  (record,) = read_metrics(tmp_path)
  assert record['loss'] == 1.0 and record['grad_norm'] == 2.0
  assert record['learning_rate'] == pytest.approx(float(schedule(2)))  # of the window's last step


def test_the_loop_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
  """Saves are asynchronous: step 2's checkpoint is held unfinished (one more commit future of
  Orbax's, waiting for an event) until the loop has run step 4. A loop that waited for
  the save would not get there: the hold gives up after 60 s and the test fails."""
  import threading  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  released, outcome = threading.Event(), []

  class Held:  # what Orbax's background thread waits on before it finalises the checkpoint
    def result(self, timeout=None):  # pylint: disable=unused-argument
      outcome.append(released.wait(60))

  original = ocp.StandardCheckpointHandler.async_save
  async def async_save(self, *args, **kwargs):  # holds the saves made before the release
    futures = list(await original(self, *args, **kwargs) or [])
    return futures if released.is_set() else futures + [Held()]
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', async_save)

  pending_at_step_4 = []
  def after_step(n):
    if n == 4:  # step 2's checkpoint still unfinished: only Orbax's temporary folder
      pending_at_step_4.append(sorted(os.listdir(tmp_path / 'checkpoints')))
      released.set()
  after_each_train_step(after_step, monkeypatch.setattr)
  config = cpu_config('linear_regression', total_steps=6, checkpoint_every_steps=2,
                      eval_every_steps=6)
  train.train_and_evaluate(config, str(tmp_path))
  assert outcome == [True]  # released by the loop's step 4, not by the 60 s
  assert pending_at_step_4 and '2' not in pending_at_step_4[0], pending_at_step_4
  assert checkpoint.manager(str(tmp_path), 3, 2).all_steps() == [2, 4, 6]


def _setup_mnist_mlp(tmp_path, **overrides):
  """train.setup of a tiny MLP on mocked MNIST, its initial state and its first train batch."""
  config = cpu_config('mnist_mlp', **{'model.hidden_sizes': (16,), 'model.dropout_rate': 0.0,
                                      **overrides})
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    exp = train.setup(config, str(tmp_path))
    state, _ = train.restore_or_init(exp)
    batch = next(exp.data.train_batches(0))
  return exp, state, batch


@pytest.mark.parametrize('grad_accum_steps', [1, 2])
def test_config_label_smoothing_reaches_the_compiled_train_step(tmp_path, grad_accum_steps):
  """Catches train.setup not passing config.label_smoothing to steps.make_steps (the step
  then trains on the plain cross-entropy; cifar10_resnet sets 0.1): the first step's loss is
  the smoothed cross-entropy of the initial logits, computed here with numpy."""
  exp, state, batch = _setup_mnist_mlp(tmp_path, label_smoothing=0.1,
                                       grad_accum_steps=grad_accum_steps)
  params = jax.device_get(exp.compiled.get_state(state).params)
  inputs = image.make_preprocess(exp.config.data)(jax.numpy.asarray(batch['inputs']), None,
                                                  train=False)
  logits = np.asarray(exp.model.apply({'params': params}, inputs, train=False), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labels = np.asarray(batch['targets'])
  nll = -log_probs[np.arange(len(labels)), labels]
  smoothed = 0.9 * nll - 0.1 * log_probs.mean(-1)  # 0.1 spread over the 10 classes
  assert abs(smoothed.mean() - nll.mean()) > 1e-3  # the two losses are told apart
  _, metrics = exp.compiled.train_step(state, exp.compiled.put_batch(batch), exp.rng,
                                        exp.schedule_inputs)
  np.testing.assert_allclose(float(metrics['loss']), smoothed.mean(), rtol=1e-5)


@pytest.mark.parametrize('grad_accum_steps', [1, 2, 4])
def test_config_grad_accum_steps_reaches_the_compiled_train_step(tmp_path, grad_accum_steps):
  """Catches train.setup not passing config.grad_accum_steps to steps.make_steps (the whole
  batch then runs at once: the memory the setting exists to save is not saved, silently).
  Accumulation is a loop over micro-batches of batch_size / grad_accum_steps rows in the
  compiled step; without it there is no loop and the rows are never split."""
  exp, state, batch = _setup_mnist_mlp(tmp_path, grad_accum_steps=grad_accum_steps,
                                       batch_size=32)
  hlo = exp.compiled.train_step.lower(state, exp.compiled.put_batch(batch), exp.rng,
                                      exp.schedule_inputs).as_text()
  assert ('stablehlo.while' in hlo) == (grad_accum_steps > 1)
  micro = f'tensor<{grad_accum_steps}x{32 // grad_accum_steps}x28x28x1x'
  assert (micro in hlo) == (grad_accum_steps > 1), micro


def test_max_eval_batches_evaluates_exactly_that_many_batches(tmp_path):
  """Catches an off-by-one in evaluate_state's cap (`i > max_eval_batches` evaluated one batch
  more): max_eval_batches=N is N batches of eval_batch_size examples; 0 is the whole split."""
  config = cpu_config('linear_regression', eval_batch_size=8)
  exp = train.setup(config, str(tmp_path))
  state, _ = train.restore_or_init(exp)
  counted = {}
  for cap in (0, 1, 2):
    exp.config.max_eval_batches = cap
    counted[cap] = train.evaluate_state(exp, state)[0]['num_examples']
  assert counted == {0: 1000, 1: 8, 2: 16}


def test_launch_compile_mode_gives_the_step_s_memory_and_flops_without_a_run(tmp_path):
  """--mode=compile on the configured mesh (here fsdp over the 2 devices of run_launch, pmap,
  one of the two devices): the memory per device (the sum of XLA's figures, against the
  device's share of the RAM), whether it fits, and the FLOPs; no run is left behind."""
  small = ['--config=experiments/gpt_small.py:cpu', '--config.model.n_layer=1',
           '--config.data.max_bytes=100000']
  # GPT-2 small's width, one layer, byte vocabulary, a batch of 4096 x 1024 at once: 439 GB of
  # temporaries per device, more than a host's RAM.
  huge = ['--config=experiments/gpt_small.py', '--config.model.n_layer=1',
          '--config.data.tokenizer=byte', '--config.data.vocab_size=0',
          '--config.data.max_bytes=3000000', '--config.grad_accum_steps=1',
          '--config.batch_size=4096']
  fsdp = ['--config.parallel.mesh.data=1', '--config.parallel.mesh.fsdp=2']
  one = ['--config.parallel.num_devices=1', '--config.parallel.cpu_batch_parts=1']
  ram, params = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), set()
  scale = {'GB': 1e9, 'MB': 1e6, 'kB': 1e3, 'bytes': 1}
  size = r'([\d.e+]+) (GB|MB|kB|bytes)'
  for name, args, devices, mesh in (
      ('fsdp', small + fsdp, 2, 'data=1 fsdp=2'), ('pmap', small + ['--config.parallel.mode=pmap'],
                                                  2, 'data=2 fsdp=1'),
      ('one', small + one, 1, 'data=1 fsdp=1'), ('huge', huge, 2, 'data=2 fsdp=1')):
    workdir = tmp_path / name
    done = run_launch(*args, '--mode=compile', f'--workdir={workdir}')
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith('Train step compiled') and (
        f' {devices} cpu device{"s" * (devices > 1)} ({mesh} ') in lines[0], lines[0]
    if name != 'huge':  # the model's, not pmap's copies of it
      params.add(re.search(r'([\d,]+) parameters', lines[0])[1])
    figures = re.search(rf'arguments {size}, outputs {size} \({size} of them in the arguments\' '
                        rf'donated buffers\), temporaries {size}: at least {size} in all, of '
                        rf'{size}', lines[1])
    args_, outs, alias, temps, peak, limit = (float(figures[i]) * scale[figures[i + 1]]
                                              for i in range(1, 13, 2))
    assert peak == pytest.approx(args_ + outs - alias + temps, rel=0.01, abs=2e3)
    assert alias > 0.5 * args_  # the state (most of the arguments) updated in place
    assert limit == pytest.approx(ram / devices, rel=0.01)  # simulated devices share the RAM
    fits = name != 'huge'
    assert (peak <= limit) == fits and ('It does not fit' in done.stdout) == (not fits)
    assert ('It fits, with ' in done.stdout) == fits
    assert re.search(r'FLOPs: [\d.e+]+ in one device.*the whole step as MFU counts it: '
                     r'[\d.e+]+\.', done.stdout)
    assert not workdir.exists()
  assert params == {'264,064'}
