"""train_and_evaluate(config, workdir): the training loop, read top to bottom.

config -> data + model + optimizer -> state -> compiled steps -> metrics and checkpoints.
Relaunching with the same workdir resumes from the newest checkpoint at the same step, with
the same data order (a pure function of seed and step) and the same dropout randomness
(`fold_in(seed, step)` inside the step).
"""
import dataclasses
import functools
import json
import os
import re
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import checkpoint
from research import config as config_lib
from research import metrics as metrics_lib
from research import models
from research import optim
from research import sample as sample_lib
from research import parallel
from research import steps
from research import writer as writer_lib
from research import data as data_lib
from research.data import image
from research.data import tokenizers
from research.models import transformer


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the first step runs."""
  config: ml_collections.ConfigDict
  data: Any
  model: Any
  schedule: Any
  compiled: parallel.Compiled
  ckpt: Any
  init_rng: jax.Array  # parameter initialisation
  rng: jax.Array       # folded with the step inside train_step (dropout, augmentation)
  num_classes: int
  schedule_inputs: Any = None  # the train step's 4th argument: the learning rate's numbers
  flops_per_token: float = 0.0  # language models: training FLOPs per token, for MFU
  peak_flops: float = float('nan')  # of all devices together, for MFU
  learning_rates: Any = None  # step -> the schedule's value, on the host (for logging)


def setup(config: ml_collections.ConfigDict, workdir: str, saves: bool = True) -> Experiment:
  """Validates the config and builds data, model, optimizer and compiled steps (lazily).
  `saves`: whether checkpoints will be written (training; not evaluation or compilation)."""
  config = config_lib.resolve(config)
  mesh = parallel.make_mesh(config.parallel)
  parts = parallel.batch_parts(config.parallel, mesh)
  parallel.check_batch_size(config.batch_size, config.grad_accum_steps, mesh,
                           config.eval_batch_size, parts)
  data = data_lib.build(config, workdir)
  if config.loss == 'cross_entropy' and not (data.num_classes or data.tokenizer):
    raise ValueError(f'config.loss=cross_entropy needs class labels, but {config.data.name!r} '
                     'has none; use config.loss=mse.')
  if config.loss == 'mse' and (data.num_classes or data.tokenizer):
    raise ValueError(f'config.loss=mse needs real-valued targets, but {config.data.name!r} has '
                     'class labels (or tokens); use config.loss=cross_entropy.')
  num_classes = data.num_classes if config.loss == 'cross_entropy' else 0
  outputs = config.model.get('num_classes', config.model.get('num_outputs'))
  if num_classes and outputs is not None and outputs != num_classes:
    key = 'num_classes' if 'num_classes' in config.model else 'num_outputs'
    raise ValueError(f'config.model.{key}={outputs}, but {config.data.name!r} has '
                     f'{num_classes} classes; set config.model.{key}={num_classes}.')
  overrides = {}
  fields = models.model_fields(config.model.name)
  if config.parallel.mode == 'pmap' and 'bn_axis_name' in fields:
    overrides['bn_axis_name'] = parallel.PMAP_AXIS  # BatchNorm statistics over all devices
  if data.tokenizer is not None:
    unset = models.model_class(config.model.name).vocab_size  # the field's default
    if config.model.vocab_size not in (unset, data.tokenizer.vocab_size):  # was ignored, unsaid
      raise ValueError(
          f'config.model.vocab_size={config.model.vocab_size}, but the vocabulary is the '
          f'tokenizer\'s ({data.tokenizer.vocab_size} tokens of config.data.tokenizer='
          f'{config.data.tokenizer!r}): leave config.model.vocab_size out, and set '
          'config.data.tokenizer (and config.data.vocab_size for bpe) instead.')
    with config.unlocked():  # the model's vocabulary is the tokenizer's (recorded in config.json)
      config.model.vocab_size = data.tokenizer.vocab_size
    if config.model.block_size < config.data.seq_len:
      raise ValueError(f'config.data.seq_len={config.data.seq_len} is longer than the position '
                       f'table, config.model.block_size={config.model.block_size}.')
  channels = data.input_shape[-1] if len(data.input_shape) == 3 else None  # images: H, W, C
  if channels and {len(config.data.mean), len(config.data.std)} - {1, channels}:
    raise ValueError(f'config.data.mean={tuple(config.data.mean)} and config.data.std='
                     f'{tuple(config.data.std)}: the images of {config.data.name!r} have '
                     f'{channels} channel(s); give one value per channel (or one for all).')
  model = models.build_model(config.model, **overrides)
  # The rate is applied in the step from inputs (not constants): a new learning rate or
  # total_steps reuses the compiled step from the persistent cache (research/optim.py).
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps, unit_rate=True)
  preprocess = image.make_preprocess(config.data)
  example = jnp.zeros((1, *data.input_shape), data.input_dtype)

  def make_steps(axis_name):
    return steps.make_steps(model, tx, loss=config.loss, preprocess=preprocess,
                            num_classes=num_classes, label_smoothing=config.label_smoothing,
                            grad_accum_steps=config.grad_accum_steps, concurrent_parts=parts,
                            skip_nonfinite=config.nonfinite == 'skip', axis_name=axis_name,
                            learning_rate=functools.partial(optim.learning_rate,
                                                            config.optimizer.schedule))

  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  boxed = jax.eval_shape(lambda r: steps.init_state(model, tx, r, example, unbox=False), init_rng)
  rules = tuple(tuple(rule) for rule in config.parallel.rules)
  compiled = parallel.compile_steps(
      config.parallel.mode, mesh, lambda r: steps.init_state(model, tx, r, example), make_steps,
      parallel.state_shardings(boxed, mesh, rules), rules,
      config.parallel.cpu_compiler_options)
  abstract = jax.eval_shape(compiled.init_state, init_rng)
  checkpoint.check_workdir(workdir, checkpoint.state_bytes(abstract), config.keep_checkpoints,
                           saves)
  ckpt = checkpoint.manager(workdir, config.keep_checkpoints, config.checkpoint_every_steps)
  inputs = jax.tree.map(jnp.asarray, optim.schedule_inputs(config.optimizer, config.total_steps))
  return Experiment(config, data, model, schedule, compiled, ckpt, init_rng, rng, num_classes,
                    schedule_inputs=inputs)


def restore_or_init(exp: Experiment):
  """Returns (state in the steps' layout, step): the newest checkpoint, else a fresh init."""
  abstract = jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(exp.compiled.init_state, exp.init_rng), exp.compiled.state_sharding)
  state, step = checkpoint.restore_latest(exp.ckpt, abstract)
  if state is None:
    state, step = exp.compiled.init_state(exp.init_rng), 0
  return exp.compiled.put_state(state), step


