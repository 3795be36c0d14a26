"""Several processes for real: launch.py twice on this machine, 4 CPU devices each, JAX's CPU
collectives (gloo) and the coordinator on 127.0.0.1. Each process reads only its share of every
global batch; process 0 alone writes the logs; checkpoints are written by both together.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import jax
import numpy as np

from tests.conftest import ROOT, xla_flags
from tests.test_train import cpu_config, final_params, launch_command, read_metrics, run_launch

ARGS = ['--config=experiments/mnist_mlp.py:cpu', '--config.batch_size=16',
        '--config.model.dropout_rate=0.0', '--config.log_every_steps=1']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_processes(*args, count=2, devices=4, own_args=None, own_env=None, cwd=ROOT):
  """Starts launch.py in `count` processes (`own_args[i]`, `own_env[i]`: process i's extra
  arguments and environment); stderr goes to files (a full pipe could block)."""
  port, procs = free_port(), []
  for i in range(count):
    command, env = launch_command(*args, *(own_args[i] if own_args else ()),
                                  f'--coordinator_address=127.0.0.1:{port}',
                                  f'--num_processes={count}', f'--process_id={i}',
                                  mock_tfds=True)
    env['XLA_FLAGS'] = xla_flags(devices)
    env.update(own_env[i] if own_env else {})
    procs.append(popen(command, env, cwd))
  return procs


def popen(command, env, cwd=ROOT):
  errors = tempfile.TemporaryFile(mode='w+')
  proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors,
                          text=True)
  proc.stderr_file = errors
  return proc


# The words of Gloo's connection line ('[Gloo] Rank 0 is connected to 7 peer ranks. Expected
# number of connected peer ranks is : 7'), which its C++ threads print piece by piece.
GLOO_WORDS = ('[Gloo]', 'Rank', 'is connected to', 'peer ranks.',
              'Expected number of connected peer ranks is :')


def ours(out: str) -> str:
  """A process's own stdout: without Gloo's lines or blank lines. Several threads print those
  lines at once, in pieces that run together (CI saw a stray '\\n', then a line's second half
  alone), so a line that is nothing but Gloo's words and numbers is Gloo's. (Ours are printed
  whole, between them.)"""
  def is_gloo(line):
    for words in GLOO_WORDS:
      line = line.replace(words, '')
    return not line.strip(' \n0123456789')
  return ''.join(line for line in out.splitlines(True) if not is_gloo(line))


def wait_all(procs):
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p in procs:
    p.stderr_file.seek(0)
    assert p.returncode == 0, p.stderr_file.read()[-3000:]
  return outs


def all_fail(procs, timeout=120) -> list[str]:
  """Waits for processes that must all fail, each in one line of ours (no traceback); kills
  them all if one outlives `timeout` (a hang); returns their stderr."""
  errors = []
  for p in procs:
    try:
      p.communicate(timeout=timeout)
    finally:
      if p.returncode is None:
        for q in procs:
          q.kill()
    p.stderr_file.seek(0)
    errors.append(p.stderr_file.read())
    assert p.returncode != 0 and 'Traceback' not in errors[-1], errors[-1][-2000:]
  return errors


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
  assert 'parameters; 1 device (' in one_1.stdout  # the run's, not the 8 there are
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


def test_a_process_killed_outright_stops_the_others_and_the_run_resumes(tmp_path):
  """kill -9 gives process 1 no chance to say anything: process 0 learns of it from JAX's
  missed heartbeats (--heartbeat_timeout; with the default 100 s it aborted after 77-90 s),
  then both relaunched resume from the newest complete checkpoint."""
  workdir = str(tmp_path / 'run')
  procs = start_processes(*ARGS, '--config.total_steps=2000', '--config.eval_every_steps=2000',
                          '--config.checkpoint_every_steps=10', '--heartbeat_timeout=10',
                          f'--workdir={workdir}')
  try:
    for line in procs[0].stdout:
      if line.startswith('step 25/'):
        procs[1].kill()
        killed = time.monotonic()
        break
    else:
      raise AssertionError('process 0 ended before step 25')
    procs[0].communicate(timeout=120)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
      p.wait()
  procs[0].stderr_file.seek(0)
  errors = procs[0].stderr_file.read()
  assert procs[0].returncode != 0 and 'stopped sending heartbeats' in errors, errors[-2000:]
  assert waited < 60, waited  # the flag's 10 s, not JAX's default 100 s
  from research import checkpoint  # pylint: disable=g-import-not-at-top
  saved = checkpoint.manager(workdir, 3, 10).all_steps()
  assert saved and 10 <= max(saved) <= 2000, saved
  end = max(saved) + 3
  outs = wait_all(start_processes(*ARGS, f'--config.total_steps={end}', f'--workdir={workdir}'))
  assert f'resuming from step {max(saved)}' in outs[0] and f'step {end}/{end}' in outs[0]


def test_a_mesh_that_splits_no_rows_over_processes_is_refused(tmp_path):
  # data=1: every device would hold the whole batch, but each process loads only its half.
  for errors in all_fail(start_processes(*ARGS, '--config.parallel.mesh.data=1',
                                         '--config.parallel.mesh.tensor=-1',
                                         f'--workdir={tmp_path / "run"}'), timeout=300):
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


def test_distributed_finds_a_slurm_job_s_processes(tmp_path):
  """--distributed with SLURM's variables (as srun sets them; the coordinator on the first
  node, at a port JAX derives from the job id) and no coordinator flags: the two processes
  find each other and train over their 8 devices as one run."""
  while True:  # a free port in the range JAX takes a SLURM job's from: 61440 + job id % 4096
    with socket.socket() as s:
      port = 61440 + int(np.random.randint(4096))
      try:
        s.bind(('127.0.0.1', port))
        break
      except OSError:
        continue
  procs = []
  for i in range(2):
    command, env = launch_command(*ARGS, '--config.total_steps=4', '--distributed',
                                  f'--workdir={tmp_path / "run"}', mock_tfds=True)
    env.update(XLA_FLAGS=xla_flags(4), SLURM_JOB_ID=str(port -
               61440), SLURM_STEP_NODELIST='127.0.0.1', SLURM_NTASKS='2', SLURM_PROCID=str(i),
               SLURM_LOCALID=str(i))
    procs.append(popen(command, env))
  outs = wait_all(procs)
  assert '8 devices' in outs[0] and 'eval at step 4' in outs[0]
  assert ours(outs[1]) == ''


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


def test_a_gpt_sharded_over_two_processes_trains_and_samples_as_one_process(tmp_path):
  """FSDP over the 8 devices of two processes: the same losses and evaluation as one process
  with 8 devices, and as one process resuming their step-2 checkpoint with data=8 instead;
  --mode=sample generates on both and prints from process 0 only."""
  gpt = ['--config=experiments/gpt_small.py:cpu', '--config.model.n_layer=1',
         '--config.data.max_bytes=200000', '--config.total_steps=4', '--config.log_every_steps=1',
         '--config.eval_every_steps=4', '--config.checkpoint_every_steps=2',
         '--config.max_eval_batches=2', '--config.sample.max_new_tokens=0',
         '--config.parallel.mesh.data=1', '--config.parallel.mesh.fsdp=8']
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  wait_all(start_processes(*gpt, f'--workdir={two}'))
  eight = {'XLA_FLAGS': xla_flags(8)}
  single = run_launch(*gpt, f'--workdir={one}', env=eight)
  assert single.returncode == 0, single.stderr[-2000:]
  records = lambda w: [(r['step'], r['split'], r['loss']) for r in read_metrics(w)]
  assert len(records(two)) == 5  # 4 steps and the evaluation
  np.testing.assert_allclose([r[2] for r in records(two)], [r[2] for r in records(one)],
                             rtol=1e-5)
  assert [r[:2] for r in records(two)] == [r[:2] for r in records(one)]
  resumed = str(tmp_path / 'resumed')  # saved sharded by fsdp, restored split by data
  shutil.copytree(two, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  again = run_launch(*gpt, f'--workdir={resumed}', '--config.parallel.mesh.data=8',
                     '--config.parallel.mesh.fsdp=1', env=eight)
  assert again.returncode == 0 and 'resuming from step 2' in again.stdout, again.stderr[-2000:]
  assert [r[:2] for r in records(resumed)] == [r[:2] for r in records(two)]
  np.testing.assert_allclose([r[2] for r in records(resumed)], [r[2] for r in records(two)],
                             rtol=1e-5)
  sample = ['--mode=sample', '--prompt=def ', '--max_new_tokens=24', '--temperature=0']
  outs = wait_all(start_processes(*sample, f'--workdir={two}'))
  alone = run_launch(*sample, f'--workdir={one}', env=eight)
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert ours(outs[0]) == ours(alone.stdout) and len(alone.stdout) > len('def ') + 1
  assert ours(outs[1]) == ''


def test_processes_that_do_not_share_the_workdir_are_told_at_once(tmp_path):
  """Each process its own folder (as each host's own disk would be): Orbax waited 10 minutes
  for the others' files, then failed on one process and left the other hanging."""
  errors = all_fail(start_processes(*ARGS, own_args=[[f'--workdir={tmp_path / "a"}'],
                                                     [f'--workdir={tmp_path / "b"}']]))
  for text in errors:
    assert 'is not one folder shared by the 2 processes: process(es) [1] do not see' in text


def test_a_workdir_one_process_cannot_write_stops_all_of_them(tmp_path):
  """Process 1's workdir unwritable: it said so and exited, and process 0 waited in the next
  collective, then failed with a Gloo timeout that named no workdir."""
  errors = all_fail(start_processes(*ARGS, own_args=[[f'--workdir={tmp_path / "a"}'],
                                                     ['--workdir=/proc/no_such_dir/run']]))
  assert f'The workdir {tmp_path / "a"} is not writable by process(es) [1]' in errors[0]
  assert 'The workdir /proc/no_such_dir/run is not writable' in errors[1]


def test_a_process_that_stops_early_is_named_as_the_cause_by_the_others(tmp_path):
  """Process 1 cannot read its data (a path only its host lacks) and says so; process 0 waited
  30 s at the next collective and printed 50 lines of traceback ending in 'Gloo context
  initialization failed: DEADLINE_EXCEEDED', naming neither process 1 nor a cause."""
  gpt = ['--config=experiments/gpt_small.py:cpu', '--config.total_steps=2',
         '--config.data.max_bytes=100000', f'--workdir={tmp_path / "run"}']
  errors = all_fail(start_processes(*gpt, own_args=[[], ['--config.data.source=/no/such.txt']]))
  assert "config.data.source='/no/such.txt' is not a file" in errors[1]
  assert 'Process 0 of 2 stopped waiting for the others (' in errors[0]
  assert 'another process most likely stopped before this point' in errors[0]


def test_processes_without_a_workdir_share_process_0_s_default(tmp_path):
  """The default runs/NAME-TIME was each host's own clock: processes launched in different
  seconds (here: in different time zones) wrote to different folders and Orbax hung."""
  for name in ('launch.py', 'research', 'experiments'):  # runs/ is made here, not in the repo
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  outs = wait_all(start_processes(*ARGS, '--config.total_steps=2', cwd=tmp_path,
                                  own_env=[{'TZ': 'UTC'}, {'TZ': 'Asia/Tokyo'}]))
  assert 'eval at step 2' in outs[0]
  (run,) = os.listdir(tmp_path / 'runs')
  assert run.startswith('mnist_mlp_cpu-')
  assert len(train_losses(tmp_path / 'runs' / run)) == 2


def test_compile_mode_over_two_processes_reports_once(tmp_path):
  """--mode=compile on the mesh of a multi-host run (fsdp over both processes' 8 devices):
  process 0 prints the memory per device; the FLOPs are one device's, as with one process; the
  workdir it made is gone."""
  gpt = ['--config=experiments/gpt_small.py:cpu', '--config.model.n_layer=1',
         '--config.data.max_bytes=100000', '--config.parallel.mesh.data=1',
         '--config.parallel.mesh.fsdp=8', '--mode=compile']
  outs = wait_all(start_processes(*gpt, f'--workdir={tmp_path / "two"}'))
  ours_ = [ours(out) for out in outs]
  assert ours_[0].startswith('Train step compiled') and '8 cpu devices (data=1 fsdp=8' in ours_[0]
  assert ours_[1] == ''
  assert not (tmp_path / 'two').exists()  # removed by process 0 once both were done
  single = run_launch(*gpt, f'--workdir={tmp_path / "one"}',
                      env={'XLA_FLAGS': xla_flags(8)})
  assert single.returncode == 0, single.stderr[-2000:]
  flops = lambda out: re.search(r'FLOPs: ([\d.e+]+) in one device', out)[1]
  assert flops(ours_[0]) == flops(single.stdout)
