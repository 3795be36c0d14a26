"""Interruption, preemption, damaged checkpoints, bad numbers and bad input.

The kill and preemption tests run the real launch.py in a subprocess and send real signals.
When to interrupt is chosen by step count (the progress line of step 20), never by sleeping.
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from research import checkpoint
from research import config as config_lib
from research import data as data_lib
from research import optim
from research import train
from tests.conftest import ROOT
from tests.test_train import cpu_config, final_params, launch_command, read_metrics, run_launch

STEPS = 150  # the interruption comes at step 20: a margin of seconds on a busy machine


def launch_args(workdir):
  """mnist_mlp with dropout and a cosine schedule: resume must restore rng and schedule."""
  return ['--config=experiments/mnist_mlp.py:cpu', f'--workdir={workdir}',
          f'--config.total_steps={STEPS}', '--config.batch_size=16', '--config.log_every_steps=1',
          f'--config.eval_every_steps={STEPS // 2}', '--config.checkpoint_every_steps=10',
          '--config.optimizer.schedule=warmup_cosine', '--config.optimizer.warmup_steps=5']


def interrupt_at_step_20(workdir, sig):
  """Starts a run, sends `sig` at the first progress line from step 20 on that finds a
  checkpoint finished (saves are asynchronous and the loop does not wait for them, so step 10's
  may still be being written at step 20), waits for it."""
  command, env = launch_command(*launch_args(workdir), mock_tfds=True)
  # SIGINT as a terminal gives it, also where the tests run in a background job (which ignores
  # it, and a child inherits that; a handler is reset to the default in the child instead).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  finally:
    signal.signal(signal.SIGINT, previous)
  checkpoints = os.path.join(workdir, 'checkpoints')
  for line in proc.stdout:
    if (line.startswith('step ') and int(line.split()[1].split('/')[0]) >= 20
        and any(name.isdigit() for name in os.listdir(checkpoints))):  # finished ones only
      proc.send_signal(sig)
      break
  out = proc.stdout.read()
  return proc.wait(timeout=300), out


def last_records(workdir):
  """The last record written for each (step, split), without wall-clock fields."""
  out = {}
  for r in read_metrics(workdir):
    out[r['step'], r['split']] = {k: v for k, v in r.items()
                                  if k not in ('time', 'examples_per_sec')}
  return out


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  result = run_launch(*launch_args(workdir), mock_tfds=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return last_records(workdir)


def test_sigkill_then_relaunch_is_bitwise_identical(tmp_path, uninterrupted):
  workdir = str(tmp_path / 'run')
  code, _ = interrupt_at_step_20(workdir, signal.SIGKILL)
  assert code == -signal.SIGKILL
  saved = checkpoint.manager(workdir, 3, 10).latest_step()
  assert saved is not None and saved < STEPS  # it really was interrupted mid-run
  resumed = run_launch(*launch_args(workdir), mock_tfds=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming from step {saved}' in resumed.stdout
  assert last_records(workdir) == uninterrupted
  # The steps after the checkpoint were logged before the kill and again after it: once now.
  keys = [(r['step'], r['split']) for r in read_metrics(workdir)]
  assert len(keys) == len(set(keys)) == len(uninterrupted)


@pytest.mark.parametrize('sig, label, status', [(signal.SIGTERM, 'SIGTERM', 0),
                                                 (signal.SIGINT, 'Ctrl-C', 130)])
def test_sigterm_and_ctrl_c_save_at_a_step_boundary(tmp_path, uninterrupted, sig, label, status):
  """Preemption exits cleanly; Ctrl-C saves too (it lost the steps since the last checkpoint,
  with a traceback) and exits as interrupted."""
  workdir = str(tmp_path / 'run')
  code, out = interrupt_at_step_20(workdir, sig)
  assert code == status
  stopped = int(out.split(f'{label}: saved step ')[1].split()[0])
  assert 20 <= stopped < STEPS
  assert checkpoint.manager(workdir, 3, 10).latest_step() == stopped
  resumed = run_launch(*launch_args(workdir), mock_tfds=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming from step {stopped}' in resumed.stdout
  assert last_records(workdir) == uninterrupted


def test_preemption_handlers_only_from_the_main_thread():
  """train_and_evaluate in a worker thread (a notebook's background run) must not fail on
  signal.signal; the main thread's handlers are installed and put back."""
  errors = []
  def make():
    try:
      checkpoint.Preemption().close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  import threading  # pylint: disable=g-import-not-at-top
  thread = threading.Thread(target=make)
  thread.start()
  thread.join()
  assert not errors
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  preemption = checkpoint.Preemption()
  assert signal.getsignal(signal.SIGTERM) == preemption._handle  # pylint: disable=protected-access
  preemption.close()
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def small_run(tmp_path, **overrides):
  config = cpu_config('linear_regression', total_steps=30, checkpoint_every_steps=10,
                      eval_every_steps=30, log_every_steps=10, **overrides)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_more_steps_on_a_cosine_schedule_says_the_rate_moves(tmp_path, capsys):
  """A finished cosine run relaunched with more steps goes back up to a higher rate: allowed,
  but said (it was only 'total_steps: 30 -> 60'); a constant schedule moves nothing."""
  schedule = {'optimizer.schedule': 'warmup_cosine', 'optimizer.warmup_steps': 0,
              'optimizer.min_learning_rate': 0.0}
  config, workdir = small_run(tmp_path, **schedule)
  config.total_steps = 60
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  moved = optim.make_schedule(config.optimizer, 60)(30)  # cosine at its middle: half the rate
  assert f'the learning rate at step 30 is now {moved:.3g}, not 0:' in out and moved > 0.02
  constant, constant_dir = small_run(tmp_path / 'constant')
  constant.total_steps = 60
  capsys.readouterr()
  train.train_and_evaluate(constant, constant_dir)
  out = capsys.readouterr().out
  assert 'total_steps: 30 -> 60' in out and 'the learning rate at step' not in out
  constant.total_steps = 10  # fewer than it has trained: said so (was 'finished (60 of 10)')
  train.train_and_evaluate(constant, constant_dir)
  assert 'has trained 60 steps, more than config.total_steps=10' in capsys.readouterr().out


def test_partial_and_damaged_checkpoints_are_never_loaded(tmp_path, capsys):
  config, workdir = small_run(tmp_path)
  ckpts = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpts)) == ['10', '20', '30']
  # An interrupted save: Orbax's temporary folder, never renamed to its step.
  os.makedirs(os.path.join(ckpts, '40.orbax-checkpoint-tmp-1234', 'default'))
  # A damaged complete checkpoint: its array data is gone.
  for folder in ('ocdbt.process_0', 'd'):
    shutil.rmtree(os.path.join(ckpts, '30', 'default', folder))
  step, params = final_params(config, workdir)
  assert step == 20
  assert 'newer checkpoints could not be loaded' in capsys.readouterr().out
  assert np.all(np.isfinite(params['Dense_0']['kernel']))
  # The damaged one was kept, out of the way: a relaunch trains steps 21-30 again, saves step
  # 30 anew (it used to fail there, the damaged step 30 still listed) and evaluates.
  assert os.listdir(os.path.join(workdir, 'checkpoints_damaged')) == ['30']
  result = train.train_and_evaluate(config, workdir)
  assert np.isfinite(result['loss'])
  assert final_params(config, workdir)[0] == 30
  assert 'could not be loaded' not in capsys.readouterr().out


