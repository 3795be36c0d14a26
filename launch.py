"""The one entry point.

  python launch.py --config=experiments/mnist_cnn.py
  python launch.py --config=experiments/mnist_cnn.py:cpu --config.optimizer.learning_rate=0.01
  python launch.py --workdir=runs/mine --mode=eval         # the config saved in the workdir
  python launch.py --workdir=runs/mine --config.total_steps=2000   # that run, with more steps
  python launch.py --workdir=runs/gpt --mode=sample --prompt="def " --max_new_tokens=200
  python launch.py --config=experiments/gpt_small.py --mode=compile   # memory, before a run
"""
# First, before JAX creates its CPU client: see research/hostmem.py.
from research import hostmem  # pylint: disable=g-import-not-at-top,g-bad-import-order
hostmem.keep_freed_memory()
import contextlib
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import cli
from research import saved_config

config_flags.DEFINE_config_file('config', None, 'Experiment file: experiments/X.py[:ARG].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs (default: runs/NAME-TIME).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'compile'],
                  'train (resumes if the workdir has checkpoints), eval (the newest checkpoint '
                  'on the eval split), sample (language models: text from --prompt) or compile '
                  "(the train step for the configured devices: its memory per device and FLOPs, "
                  'without running it).')
flags.DEFINE_string('prompt', None, 'sample: the prompt (default: config.sample.prompt).')
flags.DEFINE_integer('max_new_tokens', None, 'sample: tokens to generate.', lower_bound=0)
flags.DEFINE_float('temperature', None, 'sample: 0 is greedy.', lower_bound=0.0)
flags.DEFINE_integer('top_k', None, 'sample: keep the k most likely tokens (0: off).',
                     lower_bound=0)
