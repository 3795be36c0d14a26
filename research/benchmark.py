"""Training-step benchmark: `python -m research.benchmark --config=experiments/X.py[:ARG]`.

Builds the experiment exactly as training does (same model, optimizer, shardings and compiled
step), compiles the train step ahead of time, runs --warmup steps, then times --steps steps
one by one (each waited for) on one real batch from the experiment's own pipeline, so the
figures are the device's speed, not the input pipeline's. The last line printed is one JSON
object: tokens_per_sec (language models) or examples_per_sec, step_ms (median), compile_s,
mfu with its denominator peak_flops (the run's devices; peak_flops_estimated: true on CPUs,
whose peak is estimated from the core count, research/metrics.py), peak_memory_bytes with
peak_memory_from ('allocator': the device's measured peak; 'xla_estimate': XLA's analysis of
the step's buffers, on CPUs; 'none' where neither is given), params, batch_size, seq_len,
vocab_size (GPTs), device_kind, device_count (the run's: config.parallel.num_devices), config
and overrides (the command line's --config.KEY=VALUE); on CPUs also cpu_model (Linux's name for
the CPU) and cpu_compiler_options (the config's, 'auto' resolved: research/parallel.py).

--compile_only compiles the step ahead of time for the configured devices and prints its
compile time, memory (per device) and XLA's FLOPs per step instead, before a long run. XLA's
figure is one device's program with a loop body (micro-batches, scanned layers) counted once;
for GPTs model_flops_per_step is the whole step's 6N + 12 L C T per token, as MFU counts.

--against_torch times the PyTorch reference of the same experiment (research/torch_reference.py)
as well: --rounds rounds, each running this benchmark and then the reference in fresh processes
(same config, overrides, --steps and --warmup), so both see the machine in the same minutes.
It prints each round's figures and, last, one JSON object with every round and the median of
the per-round ratios `speedup` (PyTorch's step time / ours: above 1 means ours is faster).
Extra flags for the reference go in --torch_args (e.g. "--device=cuda --compile").

--config_b=experiments/Y.py[:ARG] (with its own --config_b.KEY=VALUE overrides) compares two
variants in one process instead: both steps are compiled, then run alternately, A then B, for
--steps pairs, and the JSON gives both medians and the median of the per-pair ratios
`b_over_a` (B's step time / A's: below 1 means B is faster) with the share of pairs B won,
and each side's parameter count (`a_params`, `b_params`) and, on CPUs, XLA options
(`a_cpu_compiler_options`, `b_cpu_compiler_options`). A machine whose speed drifts moves
both sides of a pair alike, so this resolves differences of 1-2% where separate runs cannot
(BENCHMARKS.md). Both models are in memory at once.

--profile_dir=DIR traces 3 more steps after the timed ones with `jax.profiler` into DIR (open it
with TensorBoard's profile plugin / XProf, or DIR/plugins/profile/*/perfetto_trace.json.gz at
ui.perfetto.dev) and prints, before the JSON, where their time went: the compiled step's
operations grouped by the JAX operation they came from (XLA's `op_name` metadata, with every
numbered name merged: h_0 ... h_11 -> h_*, and also ln_1, ln_2 -> ln_*, Conv_0, Conv_1 ->
Conv_*), milliseconds per step summed over the threads or streams that ran them. On CPUs the
matmuls XLA hands to Eigen (weight gradients) go on running after their trace events end; the
thread's time until its next op is counted as theirs, and other time between ops as one row of
its own (research/profiling.py). On accelerators the device's op events are counted (written
for them, but so far run on CPUs only).

--matmul_floor (GPTs, one device) also times each of the step's matrix products alone, at the
step's shapes and dtype (`transformer.step_matmuls`: the dense layers' forward, input-gradient and
weight-gradient products, the tied head's, and the attention's, per query block where the
attention is 'chunked'; `matmul_floor`), each compiled by itself with the run's XLA options, and
prints them and their sum, `matmul_floor_ms`, beside the step's time: a step about as long as
its products alone has little time left to win outside them (BENCHMARKS.md). The step's own
products can overlap one another and its other work, so it is a yardstick, not a strict bound.

--mock_data replaces the data by random examples of the same shapes and types, so that a model
can be benchmarked on a machine without its data: a step's speed does not depend on the pixels
or the words. TFDS datasets: `tfds.testing.mock_data` (which needs TensorFlow). Language models:
uniformly random tokens of the vocabulary the config fixes (257 for the byte tokenizer, 50,257
for gpt2, config.data.vocab_size for bpe), so no text is read and no tokenizer trained (a
'char' alphabet comes from the text, which is then read as usual; a tfds: source from TFDS's
mock data). Other datasets (mnist_idx, synthetic_linear) are read as usual.
"""
# First, before JAX creates its CPU client: see research/hostmem.py.
from research import hostmem  # pylint: disable=g-import-not-at-top,g-bad-import-order
hostmem.keep_freed_memory()
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from research import cli
from research import metrics as metrics_lib
from research import parallel
from research import profiling
from research import train
from research.data import text
from research.data import tokenizers
from research.data.image import DataError
from research.models import transformer