@pytest.mark.parametrize('damage', ['truncated', 'removed'])
def test_a_damaged_checkpoint_is_reported_in_a_few_lines(tmp_path, damage):
  # When one array of a checkpoint fails to load, the other reads in flight fail after Orbax
  # has closed their event loop: each printed a traceback with its TensorStore spec (5,000
  # lines for this model, the warning that matters among them).
  workdir = str(tmp_path / 'run')
  trained = run_launch('--config=experiments/gpt_small.py:cpu', f'--workdir={workdir}',
                       '--config.total_steps=4', '--config.checkpoint_every_steps=2',
                       '--config.eval_every_steps=4', '--config.sample.max_new_tokens=0',
                       '--config.max_eval_batches=1', '--config.data.max_bytes=300000')
  assert trained.returncode == 0, trained.stderr[-3000:]
  default = os.path.join(workdir, 'checkpoints', '4', 'default')
  if damage == 'truncated':  # the metadata reads, the arrays do not
    data = os.path.join(default, 'ocdbt.process_0', 'd')
    for name in os.listdir(data):
      os.truncate(os.path.join(data, name), 0)
  else:  # neither reads
    for folder in ('ocdbt.process_0', 'd'):
      shutil.rmtree(os.path.join(default, folder))
  # Sampling reads the newest checkpoint that loads, moving nothing (it was 600 lines of
  # Orbax's tracebacks, or a TypeError for a checkpoint without its metadata).
  sampled = run_launch(f'--workdir={workdir}', '--mode=sample', '--max_new_tokens=3')
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert 'WARNING: using the checkpoint of step 2: newer ones could not be loaded' in (
      sampled.stderr)
  assert len(sampled.stderr.splitlines()) < 10, sampled.stderr[-3000:]
  assert 'Event loop is closed' not in sampled.stderr and 'TensorStore(' not in sampled.stderr
  result = run_launch(f'--workdir={workdir}', '--mode=eval')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 2: newer checkpoints could not be loaded' in result.stdout
  assert 'Checkpoint' in result.stderr and 'could not be loaded' in result.stderr
  assert len(result.stderr.splitlines()) < 10, result.stderr[-3000:]
  assert 'Event loop is closed' not in result.stderr and 'TensorStore(' not in result.stderr
  os.remove(os.path.join(workdir, 'checkpoints', '2', 'default', '_METADATA'))
  sampled = run_launch(f'--workdir={workdir}', '--mode=sample', '--max_new_tokens=3')
  assert sampled.returncode != 0 and 'Traceback' not in sampled.stderr, sampled.stderr[-3000:]
  assert 'No checkpoint could be loaded: ' in sampled.stderr


class _NoisyRead:
  """A stand-in for a checkpoint manager whose read prints, leaves an object whose finaliser
  raises (as Orbax's abandoned reads do), then succeeds or fails."""

  def __init__(self, fail):
    self.fail = fail

  def restore(self, step, args):
    del step, args
    print('noise from the read', file=sys.stderr)
    type('Abandoned', (), {'__del__': lambda self: 1 / 0})()  # finalised at once: unraisable
    if self.fail:
      raise OSError('damaged')  # (Orbax's says 'Error reading ...', in many lines)
    return 'state'