def evaluate_state(exp: Experiment, state) -> tuple[dict, np.ndarray | None]:
  """Loss (and accuracy, macro precision/recall/F1) over the whole eval split."""
  totals = None
  for i, batch in enumerate(exp.data.eval_batches()):
    if exp.config.max_eval_batches and i >= exp.config.max_eval_batches:
      break
    sums = exp.compiled.get_metrics(exp.compiled.eval_step(state, exp.compiled.put_batch(batch)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  result = {'loss': float(totals['loss_sum'] / totals['count']),
            'num_examples': int(totals['count'])}
  if exp.data.tokenizer is not None:
    result['perplexity'] = float(np.exp(result['loss']))
  confusion = totals.get('confusion')
  if confusion is not None:
    result.update(metrics_lib.classification_report(confusion))
  return result, confusion


def _write_eval(exp, writer, workdir, step, result, confusion):
  split = exp.data.eval_split
  writer.write(step, 'eval', result, tags={'eval_split': split})
  writer.log(f'eval at step {step} ({split}): ' + ', '.join(
      f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()))
  if confusion is not None and jax.process_index() == 0:
    np.savetxt(os.path.join(workdir, 'confusion_matrix.csv'), confusion, fmt='%d',
               delimiter=',', header=f'step {step}, {split}; rows: true class, columns: '
               'predicted')


def _drop_samples_after(workdir: str, step: int):
  """Removes samples.txt's samples of steps after `step`, as metrics.jsonl's records are: a
  resumed run samples them again (they were written twice)."""
  path = os.path.join(workdir, 'samples.txt')
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    text = f.read()
  samples = re.split(r'(?m)^(?==== step \d+$)', text)  # each from its '=== step N' line on
  after = lambda sample: (m := re.match(r'=== step (\d+)\n', sample)) and int(m[1]) > step
  keep = [sample for sample in samples if not after(sample)]
  if len(keep) < len(samples):
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(''.join(keep))
    os.replace(path + '.tmp', path)


def _write_samples(exp, writer, workdir, step, params):
  """Language models: a sample from the fixed prompt config.sample.prompt, into the log."""
  text = sample_lib.sample_text(exp.model, params, exp.data.tokenizer, exp.config.sample,
                                jax.random.fold_in(exp.rng, step),
                                context_len=exp.config.data.seq_len)
  writer.log(f'sample at step {step}: {exp.config.sample.prompt!r} -> {text!r}')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'samples.txt'), 'a', encoding='utf-8') as f:
      f.write(f'=== step {step}\n{exp.config.sample.prompt}{text}\n')