config_flags.DEFINE_config_file('config', None, 'Experiment file: experiments/X.py[:ARG].',
                                lock_config=True)
config_flags.DEFINE_config_file('config_b', None, 'A second variant to compare with --config '
                                'in this process (see the module docstring).', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed steps (with --config_b: pairs of steps).',
                     lower_bound=1)
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.', lower_bound=0)
flags.DEFINE_bool('compile_only', False, 'Compile the train step ahead of time for the configured '
                  'devices and print its compile time, memory per device and FLOPs per step, '
                  'without allocating the state or running a step.')
flags.DEFINE_bool('against_torch', False, 'Alternate rounds of this benchmark and of the PyTorch '
                  'reference (research/torch_reference.py), each in a fresh process, and print '
                  'their ratio (see the module docstring).')
flags.DEFINE_integer('rounds', 3, 'With --against_torch: how many rounds (ours, then PyTorch).',
                     lower_bound=1)
flags.DEFINE_string('torch_args', '', 'With --against_torch: extra flags for the reference.')
flags.DEFINE_bool('mock_data', False, 'Benchmark without the data: TFDS datasets replaced by '
                  'random examples of the same shapes (tfds.testing.mock_data), a language '
                  "model's text by random tokens of its vocabulary (see the module docstring).")
flags.DEFINE_string('profile_dir', None, 'Trace 3 more steps with jax.profiler into this folder '
                    'and print where their time went (see the module docstring).')
flags.DEFINE_bool('matmul_floor', False, "GPTs: also time each of the step's matrix products "
                  'alone and print their sum beside the step time (see the module docstring).')
flags.mark_flag_as_required('config')
FLAGS = flags.FLAGS
PROFILE_STEPS = 3


def peak_memory_bytes(compiled_step) -> tuple[int | None, str]:
  """(bytes, where from): the device allocator's peak where it reports one (GPU, TPU), else
  XLA's own estimate of the step's buffers (CPUs)."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'allocator'
  analysis = compiled_step.memory_analysis()
  if analysis is None:
    return None, 'none'
  return train.xla_memory_bytes(analysis), 'xla_estimate'


def compile_only(config, name: str = '') -> dict:
  """Ahead-of-time compilation of the train step (train.compile_report): no state allocated."""
  with tempfile.TemporaryDirectory() as workdir:
    return {**train.compile_report(config, workdir), 'config': name}


class _Timed:
  """An experiment's train step compiled ahead of time, stepped on one batch and timed."""

  def __init__(self, config, workdir: str):
    self.exp = train.setup(config, workdir, saves=False)  # a throwaway folder
    self.state, _ = train.restore_or_init(self.exp)
    self.batch = self.exp.compiled.put_batch(next(self.exp.data.train_batches(0)))
    start = time.perf_counter()
    self.args = (self.exp.rng, self.exp.schedule_inputs)
    self.step = self.exp.compiled.train_step.lower(self.state, self.batch, *self.args).compile()
    self.compile_s = time.perf_counter() - start
    self.metrics = None

  def __call__(self) -> float:
    """One step, waited for; its seconds."""
    start = time.perf_counter()
    self.state, self.metrics = self.step(self.state, self.batch, *self.args)
    jax.block_until_ready(self.metrics)
    return time.perf_counter() - start

  def num_params(self) -> int:
    params = self.exp.compiled.get_state(self.state).params
    return sum(int(x.size) for x in jax.tree.leaves(params))

  def check_loss(self):
    if not np.isfinite(float(jax.device_get(self.metrics['loss']))):
      raise FloatingPointError('The benchmarked steps produced a non-finite loss.')