@pytest.mark.parametrize('fail', [False, True])
def test_a_failed_read_is_quiet_and_a_good_one_passes_its_output_on(fail, capsys, monkeypatch):
  import logging  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  asyncio_log = logging.getLogger('asyncio')
  monkeypatch.setattr(asyncio_log, 'filters', [])  # put back afterwards
  unraisables = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisables.append)
  state, error = checkpoint._try_restore(_NoisyRead(fail), 3, None)  # pylint: disable=protected-access
  assert (state, error) == ((None, 'OSError: damaged') if fail else ('state', None))
  assert ('noise from the read' in capsys.readouterr().err) == (not fail)
  assert len(unraisables) == (0 if fail else 1)
  # After a failed read, its leftovers surfacing later are dropped, and only they.
  leftover = types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'), err_msg=None)
  other = types.SimpleNamespace(exc_value=ZeroDivisionError('x'), err_msg=None)
  before = len(unraisables)
  sys.unraisablehook(leftover)
  sys.unraisablehook(other)
  assert len(unraisables) - before == (1 if fail else 2)
  record = logging.LogRecord('asyncio', logging.ERROR, '', 0, 'Future exception was never '
                             "retrieved\nfuture: <Future exception=ValueError('Error reading "
                             '"params.wte.embedding/0.0" in OCDBT database\')>', None, None)
  # bool(): Python 3.12's Logger.filter returns the record itself where it passes.
  assert bool(asyncio_log.filter(record)) == (not fail)


def test_a_model_change_is_explained_even_when_the_newest_checkpoint_is_damaged(tmp_path):
  _, workdir = small_run(tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '30', 'default'))
  wider = cpu_config('linear_regression', total_steps=30)
  wider.model.hidden_sizes = (8,)
  with pytest.raises(ValueError, match=r'checkpoints/20 does not fit this config'):
    train.train_and_evaluate(wider, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20', '30']


def test_incompatible_model_change_is_explained_and_safe_changes_are_logged(tmp_path, capsys):
  config, workdir = small_run(tmp_path)
  wider = cpu_config('linear_regression', total_steps=30)
  wider.model.hidden_sizes = (8,)
  with pytest.raises(ValueError, match=r'does not fit this config: params/Dense_0/bias is \(1,\) in the checkpoint but \(8,\) now'):
    train.train_and_evaluate(wider, workdir)
  config.total_steps, config.optimizer.learning_rate = 40, 0.01
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'optimizer.learning_rate: 0.05 -> 0.01' in out and 'total_steps: 30 -> 40' in out
  assert 'resuming from step 30' in out


def test_a_run_stopped_before_its_final_evaluation_evaluates_when_relaunched(tmp_path):
  # As when SIGTERM arrives during the last step: its checkpoint saved, its evaluation not run.
  config, workdir = small_run(tmp_path)
  path = os.path.join(workdir, 'metrics.jsonl')
  records = read_metrics(workdir)
  (final,) = [r for r in records if r['split'] == 'eval']
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in records if r['split'] != 'eval')
  result = train.train_and_evaluate(config, workdir)
  assert result['loss'] == pytest.approx(final['loss'])
  assert [r['step'] for r in read_metrics(workdir) if r['split'] == 'eval'] == [30]
  # Finished and evaluated: nothing runs again (no new eval line), the evaluation is returned.
  assert train.train_and_evaluate(config, workdir) == pytest.approx(result)
  assert [r['step'] for r in read_metrics(workdir) if r['split'] == 'eval'] == [30]


def test_config_json_keeps_the_last_config_that_ran_and_a_damaged_one_is_rewritten(tmp_path,
                                                                                    capsys):
  config, workdir = small_run(tmp_path)
  path = os.path.join(workdir, 'config.json')
  failing = cpu_config('linear_regression', total_steps=40, checkpoint_every_steps=10)
  failing.parallel.cpu_compiler_options = 'xla_no_such_option=1'  # fails at compilation
  with pytest.raises(Exception, match='xla_no_such_option'):
    train.train_and_evaluate(failing, workdir)
  with open(path, encoding='utf-8') as f:
    assert json.load(f)['total_steps'] == 30  # the config that ran, for --mode=eval
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{"total_steps": 3')  # cut short
  config.total_steps = 40
  train.train_and_evaluate(config, workdir)
  assert 'config.json could not be read' in capsys.readouterr().out
  with open(path, encoding='utf-8') as f:
    assert json.load(f)['total_steps'] == 40


def test_a_run_stopped_between_saving_and_evaluating_a_step_evaluates_it_on_resume(tmp_path):
  """A preemption that lands on an evaluation step saves that step and stops before its
  evaluation; the resumed run went on from there, and the evaluation of that step was never
  made (the final one was, by the check for finished runs)."""
  config = cpu_config('linear_regression', total_steps=4, eval_every_steps=2,
                      checkpoint_every_steps=2, log_every_steps=1)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  evals = lambda: [(r['step'], r['loss']) for r in read_metrics(workdir) if r['split'] == 'eval']
  whole = evals()
  assert [step for step, _ in whole] == [2, 4]
  # As if stopped right after saving step 2: no step-4 checkpoint, no step-2 evaluation.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if json.loads(line)['step'] < 2 or (
        json.loads(line)['step'] == 2 and json.loads(line)['split'] == 'train')]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(lines)
  train.train_and_evaluate(config, workdir)
  assert evals() == whole  # the same evaluations, each once


def test_init_from_starts_a_new_run_from_another_runs_parameters(tmp_path):
  _, source = small_run(tmp_path)
  _, trained = final_params(cpu_config('linear_regression'), source)
  config = cpu_config('linear_regression', total_steps=1, init_from=source)
  config.optimizer.learning_rate = 0.0
  workdir = str(tmp_path / 'warm')
  train.train_and_evaluate(config, workdir)
  step, warm = final_params(config, workdir)
  assert step == 1  # a new run (step 0 -> 1), not a resumed one
  jax.tree.map(np.testing.assert_array_equal, warm, trained)