class _LearningRates:
  """The schedule's values on the host, evaluated a block of steps at a time: evaluating it at
  each logged step is device work that is queued behind the running step and waits for it, so
  this way that happens once per block (the first, from step `start`, when made: before the
  loop)."""
  BLOCK = 1 << 16

  def __init__(self, schedule, start: int = 0):
    # One compiled program: run op by op, the schedule's dozen operations compiled one by one
    # at every launch (0.5 s of a small run's start-up on a 2-core CPU).
    self.schedule, self.start, self.values = jax.jit(jax.vmap(schedule)), None, None
    self[start]  # pylint: disable=pointless-statement

  def __getitem__(self, step: int) -> float:
    start = step // self.BLOCK * self.BLOCK
    if start != self.start:
      self.values = np.asarray(self.schedule(np.arange(start, start + self.BLOCK)))
      self.start = start
    return float(self.values[step - start])


class _Clock:
  """Seconds per step between metric writes, for examples/s and the ETA: the time since the
  last write over the steps finished since. A write fetches its window's metrics, so its steps
  have finished; the step dispatched after them (counted as it was dispatched, this
  overstated the first window and understated the last) has not."""

  def __init__(self):
    self.last = None  # seconds per step as of the last write (first: the first step's)
    self.mark(0)

  def mark(self, step: int):
    """`step` steps have finished now (a write, the first step, an evaluation)."""
    self.step, self.time = step, time.time()

  def first_step_done(self, step: int) -> float:
    """Seconds since the start (the first step, compilation included), kept as the figure for
    a window written before another step has finished."""
    self.last = time.time() - self.time
    self.mark(step)
    return self.last

  def seconds_per_step(self, step: int) -> float:
    """Over the steps finished since the last mark, up to `step`. With none (a window written
    at once for an eval or checkpoint right after the previous window, or the first step's
    own window) the last figure is repeated instead of dividing ~0 seconds."""
    if step > self.step:
      self.last = (time.time() - self.time) / (step - self.step)
      self.mark(step)
    return self.last


