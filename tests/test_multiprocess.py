"""Several processes for real: launch.py twice on this machine, 4 CPU devices each, JAX's CPU
collectives (gloo) and the coordinator on 127.0.0.1. Each process reads only its share of every
global batch; process 0 alone writes the logs; checkpoints are written by both together.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import jax
import numpy as np

from tests.conftest import ROOT
from tests.test_train import cpu_config, final_params, launch_command, read_metrics, run_launch

ARGS = ['--config=experiments/mnist_mlp.py:cpu', '--config.batch_size=16',
        '--config.model.dropout_rate=0.0', '--config.log_every_steps=1']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_processes(*args, count=2, devices=4):
  """Starts launch.py in `count` processes; stderr goes to files (a full pipe could block)."""
  port, procs = free_port(), []
  for i in range(count):
    command, env = launch_command(*args, f'--coordinator_address=127.0.0.1:{port}',
                                  f'--num_processes={count}', f'--process_id={i}',
                                  mock_tfds=True)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    errors = tempfile.TemporaryFile(mode='w+')
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors,
                            text=True)
    proc.stderr_file = errors
    procs.append(proc)
  return procs


def wait_all(procs):
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p in procs:
    p.stderr_file.seek(0)
    assert p.returncode == 0, p.stderr_file.read()[-3000:]
  return outs


def train_losses(workdir):
  return np.array([r['loss'] for r in read_metrics(workdir) if r['split'] == 'train'])


def test_two_processes_match_one_process_with_8_and_with_1_device(tmp_path):
  steps = ['--config.total_steps=6', '--config.eval_every_steps=6',
           '--config.checkpoint_every_steps=3']
  two = str(tmp_path / 'two')
  outs = wait_all(start_processes(*ARGS, *steps, f'--workdir={two}'))
  assert '8 devices' in outs[0] and 'eval at step 6' in outs[0]
  assert not any(l.startswith(('step', 'eval', 'mlp')) for l in outs[1].splitlines())  # only 0 logs
  one_8 = run_launch(*ARGS, *steps, f'--workdir={tmp_path / "one8"}', mock_tfds=True)
  one_1 = run_launch(*ARGS, *steps, f'--workdir={tmp_path / "one1"}',
                     '--config.parallel.num_devices=1', mock_tfds=True)
  assert one_8.returncode == 0 and one_1.returncode == 0, one_8.stderr[-2000:]
  assert len(train_losses(two)) == 6
  np.testing.assert_allclose(train_losses(two), train_losses(tmp_path / 'one8'), rtol=1e-5)
  np.testing.assert_allclose(train_losses(two), train_losses(tmp_path / 'one1'), rtol=1e-5)

  # Saved by two processes, restored by one process on one device: training goes on the same.
  config = cpu_config('mnist_mlp', batch_size=16, total_steps=6, checkpoint_every_steps=3)
  config.model.dropout_rate = 0.0
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(two, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  again = run_launch(*ARGS, *steps, f'--workdir={resumed}', '--config.parallel.num_devices=1',
                     mock_tfds=True)
  assert again.returncode == 0 and 'resuming from step 3' in again.stdout, again.stderr[-2000:]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    _, params_two = final_params(config, two)
    _, params_resumed = final_params(config, resumed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_two, params_resumed)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = str(tmp_path / 'run')
  procs = start_processes(*ARGS, '--config.total_steps=2000', '--config.eval_every_steps=2000',
                          '--config.checkpoint_every_steps=1000', f'--workdir={workdir}')
  for line in procs[0].stdout:
    if line.startswith('step 20/'):
      procs[0].send_signal(signal.SIGTERM)  # process 1 is not signalled
      break
  outs = wait_all(procs)
  stopped = int(outs[0].split('SIGTERM: saved step ')[1].split()[0])
  assert 20 <= stopped < 2000
  from research import checkpoint  # pylint: disable=g-import-not-at-top
  assert checkpoint.manager(workdir, 3, 1000).all_steps() == [stopped]
  # Both relaunched: they agree on the step to resume from (process_allgather) and finish; a
  # third launch finds the run finished and evaluated (process 0's answer, broadcast).
  end = stopped + 40
  short = [f'--config.total_steps={end}', '--config.eval_every_steps=2000']
  outs = wait_all(start_processes(*ARGS, *short, f'--workdir={workdir}'))
  assert f'resuming from step {stopped}' in outs[0] and f'eval at step {end}' in outs[0]
  outs = wait_all(start_processes(*ARGS, *short, f'--workdir={workdir}'))
  assert f'already finished ({end} of {end} steps)' in outs[0] and 'eval at' not in outs[0]


def test_a_mesh_that_splits_no_rows_over_processes_is_refused(tmp_path):
  # data=1: every device would hold the whole batch, but each process loads only its half.
  procs = start_processes(*ARGS, '--config.parallel.mesh.data=1',
                          '--config.parallel.mesh.tensor=-1', f'--workdir={tmp_path / "run"}')
  for p in procs:
    p.communicate(timeout=300)
    p.stderr_file.seek(0)
    errors = p.stderr_file.read()
    assert p.returncode != 0
    assert 'does not give each of the 2 processes its own rows of the batch' in errors, (
        errors[-2000:])
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_process_flags_without_a_coordinator_do_not_train_alone(tmp_path):
  # --num_processes/--process_id imply several processes: outside a cluster JAX can find, the
  # coordinator is missing. Each such process used to train the whole run by itself.
  env = {k: '' for k in os.environ if k.startswith(('SLURM_', 'TPU_', 'CLOUD_TPU'))}
  done = run_launch('--config=experiments/linear_regression.py:cpu', f'--workdir={tmp_path}',
                    '--num_processes=2', '--process_id=1', env=env)
  assert done.returncode != 0
  assert 'coordinator_address should be defined' in done.stderr
  assert '--coordinator_address=HOST:PORT' in done.stderr and 'Traceback' not in done.stderr
  assert not os.listdir(tmp_path)
  # One process said explicitly is just one process.
  done = run_launch('--config=experiments/linear_regression.py:cpu', f'--workdir={tmp_path}',
                    '--num_processes=1', '--config.total_steps=2', env=env)
  assert done.returncode == 0 and 'learned parameters' in done.stdout, done.stderr[-2000:]


def test_a_process_whose_peers_never_join_says_what_it_waits_for(tmp_path):
  """Nobody at the coordinator's address: JAX waited 5 minutes without a word, then ended the
  process from C++ saying another task died. The wait is said first, and --distributed_timeout
  bounds it."""
  result = run_launch('--config=experiments/linear_regression.py:cpu', f'--workdir={tmp_path}',
                      f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2',
                      '--process_id=1', '--distributed_timeout=3')
  assert result.returncode != 0
  assert result.stderr.startswith('Joining 2 processes through 127.0.0.1:'), result.stderr[:2000]
  assert 'as process 1; waiting up to 3 s for all of them (--distributed_timeout)' in (
      result.stderr)