def matmul_floor(exp, step_ms: float, reps: int = 5) -> dict:
  """Each of the step's products (`transformer.step_matmuls`) timed alone on the run's first
  device, at the step's shapes and dtype, compiled with the run's XLA options: the median of
  `reps` calls after two (each call's dispatch, tens of microseconds, included), times how many
  the step has (layers, micro-batches). Where the step computes its batch as independent parts
  (`config.parallel.cpu_batch_parts`), each product is timed as that many part-sized products in
  one program, which XLA runs at once, as in the step. Not listed: cuDNN's fused attention (one
  kernel, not six products) and the forward products that `config.model.remat` recomputes."""
  config, model = exp.config, exp.model
  seq_len = config.data.seq_len
  mesh = parallel.make_mesh(config.parallel)
  parts = parallel.batch_parts(config.parallel, mesh)
  part_tokens = config.batch_size // config.grad_accum_steps // parts * seq_len
  device = parallel.devices(config.parallel.num_devices)[0]
  options = parallel.compiler_options(config.parallel.cpu_compiler_options, mesh)
  attention = model.attention
  if attention == 'auto':
    head_dim = model.n_embd // model.n_head
    attention = transformer.attention_for(jax.ShapeDtypeStruct(
        (1, seq_len, model.n_head, head_dim), jnp.dtype(model.dtype)), None)
  rows, total = [], {'dense': 0.0, 'attention': 0.0}
  for what, spec, lhs, rhs, count in transformer.step_matmuls(
      model, part_tokens, seq_len, chunked=attention == 'chunked'):
    if attention == 'cudnn' and what.startswith('attention'):
      continue
    xs, ys = ([jax.device_put(jnp.full(shape, 1 + i, model.dtype), device) for i in range(parts)]
              for shape in (lhs, rhs))
    product = jax.jit(lambda xs, ys, spec=spec: [jnp.einsum(spec, x, y) for x, y in zip(xs, ys)],
                      compiler_options=options).lower(xs, ys).compile()
    for _ in range(2):
      jax.block_until_ready(product(xs, ys))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(product(xs, ys))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times) * count * config.grad_accum_steps
    flops = transformer.einsum_flops(spec, lhs, rhs) * parts * count * config.grad_accum_steps
    rows.append((what, seconds, flops))
    total['attention' if what.startswith('attention') else 'dense'] += seconds
  at_once = f', {parts} part-sized products at once' if parts > 1 else ''
  print(f"The step's matrix products timed alone (ms per step, GFLOP/s{at_once}):")
  for what, seconds, flops in rows:
    print(f'{1000 * seconds:10.2f} {flops / seconds / 1e9:8.1f}  {what}')
  floor_ms = 1000 * sum(total.values())
  print(f'{floor_ms:10.2f} ms in all, one product after another; the step: {step_ms:.2f} ms'
        + (" (cuDNN's fused attention not listed)" if attention == 'cudnn' else '')
        + (f" (config.model.remat={model.remat!r}: its recomputed products not listed)"
           if model.remat != 'none' else ''))
  return {'matmul_floor_ms': floor_ms,
          'matmul_floor_dense_ms': 1000 * total['dense'],
          'matmul_floor_attention_ms': (None if attention == 'cudnn'
                                        else 1000 * total['attention']),
          'matmul_floor_flops': sum(flops for _, _, flops in rows)}