def _fetch_window(exp, step, window) -> dict:
  """Fetches a window of per-step metrics; stops at a non-finite step (config.nonfinite=stop).

  Each step's arrays are copied as they are and stacked on the host: stacking them on the
  device (jnp.stack) would be queued behind the step just dispatched and wait for it.
  """
  values = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(window))
  finite = values.pop('finite', None)
  bad = np.flatnonzero(finite == 0) if finite is not None else []
  if len(bad):
    i, latest = int(bad[0]), exp.ckpt.latest_step()
    first = step - len(window) + 1 + i
    loss, grad_norm = values['loss'][i], values['grad_norm'][i]
    what = (f'loss {loss}, gradient norm {grad_norm}' if not np.isfinite([loss, grad_norm]).all()
            else f'loss {loss} and gradient norm {grad_norm}, but the update made the '
                 'parameters non-finite')
    last_good = (f'The last good checkpoint is step {latest} in {exp.ckpt.directory}.'
                 if latest is not None else 'No checkpoint was saved before it.')
    raise FloatingPointError(
        f'Training went non-finite at step {first} ({what}). {last_good} Lower '
        'config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or set '
        'config.nonfinite=skip to skip such updates.')
  return values


def _write_train(exp, writer, step, window, clock, finished=None):
  """Writes the mean of a window of metrics (fetched one step after they were made);
  `finished`: the steps finished by now (default `step`), for the clock."""
  values = _fetch_window(exp, step, window)
  updates = values.pop('updates', None)  # config.nonfinite=skip: skipped steps hold the schedule
  values = {k: float(np.sum(v) if k == 'skipped' else np.nanmean(v)) for k, v in values.items()}
  seconds_per_step = clock.seconds_per_step(finished or step)
  schedule_step = step if updates is None else int(updates[-1])
  values['learning_rate'] = exp.learning_rates[max(schedule_step - 1, 0)]
  values['examples_per_sec'] = exp.config.batch_size / seconds_per_step
  if exp.flops_per_token:
    values['tokens_per_sec'] = values['examples_per_sec'] * exp.config.data.seq_len
    values['mfu'] = exp.flops_per_token * values['tokens_per_sec'] / exp.peak_flops
  writer.write(step, 'train', values)
  writer.log(writer_lib.progress_line(step, exp.config.total_steps, values, seconds_per_step))