def test_init_from_keeps_the_batchnorm_statistics_the_parameters_were_trained_with(tmp_path):
  """A ResNet started from another run's parameters kept its own fresh running statistics (mean
  0, variance 1): the same weights then evaluated as a different network until the averages
  caught up (a review found one class predicted for every image)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  def resnet(**overrides):
    config = cpu_config('cifar10_resnet', batch_size=16, total_steps=3, eval_every_steps=3,
                        checkpoint_every_steps=3, **overrides)
    config.model.stage_sizes, config.model.width = (1, 1), 8
    return config
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    source = str(tmp_path / 'source')
    train.train_and_evaluate(resnet(), source)
    exp = train.setup(resnet(), source)
    saved = jax.device_get(exp.compiled.get_state(train.restore_or_init(exp)[0]))
    exp = train.setup(resnet(init_from=source), str(tmp_path / 'warm'))
    state, start = train._start(exp, types.SimpleNamespace(log=print))  # pylint: disable=protected-access
    warm = jax.device_get(exp.compiled.get_state(state))
  assert start == 0 and saved.model_state['batch_stats']
  stats = jax.tree.leaves(saved.model_state)
  assert not all(np.all(x == 0) or np.all(x == 1) for x in stats)  # trained, not fresh
  jax.tree.map(np.testing.assert_array_equal, warm.model_state, saved.model_state)
  jax.tree.map(np.testing.assert_array_equal, warm.params, saved.params)


def test_init_from_reads_only_the_parameters_and_names_a_missing_run(tmp_path, monkeypatch):
  _, source = small_run(tmp_path)
  _, trained = final_params(cpu_config('linear_regression'), source)
  targets = []
  restore = checkpoint.ocp.CheckpointManager.restore
  def spy(self, step, args=None, **kwargs):
    targets.append(args.item)
    return restore(self, step, args=args, **kwargs)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'restore', spy)
  loaded = checkpoint.load_params(source)
  params = loaded['params']
  jax.tree.map(np.testing.assert_array_equal, params, trained)
  # Only the parameters are read (and the model's other variables: this one has none), not
  # the optimizer state.
  assert [list(t) for t in targets] == [['params']] and loaded['model_state'] == {}
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  with pytest.raises(FileNotFoundError, match=r'does not exist \(config.init_from='):
    checkpoint.load_params(str(tmp_path / 'nowhere'))
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(FileNotFoundError, match=r'No checkpoint in .* \(config.init_from='):
    checkpoint.load_params(str(tmp_path / 'empty'))


def test_nonfinite_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
  config = cpu_config('linear_regression', total_steps=200, checkpoint_every_steps=10,
                      log_every_steps=20, eval_every_steps=200)
  # Plain SGD above its stability limit: the error grows ~6x a step until it overflows.
  config.optimizer.name, config.optimizer.learning_rate = 'sgd', 10.0
  config.optimizer.momentum = 0.0
  with pytest.raises(FloatingPointError,
                     match=r'non-finite at step \d+ \(loss .*\)\. The last good'):
    train.train_and_evaluate(config, str(tmp_path))
  step, params = final_params(config, str(tmp_path))  # the newest checkpoint is a good one
  assert step is not None and step > 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def overflowing_update(**overrides):
  """Plain SGD at 1e38 on a slope of 100: step 1's loss and gradients are finite, but its
  update overflows the parameters to inf."""
  config = cpu_config('linear_regression', total_steps=5, log_every_steps=1,
                      checkpoint_every_steps=1, eval_every_steps=5, **overrides)
  config.optimizer.name, config.optimizer.learning_rate = 'sgd', 1e38
  config.optimizer.momentum, config.data.slope = 0.0, 100.0
  return config


def test_an_update_that_overflows_the_parameters_is_never_checkpointed(tmp_path):
  config = overflowing_update()
  with pytest.raises(FloatingPointError, match=r'non-finite at step 1 \(loss [0-9.e+]+ and '
                     r'gradient norm [0-9.e+]+, but the update made the parameters non-finite\)'
                     r'\. No checkpoint was saved before it'):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint.manager(str(tmp_path), 3, 1).all_steps() == []


def test_skip_mode_also_skips_an_update_that_overflows_the_parameters(tmp_path):
  config = overflowing_update(nonfinite='skip')
  train.train_and_evaluate(config, str(tmp_path))
  assert [r['skipped'] for r in read_metrics(tmp_path) if r['split'] == 'train'][0] == 1.0
  _, params = final_params(config, str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_skipped_steps_hold_the_learning_rate_schedule_and_the_log_says_so(tmp_path):
  # Every update overflows and is skipped: the optimizer's count, and with it the cosine
  # schedule, stays at its start. The log used to show the schedule decaying with the step.
  config = overflowing_update(nonfinite='skip', **{'optimizer.schedule': 'warmup_cosine',
                                                   'optimizer.warmup_steps': 0,
                                                   'optimizer.min_learning_rate': 0.0})
  train.train_and_evaluate(config, str(tmp_path))
  lines = [r for r in read_metrics(tmp_path) if r['split'] == 'train']
  assert [r['skipped'] for r in lines] == [1.0] * 5
  assert [r['learning_rate'] for r in lines] == pytest.approx([1e38] * 5)
  assert 'updates' not in lines[0]


def test_nonfinite_skip_mode_skips_updates_and_counts_them(tmp_path):
  config = cpu_config('linear_regression', total_steps=20, log_every_steps=20,
                      checkpoint_every_steps=20, eval_every_steps=20, nonfinite='skip')
  config.optimizer.name, config.optimizer.learning_rate = 'sgd', 1e6
  train.train_and_evaluate(config, str(tmp_path))
  line = [r for r in read_metrics(tmp_path) if r['split'] == 'train'][-1]
  assert line['skipped'] > 0
  _, params = final_params(config, str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_unwritable_and_full_workdirs_fail_early(tmp_path, monkeypatch):
  (tmp_path / 'a_file').write_text('not a folder')
  config = cpu_config('linear_regression')
  with pytest.raises(OSError, match='is not writable'):
    train.train_and_evaluate(config, str(tmp_path / 'a_file' / 'run'))
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(1, 1, 10))  # pylint: disable=protected-access
  with pytest.raises(OSError, match='10 B free|0 MiB free'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match=r'config\.model\.n_head must be a positive integer, got 0'):
    train.setup(cpu_config('gpt_small', **{'model.n_head': 0}), str(tmp_path))  # was % by zero
  with pytest.raises(ValueError, match=r'n_embd=128 must be divisible by config\.model\.n_head=3'):
    train.setup(cpu_config('gpt_small', **{'model.n_head': 3}), str(tmp_path))
  with pytest.raises(ValueError, match=r'seq_len=512 is longer than .*block_size=128'):
    train.setup(cpu_config('gpt_small', **{'data.seq_len': 512, 'data.max_bytes': 100000}),
                str(tmp_path))
  with pytest.raises(TypeError):
    cpu_config('mnist_cnn', batch_size='sixteen')
  with pytest.raises(ValueError, match='config.nonfinite'):
    train.setup(cpu_config('mnist_cnn', nonfinite='ignore'), str(tmp_path))
  with pytest.raises(ValueError, match=r'config.loss=mse needs real-valued targets, but '
                     r"'text' has class labels \(or tokens\); use config.loss=cross_entropy"):
    train.setup(cpu_config('gpt_small', loss='mse'), str(tmp_path))
  # Orbax would delete every checkpoint in the workdir with 0; -1 fails deep inside it.
  for keep in (0, -1):
    with pytest.raises(ValueError, match=rf'config.keep_checkpoints must be a positive integer, '
                       rf'got {keep}'):
      train.setup(cpu_config('linear_regression', keep_checkpoints=keep), str(tmp_path))
  # These used to fail only after training (max_eval_batches, eval_batch_size) or silently
  # use 7 of 8 devices (num_devices).
  for key in ('max_eval_batches', 'eval_batch_size', 'parallel.num_devices'):
    with pytest.raises(ValueError, match=rf'config.{key} must be 0 \(.+\) or a '
                       'positive integer, got -1'):
      train.setup(cpu_config('linear_regression', **{key: -1}), str(tmp_path))


def test_missing_experiment_file_is_reported(tmp_path):
  result = run_launch('--config=experiments/no_such_experiment.py', f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert 'no_such_experiment.py' in result.stderr


def test_a_launch_that_fails_before_a_result_leaves_no_new_workdir(tmp_path):
  """A setting refused after the workdir was made (here a missing init_from run, found once the
  writers are open) removed the folder this launch made; one that was there is left. So does a
  run that goes non-finite before its first metric or checkpoint (after config.json)."""
  diverged = tmp_path / 'diverged'
  result = run_launch('--config=experiments/linear_regression.py:cpu',
                      '--config.optimizer.learning_rate=1e30', f'--workdir={diverged}')
  assert result.returncode != 0 and 'No checkpoint was saved before it' in result.stderr
  assert not diverged.exists()
  args = ['--config=experiments/linear_regression.py:cpu',
          f'--config.init_from={tmp_path / "nowhere"}']
  new = tmp_path / 'new'
  result = run_launch(*args, f'--workdir={new}')
  assert result.returncode != 0 and 'nowhere/checkpoints does not exist' in result.stderr
  assert not new.exists()
  there = tmp_path / 'there'
  there.mkdir()
  result = run_launch(*args, f'--workdir={there}')
  assert result.returncode != 0 and 'nowhere/checkpoints does not exist' in result.stderr
  assert (there / 'metrics.jsonl').exists()  # written by the launch, left with its folder


_DEFAULT_WORKDIRS = """
import sys, time
sys.path.insert(0, sys.argv[1])
import launch
launch.FLAGS(['launch.py', '--config=' + sys.argv[1] + '/experiments/linear_regression.py:cpu'])
time.strftime = lambda fmt: '20261128-000705'  # launches in the same second
print(*(launch.default_workdir() for _ in range(3)))
"""


def test_launches_in_the_same_second_get_workdirs_of_their_own(tmp_path):
  """The default runs/NAME-TIME was to the second: a sweep started at once (or a SLURM array)
  trained into one folder. The first launch's name is unchanged; each folder is made at once
  (atomically), so two launches cannot both take one. A launch that then fails at start-up
  leaves no folder behind (a workdir it made, though it existed before the run began)."""
  result = subprocess.run([sys.executable, '-c', _DEFAULT_WORKDIRS, str(ROOT)], cwd=tmp_path,
                          capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  name = 'runs/linear_regression_cpu-20261128-000705'
  assert result.stdout.split() == [name, f'{name}-2', f'{name}-3']
  assert sorted(os.listdir(tmp_path / 'runs')) == [os.path.basename(n) for n in
                                                    (name, f'{name}-2', f'{name}-3')]
  failed = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'),
       f'--config={os.path.join(ROOT, "experiments", "linear_regression.py")}:cpu',
       '--config.optimizer.learning_rate=1e30'], cwd=tmp_path, capture_output=True, text=True,
      check=False, timeout=300)
  assert failed.returncode != 0 and 'No checkpoint was saved before it' in failed.stderr
  assert len(os.listdir(tmp_path / 'runs')) == 3  # its own folder made, then removed


class _FailsWhenWaitedFor:
  """Step outputs whose error shows when they are waited for (asynchronous dispatch, GPUs)."""

  def __init__(self, error):
    self.error = error

  def block_until_ready(self):
    raise jax.errors.JaxRuntimeError(self.error)


@pytest.mark.parametrize('message, remat, when', [
    ('RESOURCE_EXHAUSTED: Out of memory allocating 178258784960 bytes.', False, 'call'),  # CPU
    ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB.', True, 'wait')])
def test_a_first_step_out_of_memory_names_the_settings_that_shrink_it(
    tmp_path, monkeypatch, message, remat, when):
  """XLA's error (the CPU's seen with gpt_small under `ulimit -v`; a GPU's wording, raised when
  the step is waited for) in the first step, as the error of a config. Other runtime errors,
  and one in a later step (the step fitted), pass unchanged."""
  setup = train.setup
  def failing(error, at_step=0):
    def setup_failing(config, workdir):
      exp = setup(config, workdir)
      real, calls = exp.compiled.train_step, []
      def step(state, batch, *args):
        calls.append(1)
        if len(calls) <= at_step:
          return real(state, batch, *args)
        if when == 'call' or at_step:  # later steps are not waited for: raised at once
          raise jax.errors.JaxRuntimeError(error)
        return state, {'loss': _FailsWhenWaitedFor(error)}
      exp.compiled = dataclasses.replace(exp.compiled, train_step=step)
      return exp
    return setup_failing
  name, overrides = ('gpt_small', {'data.max_bytes': 100000}) if remat else (
      'linear_regression', {})
  config = cpu_config(name, batch_size=64, grad_accum_steps=4, **overrides)
  monkeypatch.setattr(train, 'setup', failing(message))
  with pytest.raises(RuntimeError) as raised:
    train.train_and_evaluate(config, str(tmp_path / 'a'))
  text = str(raised.value)
  assert text.startswith(f'The train step does not fit in RAM ({message}).')
  assert 'config.grad_accum_steps=4 runs 16 examples at a time' in text
  assert ('config.model.remat=dots or full' in text) == remat
  assert ('with config.model.scan_layers=True' in text) == remat  # gpt_small is unrolled
  assert 'config.parallel.mesh.fsdp' in text and ":cpu variant" in text
  for error, at_step in (('INTERNAL: something else', 0),
                         ('RESOURCE_EXHAUSTED: too many open streams', 0), (message, 1)):
    monkeypatch.setattr(train, 'setup', failing(error, at_step))
    with pytest.raises(jax.errors.JaxRuntimeError, match=f'^{re.escape(error)}$'):
      train.train_and_evaluate(config, str(tmp_path / f'b{at_step}{len(error)}'))


def test_tokenizer_mismatch_with_the_checkpoint_is_reported(tmp_path):
  config = cpu_config('gpt_small', **{'data.max_bytes': 100000, 'sample.max_new_tokens': 0,
                                      'max_eval_batches': 1})
  train.train_and_evaluate(config, str(tmp_path))
  config.data.tokenizer = 'char'
  with pytest.raises(ValueError, match=r'tokenizer .* differs from the one the checkpoint'):
    train.train_and_evaluate(config, str(tmp_path))


def test_evaluate_with_another_tokenizer_than_the_checkpoint_is_reported(tmp_path):
  """Two corpora with alphabets of the same size: 'char' tokenizers of equal vocabularies (so
  every shape fits) but other token ids; evaluating one's checkpoint on the other is refused."""
  rng = np.random.default_rng(0)
  for name, alphabet in (('a.txt', 'abcd \n'), ('b.txt', 'wxyz \n')):
    (tmp_path / name).write_text(''.join(rng.choice(list(alphabet), 4000)))
  config = cpu_config('gpt_small', **{'data.source': str(tmp_path / 'a.txt'),
                                      'data.tokenizer': 'char', 'data.seq_len': 16,
                                      'sample.max_new_tokens': 0, 'max_eval_batches': 1,
                                      'total_steps': 1, 'eval_every_steps': 1,
                                      'checkpoint_every_steps': 1})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  assert train.evaluate(config, workdir)['num_examples'] > 0  # the same tokenizer: fine
  config.data.source = str(tmp_path / 'b.txt')
  with pytest.raises(ValueError, match=r'tokenizer .* \(char, 7 tokens\) differs from the one '
                                       r'the checkpoint was trained with \(char, 7 tokens'):
    train.evaluate(config, workdir)