def run(config, steps: int, warmup: int, name: str = '', profile_dir: str | None = None,
        floor: bool = False) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    timed = _Timed(config, workdir)
    config = timed.exp.config
    for _ in range(warmup):
      timed()
    times = [timed() for _ in range(steps)]
    timed.check_loss()
    if profile_dir:
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
          timed()
      print(f'Profile of {PROFILE_STEPS} steps in {profile_dir}; op time per step by JAX '
            'operation (summed over threads/streams):\n  ms/step  share  ops  operation')
      for ms, share, count, operation in profiling.summary(
          profile_dir, timed.step.as_text(), PROFILE_STEPS):
        print(f'{ms:9.2f} {100 * share:5.1f}% {count:4d}  {operation}')
    params = timed.exp.compiled.get_state(timed.state).params
    num_params = timed.num_params()
    step_s = statistics.median(times)
    result = {'examples_per_sec': config.batch_size / step_s}
    seq_len = config.data.seq_len if config.data.name == 'text' else None
    mfu = None
    count = len(parallel.devices(config.parallel.num_devices))  # the run's
    peak_flops, estimated = metrics_lib.total_peak_flops(count)
    if config.model.name == 'gpt':
      result['tokens_per_sec'] = result['examples_per_sec'] * seq_len
      per_token = transformer.gpt_flops_per_token(
          params, config.model.n_layer, config.model.n_embd, seq_len)
      mfu = per_token * result['tokens_per_sec'] / peak_flops
    memory, memory_from = peak_memory_bytes(timed.step)
    result.update(
        step_ms=1000 * step_s, compile_s=timed.compile_s, mfu=mfu,
        peak_flops=peak_flops if mfu is not None else None,
        peak_flops_estimated=estimated if mfu is not None else None,
        peak_memory_bytes=memory, peak_memory_from=memory_from, params=num_params,
        batch_size=config.batch_size, seq_len=seq_len,
        vocab_size=config.model.vocab_size if config.model.name == 'gpt' else None,
        device_kind=jax.devices()[0].device_kind, device_count=count, config=name,
        **cpu_record(config.parallel.cpu_compiler_options))
    if floor:
      result.update(matmul_floor(timed.exp, 1000 * step_s))
  return result


def cpu_record(*options: str) -> dict:
  """On CPUs: the CPU's model and the XLA options each config's steps were compiled with
  ('auto' resolved), since both change the figures; nothing on accelerators."""
  if jax.devices()[0].platform != 'cpu':
    return {}
  names = ('cpu_compiler_options',) if len(options) == 1 else (
      'a_cpu_compiler_options', 'b_cpu_compiler_options')
  return {'cpu_model': parallel.cpu_model(),
          **{n: parallel.resolved_cpu_options(o) for n, o in zip(names, options)}}


def run_ab(config_a, config_b, steps: int, warmup: int, names: tuple[str, str]) -> dict:
  """Steps of A and B alternated in one process; their medians and paired ratio."""
  with tempfile.TemporaryDirectory() as workdir_a, tempfile.TemporaryDirectory() as workdir_b:
    a, b = _Timed(config_a, workdir_a), _Timed(config_b, workdir_b)
    for _ in range(warmup):
      a(), b()
    pairs = [(a(), b()) for _ in range(steps)]
    a.check_loss()
    b.check_loss()
  return {'a_step_ms': 1000 * statistics.median(t for t, _ in pairs),
          'b_step_ms': 1000 * statistics.median(t for _, t in pairs),
          'b_over_a': statistics.median(tb / ta for ta, tb in pairs),
          'b_faster_share': sum(tb < ta for ta, tb in pairs) / len(pairs), 'pairs': len(pairs),
          'a_params': a.num_params(), 'b_params': b.num_params(),  # which model each side ran
          'device_kind': jax.devices()[0].device_kind,
          'device_count': len(parallel.devices(config_a.parallel.num_devices)),
          'config': names[0], 'config_b': names[1],
          **cpu_record(config_a.parallel.cpu_compiler_options,
                       config_b.parallel.cpu_compiler_options)}


def _last_json_line(command: list[str]) -> dict:
  """Runs `command`; its last line of output, parsed (its output is shown if it fails)."""
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    raise RuntimeError(f'{shlex.join(command)} failed (exit status {done.returncode}):\n'
                       f'{done.stdout[-3000:]}{done.stderr[-3000:]}')
  return json.loads(lines[-1])


def override_flags(values: dict, flag: str = 'config') -> list[str]:
  """The config overrides given on the command line (`get_override_values`), as flags again."""
  return [f'--{flag}.{key}={value}' for key, value in values.items()]