def _log_config_changes(writer, workdir, config, step):
  """Relaunching a workdir with other settings is allowed; says what changed, and whether a new
  total_steps moves the learning rate at the resumed `step` (None: no checkpoint)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    old = config_lib.flatten(saved)
  except (OSError, ValueError) as e:
    writer.log(f'WARNING: {path} could not be read ({e}); it is written anew once this '
               "launch's first step has run.")
    return
  new = config_lib.flatten(json.loads(config.to_json_best_effort()))
  changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if changed:
    writer.log('config changed since the last launch in this workdir: ' + '; '.join(
        f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed))
  if step is None or 'total_steps' not in changed:
    return
  try:  # the schedule as the last launch laid it out
    before = float(optim.make_schedule(ml_collections.ConfigDict(saved['optimizer']),
                                       saved['total_steps'])(step))
  except Exception:  # pylint: disable=broad-except  (an older config: only for the message)
    return
  after = float(optim.make_schedule(config.optimizer, config.total_steps)(step))
  if not np.isclose(before, after, rtol=1e-6, atol=0):
    writer.log(f'WARNING: the learning rate at step {step} is now {after:.3g}, not {before:.3g}: '
               'the schedule is laid out over total_steps (e.g. a finished cosine run '
               'relaunched with more steps goes back up). To go on at the old rate instead: '
               f'--config.optimizer.schedule=constant --config.optimizer.learning_rate={before:.3g}'
               '.')


def _evaluate_and_write(exp, writer, workdir: str, step: int, state) -> dict:
  """Evaluates `state`, writes the result (and, for language models, samples); returns it."""
  result, confusion = evaluate_state(exp, state)
  _write_eval(exp, writer, workdir, step, result, confusion)
  if exp.data.tokenizer is not None and exp.config.sample.max_new_tokens:
    _write_samples(exp, writer, workdir, step, exp.compiled.get_state(state).params)
  return result


def _eval_record(workdir: str, step: int, split: str) -> dict | None:
  """The evaluation at `step` on the eval `split` in `workdir`'s metrics.jsonl (its metrics),
  or None. (--mode=eval may have added evaluations on other splits.)"""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  found = None
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # a line cut short by a kill
        continue
      if (record.get('split') == 'eval' and record.get('step') == step
          and record.get('eval_split', split) == split):  # older records lack it
        found = {k: int(v) if k == 'num_examples' else v for k, v in record.items()
                 if k not in ('step', 'split', 'time', 'eval_split')}
  return found


def _write_run_files(exp, workdir: str):
  """config.json (what --mode=eval/sample and later launches read) and the tokenizer. Written
  after a launch's first step, so that a config that fails does not replace the last one that
  ran; config.json through a temporary file, so that an interrupted write leaves the old one."""
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(exp.config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  os.replace(path + '.tmp', path)
  if exp.data.tokenizer is not None:  # sampling later reuses it
    exp.data.tokenizer.save(os.path.join(workdir, 'tokenizer'))


def _check_tokenizer(tokenizer, directory: str, latest_step):
  """A resumed language model must see the same token ids its checkpoint was trained on."""
  if latest_step is None or not os.path.exists(os.path.join(directory, 'tokenizer.json')):
    return
  saved = tokenizers.load(directory)
  vocab = lambda t: [t.decode([i]) for i in range(t.vocab_size)]
  if saved.kind != tokenizer.kind or vocab(saved) != vocab(tokenizer):
    raise ValueError(
        f'The tokenizer built from this config ({tokenizer.kind}, {tokenizer.vocab_size} '
        f'tokens) differs from the one the checkpoint was trained with ({saved.kind}, '
        f'{saved.vocab_size} tokens, in {directory}): restore config.data.tokenizer and '
        'config.data.source, or use a new --workdir.')


def _start(exp, writer):
  """Restores the newest checkpoint, or initialises (from config.init_from if set)."""
  state, start = restore_or_init(exp)
  if start == 0 and exp.config.init_from:
    source = exp.config.init_from
    loaded = checkpoint.load_params(source)  # the parameters and BatchNorm's statistics
    fresh = exp.compiled.get_state(state)
    mismatch = checkpoint.shape_mismatch(
        checkpoint.shapes(loaded),
        checkpoint.shapes({'params': fresh.params, 'model_state': fresh.model_state}))
    if mismatch:
      raise ValueError(
          f'config.init_from={source!r}: {mismatch}: the model settings must be the '
          f'same (see {os.path.join(source, "config.json")}), e.g. config.model.scan_layers.')
    sharding = exp.compiled.state_sharding
    state = exp.compiled.put_state(fresh.replace(
        params=jax.device_put(loaded['params'], sharding.params),
        model_state=jax.device_put(loaded['model_state'], sharding.model_state)))
    writer.log(f'parameters initialised from {exp.config.init_from}; optimizer and step new')
  return state, start


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last eval."""
  exp = setup(config, workdir)
  config = exp.config
  if exp.data.tokenizer is not None and config.sample.max_new_tokens:
    try:  # sampled at every evaluation: a prompt the tokenizer cannot encode failed the first
      exp.data.tokenizer.encode(config.sample.prompt)
    except ValueError as e:
      raise ValueError(f'config.sample.prompt={config.sample.prompt!r}, sampled at each '
                       f'evaluation: {e} Change it, or set config.sample.max_new_tokens=0.') from e
  is_main = jax.process_index() == 0
  writer = writer_lib.MetricWriter(workdir, enabled=is_main)
  _log_config_changes(writer, workdir, config, exp.ckpt.latest_step())
  if exp.data.tokenizer is not None:
    _check_tokenizer(exp.data.tokenizer, os.path.join(workdir, 'tokenizer'),
                     exp.ckpt.latest_step())
  state, start = _start(exp, writer)
  dropped = writer.drop_after(start)
  if dropped:  # they would be written twice
    writer.log(f'metrics.jsonl: {dropped} lines after step {start} removed (the steps they '
               'describe were not checkpointed and run again now).')
  if is_main:
    _drop_samples_after(workdir, start)
  params = exp.compiled.get_state(state).params
  num_params = sum(x.size for x in jax.tree.leaves(params))
  count = len(parallel.devices(config.parallel.num_devices))  # the run's, not all there are
  if config.model.name == 'gpt':
    exp.flops_per_token = transformer.gpt_flops_per_token(
        params, config.model.n_layer, config.model.n_embd, config.data.seq_len)
    exp.peak_flops, estimated = metrics_lib.total_peak_flops(count)
    writer.log(f'{exp.flops_per_token / 1e6:.1f} MFLOPs per token (6N + 12 L C T); MFU against '
               f'{exp.peak_flops / 1e12:.3g} TFLOP/s'
               + (' (an estimate for this CPU)' if estimated else ''))
  writer.log(f'{config.model.name}: {num_params:,} parameters; {count} device{"s" * (count > 1)} '
             f'({jax.devices()[0].device_kind}), parallel.mode={config.parallel.mode}; '
             + (f'resuming from step {start}' if start else
                'starting at step 0' if config.init_from else 'starting from scratch')
             + f'; workdir {workdir}')
  result = {}
  if start >= config.total_steps or (start and start % config.eval_every_steps == 0):
    # Process 0's answer for all: the evaluation spans every process.
    record = _eval_record(workdir, start, exp.data.eval_split)
    written = record is not None
    if jax.process_count() > 1:
      written = bool(multihost_utils.broadcast_one_to_all(np.int32(written)))
    if start < config.total_steps:
      if not written:  # preempted at an evaluation step: saved, then stopped before evaluating
        writer.log(f'Step {start} was saved but not evaluated (the run stopped there): '
                   'evaluating it now.')
        _evaluate_and_write(exp, writer, workdir, start, state)
    elif written:
      writer.log(f'The run in {workdir} already finished ({start} of {config.total_steps} '
                 'steps).' if start == config.total_steps else
                 f'The run in {workdir} has trained {start} steps, more than '
                 f'config.total_steps={config.total_steps}: nothing to do.')
      # Its final evaluation, as the run returned it (on processes that see metrics.jsonl,
      # which process 0 writes; {} on others).
      result = record or {}
    else:  # stopped (e.g. preempted) after its last checkpoint, before its last evaluation
      writer.log(f'The run in {workdir} finished training ({start} of {config.total_steps} '
                 'steps) but not its evaluation: evaluating now.')
      result = _evaluate_and_write(exp, writer, workdir, start, state)
  exp.learning_rates = _LearningRates(exp.schedule, start)
  train_iter = exp.data.train_batches(start)
  window, pending = [], None  # metrics of the steps since the last write; the window to write
  clock = _Clock()
  preemption = checkpoint.Preemption()
  try:
    for step in range(start, config.total_steps):
      batch = exp.compiled.put_batch(next(train_iter))
      try:
        state, metrics = exp.compiled.train_step(state, batch, exp.rng, exp.schedule_inputs)
        if step == start:  # the one sync outside logging: report the compilation time
          jax.block_until_ready(metrics)
      except jax.errors.JaxRuntimeError as e:
        if step == start:  # where a step too big for the memory fails
          _raise_if_out_of_memory(config, e)
        raise
      window.append(exp.compiled.get_metrics(metrics))
      done = step + 1
      if step == start:
        writer.log(f'first step (compilation included) took {clock.first_step_done(done):.1f}s')
        if is_main:  # once this config has compiled and run
          _write_run_files(exp, workdir)
      if pending:  # the last window's metrics, fetched now that the next step is queued
        # Has that step finished too? It has when dispatch waits for the computation (JAX's
        # CPU dispatch on one device, research/hostmem.py); counting it there or not made
        # the first window 1/k too slow and a last 1-step window written at once 1000x fast.
        ready = all(getattr(x, 'is_ready', lambda: True)() for x in jax.tree.leaves(metrics))
        _write_train(exp, writer, *pending, clock, finished=done if ready else None)
        pending = None
      if done % config.log_every_steps == 0 or done == config.total_steps:
        pending, window = (done, window), []
      preempted = preemption.reached(done)
      is_eval = done % config.eval_every_steps == 0 or done == config.total_steps
      if is_eval or preempted or done % config.checkpoint_every_steps == 0:
        if pending:
          _write_train(exp, writer, *pending, clock)
          pending = None
        if window and config.nonfinite == 'stop':  # never checkpoint a non-finite state
          _fetch_window(exp, done, window)
        checkpoint.save(exp.ckpt, done, exp.compiled.get_state(state),
                        force=preempted or done == config.total_steps)
      if preempted:
        exp.ckpt.wait_until_finished()
        label = 'Ctrl-C' if preemption.signal == 'SIGINT' else preemption.signal
        writer.log(f'{label}: saved step {done} to {exp.ckpt.directory} and stopped; relaunch '
                   f'with --workdir={workdir} to resume.')
        if preemption.signal == 'SIGINT':  # an interruption to callers (exit status 130)
          raise KeyboardInterrupt
        break
      if is_eval:
        result = _evaluate_and_write(exp, writer, workdir, done, state)
        clock.mark(done)  # the evaluation's time is not the steps'
    if preemption.signal == 'SIGINT':  # pressed during the last evaluation
      writer.log(f'Ctrl-C: the run had finished its {config.total_steps} steps (saved); '
                 'stopped after its evaluation.')
      raise KeyboardInterrupt
    _report_tiny_model(writer, exp.compiled.get_state(state).params, num_params)
  finally:
    preemption.close()
    exp.ckpt.wait_until_finished()
    writer.close()
  return result