flags.DEFINE_float('top_p', None, 'sample: nucleus sampling threshold (0: off).',
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer('seed', 0, 'sample: the random seed.')
flags.DEFINE_bool('distributed', False, 'Several processes: jax.distributed.initialize() with '
                  'the cluster auto-detected (Cloud TPU, SLURM). Implied by the flags below.')
flags.DEFINE_string('coordinator_address', None, 'Other clusters: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Other clusters: the number of processes.')
flags.DEFINE_integer('process_id', None, 'Other clusters: this process, 0 .. num_processes-1.')
flags.DEFINE_integer('distributed_timeout', 300, 'Several processes: seconds to wait for all of '
                     'them to join before giving up.', lower_bound=1)
flags.DEFINE_integer('heartbeat_timeout', 100, 'Several processes: seconds without a heartbeat '
                     'from a process (killed, its host lost) before the others abort.',
                     lower_bound=1)
FLAGS = flags.FLAGS


def default_workdir() -> str:
  """runs/NAME-TIME, the time process 0's (several processes must share one workdir), made
  here by process 0, so that launches in the same second (a sweep started at once) do not
  share it: the second gets runs/NAME-TIME-2, and so on."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  path, _, arg = flags.FLAGS['config'].config_filename.partition(':')
  name = os.path.splitext(os.path.basename(path))[0] + (f'_{arg}' if arg else '')
  stamp = time.strftime('%Y%m%d-%H%M%S')
  numbered = lambda n: os.path.join('runs', f'{name}-{stamp}' + (f'-{n}' if n > 1 else ''))
  n = 1
  while jax.process_index() == 0:
    try:
      os.makedirs(numbered(n))  # atomic: of two launches, one makes it and the other moves on
      break
    except FileExistsError:
      n += 1
    except OSError:  # e.g. runs/ not writable: said by the workdir check, in one line
      break
  if jax.process_count() > 1:
    stamp = bytes(np.asarray(multihost_utils.broadcast_one_to_all(
        np.frombuffer(stamp.encode(), np.uint8)))).decode()
    n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
  return numbered(n)


def sample(workdir: str):
  """Streams a sample of the newest checkpoint in `workdir` to stdout."""
  import jax  # pylint: disable=g-import-not-at-top
  from research import sample as sample_lib  # pylint: disable=g-import-not-at-top
  model, params, tokenizer, config = sample_lib.load_trained(workdir)
  settings = config.sample
  for name in ('prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p'):
    if FLAGS[name].value is not None:
      settings[name] = FLAGS[name].value
  if not settings.temperature >= 0:  # NaN (the flags' bounds let it through)
    raise app.UsageError(f'--temperature={settings.temperature}: use 0 (greedy) or a positive '
                         'number.')
  if not 0 <= settings.top_p <= 1:
    raise app.UsageError(f'--top_p={settings.top_p}: use a probability in (0, 1] (or 0: off).')
  try:  # a prompt it cannot encode: said before the prompt is printed
    tokenizer.encode(settings.prompt)
  except ValueError as e:
    raise app.UsageError(f'the prompt {settings.prompt!r}: {e}') from None
  # Every process of a multi-process run generates (the same program, the same callback);
  # process 0 prints.
  show = print if jax.process_index() == 0 else lambda *args, **kwargs: None
  show(settings.prompt, end='', flush=True)
  sample_lib.sample_text(model, params, tokenizer, settings, jax.random.key(FLAGS.seed),
                         stream=lambda piece: show(piece, end='', flush=True),
                         context_len=config.data.seq_len)
  show()


def compile_step(config, workdir: str):
  """Prints the train step's memory per device and FLOPs (train.compile_report)."""
  import jax  # pylint: disable=g-import-not-at-top
  from research import train  # pylint: disable=g-import-not-at-top
  r = train.compile_report(config, workdir)
  if jax.process_index():
    return
  gb = lambda n: next(f'{n / scale:.3g} {unit}' for scale, unit in (
      (1e9, 'GB'), (1e6, 'MB'), (1e3, 'kB'), (1, 'bytes')) if n >= scale or scale == 1)
  peak = r['memory_bytes']  # at least: the batches prefetched and the eval step come on top
  mesh = ' '.join(f'{axis}={size}' for axis, size in r['mesh'].items())
  count = r['device_count']
  print(f"Train step compiled (or loaded from the compilation cache) in {r['compile_s']:.1f} "
        f"s for {count} {r['device_kind']} "
        f"device{'s' * (count > 1)} ({mesh}), batch {r['batch_size']}, {r['params']:,} "
        'parameters.')
  print(f"Per device (XLA's memory analysis): arguments {gb(r['argument_bytes'])}, outputs "
        f"{gb(r['output_bytes'])} ({gb(r['alias_bytes'])} of them in the arguments' donated "
        f"buffers), temporaries {gb(r['temp_bytes'])}"
        + (f", code {gb(r['code_bytes'])}" if r['code_bytes'] else '')
        + f": at least {gb(peak)} in all"
        + (f", of {gb(r['device_memory_bytes'])} " + (
            "(a CPU device's share of this host's RAM)." if r['device_kind'] == 'cpu' else
            'on the device.') if r['device_memory_bytes'] else '.'))
  if r['device_memory_bytes'] and peak > r['device_memory_bytes']:
    print(f"It does not fit. {r['ways_to_fit']}")
  elif r['device_memory_bytes']:
    print(f"It fits, with {gb(r['device_memory_bytes'] - peak)} left for what comes on top (the "
          'prefetched batches, the eval step).')
  print(f"FLOPs: {r['flops_per_step']:.3g} in one device's program as XLA counts them (a loop "
        'body, micro-batches or scanned layers, once)'
        + (f"; the whole step as MFU counts it: {r['model_flops_per_step']:.3g}."
           if r['model_flops_per_step'] else '.'))


def initialize_distributed():
  """Joins the other processes of a multi-process run (before any other use of JAX)."""
  several = (FLAGS.distributed or FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1
             or (FLAGS.process_id or 0) > 0)
  if not several:  # --num_processes=1 alone is one process
    return
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu') or FLAGS.coordinator_address:
    # CPU devices of several processes talk through gloo (harmless on accelerators).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # JAX waits silently for the others, then ends the process from C++ ('another task died').
  count = FLAGS.num_processes or "the cluster's"
  print(f'Joining {count} processes'
        + (f' through {FLAGS.coordinator_address}' if FLAGS.coordinator_address else '')
        + (f' as process {FLAGS.process_id}' if FLAGS.process_id is not None else '')
        + f'; waiting up to {FLAGS.distributed_timeout} s for all of them '
        '(--distributed_timeout).', file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                               initialization_timeout=FLAGS.distributed_timeout,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
  except ValueError as e:  # e.g. no cluster detected and no --coordinator_address
    raise app.UsageError(f'Several processes: {e} Outside Cloud TPU and SLURM pass all of '
                         '--coordinator_address=HOST:PORT, --num_processes and --process_id.')


def holds_results(workdir: str) -> bool:
  """Whether `workdir` holds anything a run wrote: a metric, a checkpoint (even a partial one)
  or any other file but an empty metrics.jsonl, TensorBoard's event files (no metric then) and
  what a launch writes after its first step (config.json, the tokenizer: the command line
  makes them again)."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics) and os.path.getsize(metrics):
    return True
  for folder, _, files in os.walk(workdir):
    if folder in (os.path.join(workdir, 'tensorboard'), os.path.join(workdir, 'tokenizer')):
      continue
    if set(files) - ({'metrics.jsonl', 'config.json', 'config.json.tmp'} if folder == workdir
                     else set()):
      return True
  return False


@contextlib.contextmanager
def removed_if_empty(workdir: str, also_after_success: bool = False, created: bool = False):
  """A workdir this launch creates is removed again when the launch fails before writing a
  checkpoint or a metric (a setting refused at start-up leaves no empty run folder behind; one
  process only: the others of a multi-process run may still be writing to it), or after it
  succeeds, if asked (--mode=compile: by process 0 once all are done). `created`: made by this
  launch already (the default workdir)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  together = also_after_success and jax.process_count() > 1
  if together:  # all look before any of them makes it
    multihost_utils.sync_global_devices('removed_if_empty: look')
  created = created or not os.path.exists(workdir)
  if together:
    multihost_utils.sync_global_devices('removed_if_empty: looked')
  def remove_if_empty():
    if created and not holds_results(workdir):
      shutil.rmtree(workdir, ignore_errors=True)
  try:
    yield
  except BaseException as e:
    if jax.process_count() == 1:
      remove_if_empty()
    elif together and not isinstance(e, KeyboardInterrupt):  # (Ctrl-C: os._exit, no sync)
      multihost_utils.sync_global_devices('removed_if_empty: done')  # the others wait there
    raise
  if also_after_success:
    if together:
      multihost_utils.sync_global_devices('removed_if_empty: done')
    if jax.process_index() == 0:
      remove_if_empty()


SAMPLE_FLAGS = ('prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed')


def main(argv):
  try:
    run(argv)
  except app.UsageError as e:  # one line, not the usage text (python launch.py --help)
    sys.exit(f'Usage error: {e} (python launch.py --help lists the flags.)')


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS['workdir'].present and not FLAGS.workdir.strip():  # (an unset shell variable)
    raise app.UsageError('--workdir is empty: name a folder, or leave the flag out for a new '
                         'runs/NAME-TIME.')
  if FLAGS.mode != 'sample':  # they would be silently ignored
    for name in SAMPLE_FLAGS:
      if FLAGS[name].present:
        raise app.UsageError(
            f'--{name} is only used with --mode=sample, not --mode={FLAGS.mode}'
            + (' (the training seed is --config.seed).' if name == 'seed' else '.'))
  if FLAGS.mode in ('eval', 'sample') and not FLAGS.workdir:  # a new folder holds no checkpoint
    raise app.UsageError(f'--mode={FLAGS.mode} needs the --workdir of a trained run.')
  if FLAGS.config is None and FLAGS.mode != 'sample':  # a workdir's config.json stands in
    raise app.UsageError(
        'Pass --config=experiments/X.py' + (
            f', or the --workdir of a run ({os.path.join(FLAGS.workdir, "config.json")} is '
            'missing).' if FLAGS.workdir else ' (or the --workdir of a run to continue it).'))
  initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  # A relaunch (a resume, an eval, a new learning rate or total_steps: the schedule's numbers
  # are inputs of the step) reuses compiled steps from this cache.
  jax.config.update('jax_compilation_cache_dir', os.environ.get('JAX_COMPILATION_CACHE_DIR') or
                    os.path.expanduser('~/.cache/research/jax_compilation_cache'))
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if not FLAGS['verbosity'].present:  # Orbax logs every save at INFO; --verbosity=0 shows it
    logging.set_verbosity(logging.WARNING)
  from research import train  # pylint: disable=g-import-not-at-top  (after flag parsing: fast --help)
  from research.data.image import DataError  # pylint: disable=g-import-not-at-top
  workdir, made = FLAGS.workdir or default_workdir(), not FLAGS.workdir
  try:
    if FLAGS.mode == 'train':
      with removed_if_empty(workdir, created=made):
        train.train_and_evaluate(FLAGS.config, workdir)
    elif FLAGS.mode == 'compile':  # the folder training would use (one all processes share)
      with removed_if_empty(workdir, also_after_success=True, created=made):
        compile_step(FLAGS.config, workdir)
    elif FLAGS.mode == 'eval':  # a mistyped --workdir is not left behind
      with removed_if_empty(workdir):
        train.evaluate(FLAGS.config, workdir)
    else:
      sample(workdir)
  except KeyboardInterrupt:  # Ctrl-C; in training a first one saves and says so
    print('Interrupted.', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # pylint: disable=protected-access  (XLA's teardown can crash mid-compile)
  except DataError as e:  # the message says what to do; a traceback would only hide it
    sys.exit(f'DataError: {e}')
  except jax.errors.JaxRuntimeError as e:
    if not peer_lost(e):
      raise
    # Its traceback shows only where this process waited; the cause is in another's output.
    sys.exit(f'Process {jax.process_index()} of {jax.process_count()} stopped waiting for the '
             f'others ({str(e).splitlines()[0][:300]}): another process most likely stopped '
             "before this point (its own output says why), or it ran on far longer.")
  except cli.OUR_ERRORS as e:
    cli.exit_if_ours(e)
    raise


def peer_lost(error: Exception) -> bool:
  """Whether a JAX runtime error is one process of several timing out on the others (a
  collective or the coordination service waited for a process that is gone or late)."""
  import jax  # pylint: disable=g-import-not-at-top
  text = str(error)
  return jax.process_count() > 1 and 'DEADLINE_EXCEEDED' in text and any(
      marker in text for marker in ('Gloo', 'CoordinationService', 'barrier'))


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: cli.parse_flags(saved_config.with_saved_config(argv)))