def mock_data(config):
  """Random examples of the experiment's shapes (module docstring), for the `with` it opens."""
  return mock_tokens() if config.data.name == 'text' else tfds_mock_data(config.batch_size)


def tfds_mock_data(batch_size: int):
  """TFDS's mock data, enough examples for a few batches."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.testing.mock_data(num_examples=max(256, 4 * batch_size),
                                policy=tfds.testing.MockPolicy.USE_CODE)


class _Vocabulary(tokenizers.Tokenizer):
  """Token ids without text: what --mock_data's random tokens are drawn from."""

  def __init__(self, kind: str, vocab_size: int):
    self.kind, self.vocab_size, self.eot_id = kind, vocab_size, vocab_size - 1


def mock_tokens():
  """text.build_lm_data replaced, for every config built inside (--config and --config_b), by
  windows of uniformly random tokens of the vocabulary that config fixes (no corpus read, no
  tokenizer built), each process drawing its own rows of every batch as from real text. A
  'char' alphabet comes from the text: that is read as usual (TFDS's mock text for a tfds:
  source)."""
  read_text = text.build_lm_data

  def build_lm_data(source, tokenizer_kind, seq_len, batch_size, seed, eval_batch_size=None,
                    vocab_size=None, process_index=0, process_count=1, **kwargs):
    size = {'byte': tokenizers.ByteTokenizer.vocab_size,
            'gpt2': tokenizers.Gpt2Tokenizer.vocab_size, 'bpe': vocab_size}.get(tokenizer_kind)
    if not size:
      with (tfds_mock_data(batch_size) if source.startswith('tfds:')
            else contextlib.nullcontext()):
        return read_text(source, tokenizer_kind, seq_len, batch_size, seed,
                         eval_batch_size=eval_batch_size, vocab_size=vocab_size,
                         process_index=process_index, process_count=process_count, **kwargs)
    tokens = np.random.default_rng(seed).integers(
        0, size, size=4 * batch_size * (seq_len + 1), dtype=np.int32)
    train_data = text.LMDataset(tokens, seq_len, batch_size, seed, process_index, process_count)
    evals = text.eval_batches(tokens, seq_len, eval_batch_size or batch_size, 1, process_index,
                              process_count)
    return text.LMData(_Vocabulary(tokenizer_kind, size), train_data, evals)

  return mock.patch.object(text, 'build_lm_data', build_lm_data)