def _raise_if_out_of_memory(config, error: Exception):
  """XLA's RESOURCE_EXHAUSTED (a step whose buffers do not fit the device: its memory, or a
  CPU's RAM) said with the settings that make a step smaller."""
  first = str(error).splitlines()[0]
  if 'RESOURCE_EXHAUSTED' not in first or 'memory' not in first.lower():
    return
  on_cpu = jax.devices()[0].platform == 'cpu'
  raise RuntimeError(
      f'The train step does not fit in {"RAM" if on_cpu else "device memory"} '
      f'({first}). The same command with --mode=compile gives its memory per device without '
      f'running it. {ways_to_fit(config)}'
      + (f'\nXLA said:\n{error}' if '\n' in str(error).strip() else '')) from error


def ways_to_fit(config) -> str:
  """The settings that make a train step smaller, for a step that does not fit."""
  cpu = jax.devices()[0].platform == 'cpu'
  ways = [f'smaller micro-batches (config.grad_accum_steps={config.grad_accum_steps} runs '
          f'{config.batch_size // config.grad_accum_steps} examples at a time; a multiple of '
          'it runs fewer)']
  if 'remat' in config.model:
    ways.append('rematerialisation (config.model.remat=dots or full'
                + (', with config.model.scan_layers=True: on CPUs it saves nothing in unrolled '
                   'layers' if cpu and not config.model.get('scan_layers') else '') + ')')
  ways.append('more devices sharding the state (config.parallel.mesh.fsdp) or a smaller model'
              + (" (on a CPU, the experiment's :cpu variant)" if cpu else ''))
  return 'To fit: ' + ', '.join(ways) + '.'