def test_a_bucket_workdir_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r'--workdir=gs://bucket/run: .* mount the bucket'):
    checkpoint.check_workdir('gs://bucket/run', state_bytes=1, keep=1)
  assert not os.listdir(tmp_path)  # os.makedirs made ./gs:/bucket/run


def _check_workdir_repeatedly(workdir, times):
  for _ in range(times):
    checkpoint.check_workdir(workdir, state_bytes=1, keep=1)


def test_workdir_check_of_processes_sharing_a_workdir_does_not_collide(tmp_path):
  """The processes of a multi-host run check the same workdir at the same moment (a shared
  probe file made one of them fail, seen in test_multiprocess)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  context = multiprocessing.get_context('fork')
  workers = [context.Process(target=_check_workdir_repeatedly, args=(str(tmp_path), 300))
             for _ in range(4)]
  for w in workers:
    w.start()
  for w in workers:
    w.join(60)
  assert [w.exitcode for w in workers] == [0, 0, 0, 0]
  assert not list(tmp_path.iterdir())  # every probe removed


def test_the_logged_learning_rate_is_the_schedule_at_each_windows_last_step(tmp_path):
  config, workdir = small_run(tmp_path, **{'optimizer.schedule': 'warmup_cosine',
                                           'optimizer.warmup_steps': 5})
  schedule = optim.make_schedule(config_lib.resolve(config).optimizer, 30)
  logged = {r['step']: r['learning_rate'] for r in read_metrics(workdir) if r['split'] == 'train'}
  assert sorted(logged) == [10, 20, 30]
  for step, value in logged.items():
    assert value == pytest.approx(float(schedule(step - 1)), rel=1e-6)
  assert len(set(logged.values())) == 3  # a schedule that moves, not a constant


@pytest.mark.parametrize('keep', [1, 3])
def test_workdir_needs_room_for_keep_plus_one_checkpoints(tmp_path, monkeypatch, keep):
  """Catches the free-space check counting fewer than keep + 1 checkpoints (Orbax writes the
  next one before it deletes the oldest of the `keep` kept): room for exactly `keep` is
  refused, with the message; room for keep + 1 is enough."""
  state_bytes = 3 << 20  # 3 MiB
  free = {}
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: shutil._ntuple_diskusage(1 << 40, 0, free['bytes']))  # pylint: disable=protected-access
  free['bytes'] = keep * state_bytes
  with pytest.raises(OSError, match=rf'has {3 * keep} MiB free but {keep} \+ 1 checkpoints of '
                                    rf'3 MiB need {3 * (keep + 1)} MiB more;'):
    checkpoint.check_workdir(str(tmp_path), state_bytes, keep)
  free['bytes'] = (keep + 1) * state_bytes - 1
  with pytest.raises(OSError, match='lower config.keep_checkpoints'):
    checkpoint.check_workdir(str(tmp_path), state_bytes, keep)
  free['bytes'] = (keep + 1) * state_bytes
  checkpoint.check_workdir(str(tmp_path), state_bytes, keep)  # exactly enough
  # A resumed run's checkpoints are on the disk already: it needs room for the rest of the
  # keep + 1 only (it was refused the whole again, after a preemption), at least for one.
  for step in range(1, keep + 1):
    os.makedirs(tmp_path / 'checkpoints' / str(step))
    free['bytes'] = max(keep + 1 - step, 1) * state_bytes
    checkpoint.check_workdir(str(tmp_path), state_bytes, keep)
    free['bytes'] -= 1
    with pytest.raises(OSError, match=rf'need {3 * max(keep + 1 - step, 1)} MiB more \({step} '
                                      r'already saved here\)'):
      checkpoint.check_workdir(str(tmp_path), state_bytes, keep)
    checkpoint.check_workdir(str(tmp_path), state_bytes, keep, saves=False)  # eval, compile


@pytest.mark.parametrize('keep', [1, 3])
def test_setup_checks_room_for_config_keep_checkpoints_plus_one(tmp_path, monkeypatch, keep):
  """The same through train.setup: config.keep_checkpoints (not another count) + 1 states."""
  config = cpu_config('linear_regression', keep_checkpoints=keep)
  exp = train.setup(config, str(tmp_path / 'probe'))
  size = checkpoint.state_bytes(jax.eval_shape(exp.compiled.init_state, exp.init_rng))
  assert size > 0
  free = {}
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: shutil._ntuple_diskusage(1 << 40, 0, free['bytes']))  # pylint: disable=protected-access
  free['bytes'] = (keep + 1) * size - 1
  with pytest.raises(OSError, match=rf'but {keep} \+ 1 checkpoints of .* lower '
                                    r'config\.keep_checkpoints'):
    train.setup(config, str(tmp_path / 'run'))
  free['bytes'] = (keep + 1) * size
  train.setup(config, str(tmp_path / 'run'))


def test_skipped_steps_are_summed_per_window_and_the_rate_follows_the_updates_made(
    tmp_path, monkeypatch):
  """config.nonfinite=skip with some steps skipped, in windows of several steps. Catches the
  window's skipped steps averaged instead of counted (0.5 for 2 of 4), and the logged
  learning rate taken from the step (or from the window's first step's update count) instead
  of the optimizer's count after the window's last step (that of the last update made).

  The batches of steps 2, 3 and 6 (1-based) hold NaN inputs, so exactly those are skipped."""
  bad = {1, 2, 5}  # 0-based steps
  build = data_lib.build

  def build_with_nans(config, workdir=None):
    data = build(config, workdir)
    clean = data.train_batches

    def train_batches(start):
      for step, batch in enumerate(clean(start), start):
        yield dict(batch, inputs=np.full_like(batch['inputs'], np.nan)) if step in bad else batch
    return dataclasses.replace(data, train_batches=train_batches)
  monkeypatch.setattr(data_lib, 'build', build_with_nans)
  config = cpu_config('linear_regression', total_steps=8, log_every_steps=4,
                      checkpoint_every_steps=8, eval_every_steps=8, nonfinite='skip',
                      **{'optimizer.schedule': 'warmup_cosine', 'optimizer.warmup_steps': 0,
                         'optimizer.min_learning_rate': 0.0})
  train.train_and_evaluate(config, str(tmp_path))
  lines = [r for r in read_metrics(tmp_path) if r['split'] == 'train']
  assert [r['step'] for r in lines] == [4, 8]
  assert [r['skipped'] for r in lines] == [2.0, 1.0]  # steps 2, 3 of 1-4; step 6 of 5-8
  assert all(np.isfinite(r['loss']) for r in lines)  # the mean of the steps that were made
  # Updates made: 2 by step 4, 5 by step 8; the rate logged is that of the last one made.
  schedule = optim.make_schedule(config_lib.resolve(config).optimizer, 8)
  assert [r['learning_rate'] for r in lines] == pytest.approx(
      [float(schedule(1)), float(schedule(4))], rel=1e-6)
  assert len({float(schedule(c)) for c in range(8)}) == 8  # each count its own rate
  step, params = final_params(config, str(tmp_path))
  assert step == 8 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_ctrl_c_during_the_last_evaluation_stops_as_interrupted(tmp_path, monkeypatch, capsys):
  """Ctrl-C while the final evaluation ran said it would stop, then the run went on (samples
  too) and exited 0. A real SIGINT to this process, from inside the evaluation."""
  evaluate = train._evaluate_and_write  # pylint: disable=protected-access
  def interrupted(*args):
    os.kill(os.getpid(), signal.SIGINT)  # handled by the training loop: a flag, no exception
    return evaluate(*args)
  monkeypatch.setattr(train, '_evaluate_and_write', interrupted)
  config = cpu_config('linear_regression', total_steps=4, checkpoint_every_steps=4,
                      eval_every_steps=4)
  # Python's own handler, as in a terminal (a background job, as CI may be, ignores SIGINT).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
  finally:
    signal.signal(signal.SIGINT, previous)
  out = capsys.readouterr().out
  assert 'eval at step 4' in out and 'stopped after its evaluation' in out
  assert checkpoint.manager(str(tmp_path), 3, 4).latest_step() == 4


def test_init_from_a_language_model_keeps_its_tokenizer(tmp_path):
  """Fine-tuning on other text: a 'char' (or 'bpe') tokenizer learnt anew from that text gave
  the old embeddings other characters (the padded vocabulary hid the change in size); the run
  named by init_from lends its own. Another kind, or another model shape, is named."""
  def lm_config(source, **overrides):
    texts = {'a': 'abcdefgh ' * 300, 'b': 'hgf ed ' * 300, 'c': 'abc xyz ' * 300}
    (tmp_path / f'{source}.txt').write_text(texts[source])
    config = cpu_config('gpt_small', total_steps=1, **{
        'data.source': str(tmp_path / f'{source}.txt'), 'data.tokenizer': 'char',
        'data.seq_len': 16, 'model.block_size': 16, 'model.n_layer': 1, 'model.n_embd': 32,
        'model.n_head': 2, 'sample.max_new_tokens': 0, **overrides})
    return config
  train.train_and_evaluate(lm_config('a'), str(tmp_path / 'a'))
  source = str(tmp_path / 'a')
  train.train_and_evaluate(lm_config('b', init_from=source), str(tmp_path / 'b'))
  read = lambda run: (tmp_path / run / 'tokenizer' / 'tokenizer.json').read_text()
  assert read('b') == read('a')  # 9 characters, not the 6 of text b
  # Resumed with the other run gone: its own copy (a tokenizer learnt anew was refused).
  a_tokenizer = read('a')
  shutil.move(source, str(tmp_path / 'a_moved'))
  resumed = lm_config('b', init_from=source)
  resumed.total_steps = 2
  train.train_and_evaluate(resumed, str(tmp_path / 'b'))
  assert read('b') == a_tokenizer
  shutil.move(str(tmp_path / 'a_moved'), source)
  with pytest.raises(ValueError, match=r"trained with tokenizer 'char'; set "
                                       r"config.data.tokenizer='char'"):
    train.train_and_evaluate(lm_config('b', init_from=source, **{'data.tokenizer': 'byte'}),
                             str(tmp_path / 'c'))
  with pytest.raises(ValueError, match=r"params/h_1/attn_proj/bias is absent in the checkpoint "
                                       r"but \(32,\) now"):
    train.train_and_evaluate(lm_config('b', init_from=source, **{'model.n_layer': 2}),
                             str(tmp_path / 'd'))
  with pytest.raises(ValueError, match=r"character 'x' \(U\+0078\) of config.data.source is "
                                       r"not in the char alphabet of config.init_from=.*\(10 "
                                       r"characters\), whose tokenizer this run keeps"):
    train.train_and_evaluate(lm_config('c', init_from=source), str(tmp_path / 'e'))


def test_a_sample_prompt_the_tokenizer_cannot_encode_fails_before_training(tmp_path):
  """A char vocabulary without the experiment's prompt's characters ('ROMEO:' on lowercase
  text) stopped the run at its first evaluation, naming neither config.sample.prompt nor the
  way out."""
  (tmp_path / 'lower.txt').write_text('to be or not to be: that is the question. ' * 100)
  config = cpu_config('shakespeare_char', total_steps=1, **{
      'data.source': str(tmp_path / 'lower.txt'), 'data.seq_len': 16, 'model.block_size': 16,
      'model.n_layer': 1, 'model.n_embd': 32, 'model.n_head': 2})
  assert config.sample.prompt.startswith('ROMEO')
  with pytest.raises(ValueError, match=r"config.sample.prompt='ROMEO.*character 'R'.*"
                                       r'config.sample.max_new_tokens=0') as raised:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert "'bpe'" not in str(raised.value)  # the way out is the prompt, not another tokenizer
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')  # before any training
  config.sample.max_new_tokens = 0
  assert train.train_and_evaluate(config, str(tmp_path / 'run'))['loss'] > 0
  # Sampling the trained run: its tokenizer is fixed; the prompt is named, in one line.
  sampled = run_launch(f'--workdir={tmp_path / "run"}', '--mode=sample', '--prompt=ROMEO:')
  assert sampled.returncode != 0 and 'Traceback' not in sampled.stderr
  assert ("Usage error: the prompt 'ROMEO:': character 'R' (U+0052) is not in the char "
          "tokenizer's alphabet") in sampled.stderr and "'bpe'" not in sampled.stderr