def against_torch(name: str, overrides: list[str], rounds: int, steps: int, warmup: int,
                  torch_args: str, ours_args: tuple[str, ...] = ()) -> dict:
  """Rounds of ours then the PyTorch reference, each in a fresh process; their ratios."""
  common = [f'--config={name}', *overrides, f'--steps={steps}', f'--warmup={warmup}']
  results = []
  for i in range(rounds):
    ours = _last_json_line([sys.executable, '-m', 'research.benchmark', *common, *ours_args])
    vocab, rows = [], ours.get('vocab_size')
    if rows:  # the rows our head multiplies: padded to a multiple of 128 off CPUs
      rows = rows if ours['device_kind'] == 'cpu' else -(-rows // 128) * 128
      vocab = [f'--vocab_size={rows}']
    theirs = _last_json_line([sys.executable, '-m', 'research.torch_reference', *common,
                              *vocab, *shlex.split(torch_args)])
    for key in ('batch_size', 'seq_len'):
      if ours[key] != theirs[key]:
        raise RuntimeError(f'The PyTorch reference ran {key}={theirs[key]}, ours {ours[key]}: '
                           'not the same experiment.')
    speedup = theirs['step_ms'] / ours['step_ms']
    results.append({'ours_step_ms': ours['step_ms'], 'torch_step_ms': theirs['step_ms'],
                    'speedup': speedup, 'ours_params': ours['params'],
                    'torch_params': theirs['params']})
    print(f'round {i + 1}/{rounds}: ours {ours["step_ms"]:.1f} ms, PyTorch '
          f'{theirs["step_ms"]:.1f} ms per step: ours / PyTorch {speedup:.2f}x', flush=True)
  return {'speedup': statistics.median(r['speedup'] for r in results),
          'ours_step_ms': statistics.median(r['ours_step_ms'] for r in results),
          'torch_step_ms': statistics.median(r['torch_step_ms'] for r in results),
          'rounds': results, 'batch_size': ours['batch_size'], 'seq_len': ours['seq_len'],
          'device_kind': ours['device_kind'], 'device_count': ours['device_count'],
          'torch': theirs.get('torch'), 'torch_device': theirs.get('device'), 'config': name}


def main(argv):
  try:
    run_main(argv)
  except app.UsageError as e:  # one line, not the module's usage text (as launch.py)
    sys.exit(f'Usage error: {e} (python -m research.benchmark --help lists the flags.)')


def run_main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name = flags.FLAGS['config'].config_filename
  if not FLAGS['verbosity'].present:  # Orbax logs its checkpoint reads at INFO (as launch.py)
    logging.set_verbosity(logging.WARNING)
  if FLAGS.profile_dir and (FLAGS.against_torch or FLAGS.compile_only or FLAGS.config_b):
    raise app.UsageError('--profile_dir profiles a plain benchmark run: not with '
                         '--against_torch, --compile_only or --config_b.')
  if FLAGS.matmul_floor:
    if FLAGS.against_torch or FLAGS.compile_only or FLAGS.config_b:
      raise app.UsageError('--matmul_floor goes with a plain benchmark run: not with '
                           '--against_torch, --compile_only or --config_b.')
    if FLAGS.config.model.name != 'gpt':
      raise app.UsageError(f'--matmul_floor lists the products of GPTs; '
                           f'config.model.name is {FLAGS.config.model.name!r}.')
    if len(parallel.devices(FLAGS.config.parallel.num_devices)) != 1:
      raise app.UsageError('--matmul_floor times one device\'s products: set '
                           '--config.parallel.num_devices=1.')
  overrides = override_flags(config_flags.get_override_values(flags.FLAGS['config']))
  if FLAGS.against_torch:
    if FLAGS.compile_only or FLAGS.config_b is not None:
      raise app.UsageError('--against_torch runs the step: not with --compile_only or '
                           '--config_b.')
    try:
      result = against_torch(name, overrides, FLAGS.rounds, FLAGS.steps, FLAGS.warmup,
                             FLAGS.torch_args, ('--mock_data',) if FLAGS.mock_data else ())
    except RuntimeError as e:  # a failed run or a mismatch: its message, not our traceback
      sys.exit(str(e))
    print(json.dumps({**result, 'overrides': overrides}))
    return
  try:
    with mock_data(FLAGS.config) if FLAGS.mock_data else contextlib.nullcontext():
      if FLAGS.config_b is not None:
        if FLAGS.compile_only:
          raise app.UsageError('--config_b times the steps: not with --compile_only.')
        label = lambda flag: ' '.join([flags.FLAGS[flag].config_filename, *override_flags(
            config_flags.get_override_values(flags.FLAGS[flag]), flag)])  # what A and B differ in
        result = run_ab(FLAGS.config, FLAGS.config_b, FLAGS.steps, FLAGS.warmup,
                        (label('config'), label('config_b')))
      elif FLAGS.compile_only:
        result = compile_only(FLAGS.config, name)
      else:
        result = run(FLAGS.config, FLAGS.steps, FLAGS.warmup, name, FLAGS.profile_dir,
                     FLAGS.matmul_floor)
      if FLAGS.config_b is None:  # --config_b's labels hold them
        result['overrides'] = overrides  # the command line's --config.KEY=VALUE, as given
  except DataError as e:  # the message says what to do (as launch.py): no traceback
    sys.exit(f'DataError: {e}' + (' (Or benchmark on made-up examples of its shapes: '
                                  '--mock_data.)' if 'TFDS' in str(e) else ''))
  except cli.OUR_ERRORS as e:
    if (isinstance(e, FileNotFoundError) and FLAGS.config.data.name == 'text'
        and cli.raised_here(e)):  # the corpus is not there
      sys.exit(f'{type(e).__name__}: {e} ' + (
          "(--mock_data reads the text of a 'char' tokenizer, whose alphabet comes from it.)"
          if FLAGS.mock_data else '(Or benchmark on random tokens: --mock_data.)'))
    cli.exit_if_ours(e)
    raise
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