def xla_memory_bytes(analysis) -> int:
  """What a compiled program needs on each device at least, from XLA's memory analysis
  (CompiledMemoryStats): its arguments, outputs not written over donated arguments,
  temporaries and code."""
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
             + analysis.generated_code_size_in_bytes)


def _report_tiny_model(writer, params, num_params):
  """Prints the learned weights of very small models (e.g. linear regression's w and b)."""
  if num_params <= 16:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    writer.log('learned parameters: ' + ', '.join(
        f'{jax.tree_util.keystr(path, simple=True, separator="/")}='
        + ' '.join(f'{x:.4f}' for x in np.asarray(v).ravel())
        for path, v in flat))


def compile_report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the train step ahead of time for the configured devices, from the state's
  abstract shapes (the state is not allocated, one batch is), and returns its compile time
  (a load where the compilation cache has it), XLA's memory analysis per device and FLOPs,
  and for GPTs the step's FLOPs as MFU counts them: a step's fit, before a long run."""
  exp = setup(config, workdir, saves=False)
  state = jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(exp.compiled.init_state, exp.init_rng), exp.compiled.state_sharding)
  stepped = state
  if exp.config.parallel.mode == 'pmap':  # a copy per device, stacked
    stepped = jax.eval_shape(exp.compiled.put_state, state)
  # One real batch (put_batch assembles a global array from each process's rows, which
  # eval_shape cannot trace with several processes).
  batch = exp.compiled.put_batch(next(exp.data.train_batches(0)))
  start = time.perf_counter()
  step = exp.compiled.train_step.lower(stepped, batch, exp.rng, exp.schedule_inputs).compile()
  compile_s = time.perf_counter() - start
  memory = step.memory_analysis()
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  model_flops = None
  if exp.config.model.name == 'gpt':  # what MFU counts: the whole step, all devices
    model_flops = exp.config.batch_size * exp.config.data.seq_len * (
        transformer.gpt_flops_per_token(state.params, exp.config.model.n_layer,
                                        exp.config.model.n_embd, exp.config.data.seq_len))
  mesh = parallel.mesh_shape(exp.config.parallel)
  devices = int(np.prod(mesh))  # config.parallel.num_devices may leave some out
  limit = (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')
  if limit is None and jax.devices()[0].platform == 'cpu':  # simulated devices share the RAM
    limit = (os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
             // (devices // jax.process_count()))
  return {
      'compile_s': compile_s,
      # XLA's cost analysis: one device's program, a loop body (micro-batches, scanned
      # layers) counted once.
      'flops_per_step': float(cost.get('flops', float('nan'))),
      'flops_per_step_counts': 'one device; loop bodies once',
      'model_flops_per_step': model_flops,
      'argument_bytes': int(memory.argument_size_in_bytes),
      'temp_bytes': int(memory.temp_size_in_bytes),
      'output_bytes': int(memory.output_size_in_bytes),
      'alias_bytes': int(memory.alias_size_in_bytes),
      'code_bytes': int(memory.generated_code_size_in_bytes),
      'memory_bytes': xla_memory_bytes(memory),  # at least, per device
      'ways_to_fit': ways_to_fit(exp.config),
      'device_memory_bytes': int(limit) if limit else None,  # CPUs: the RAM, shared
      'params': sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
      'batch_size': exp.config.batch_size,
      'mesh': dict(zip(parallel.AXES, mesh)),
      'device_kind': jax.devices()[0].device_kind, 'device_count': devices}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the newest checkpoint in `workdir` on the eval split."""
  exp = setup(config, workdir, saves=False)
  if exp.ckpt.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {exp.ckpt.directory}: train first, or pass the '
                            '--workdir of a trained run.')
  if exp.data.tokenizer is not None:  # the token ids must be those the checkpoint learned
    _check_tokenizer(exp.data.tokenizer, os.path.join(workdir, 'tokenizer'),
                     exp.ckpt.latest_step())
  state, step = restore_or_init(exp)
  writer = writer_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  result, confusion = evaluate_state(exp, state)
  _write_eval(exp, writer, workdir, step, result, confusion)
  writer.close()
  return result
