"""Language modelling end to end: GPT experiments through the real trainer and launch.py."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import gpt_small
from experiments import shakespeare_char
from research import sample
from research import train
from tests.test_train import read_metrics, run_launch

# The character unigram model of tinyshakespeare's train split (first 90%) has entropy
# 3.309 nats, and scores the validation split (last 10%) at 3.347 nats per character
# (computed with collections.Counter over ../shared/data/tinyshakespeare.txt).
UNIGRAM_VAL_NATS = 3.347


def test_nano_gpt_learns_tinyshakespeare_well_below_unigram(shared_data, tmp_path):
  config = shakespeare_char.get_config('cpu')
  config.data.source = str(shared_data / 'tinyshakespeare.txt')
  config.total_steps = 150
  config.eval_every_steps = config.checkpoint_every_steps = 150
  config.sample.max_new_tokens = 0
  config.parallel.num_devices = 1
  result = train.train_and_evaluate(config, str(tmp_path))
  # Measured (2-core CPU, 2026-11-27): 2.61 nats after 50 steps, 2.49 after 100, 2.41 after 150
  # (35 s), 2.31 after 300; 2.19 after 500.
  assert result['loss'] < UNIGRAM_VAL_NATS - 0.7, result
  assert result['perplexity'] == np.exp(result['loss'])
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['vocab_size'] == 66  # 65 distinct characters + end-of-text


def test_launch_gpt_small_cpu_trains_resumes_evaluates_and_samples(tmp_path):
  workdir = str(tmp_path / 'gpt')
  common = ['--config=experiments/gpt_small.py:cpu', f'--workdir={workdir}',
            '--config.data.max_bytes=300000', '--config.log_every_steps=5',
            '--config.eval_every_steps=10', '--config.checkpoint_every_steps=10',
            '--config.max_eval_batches=2', '--config.sample.max_new_tokens=16']
  first = run_launch(*common, '--config.total_steps=20')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'sample at step 20' in first.stdout
  second = run_launch(*common, '--config.total_steps=30')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming from step 20' in second.stdout
  records = read_metrics(workdir)
  train_lines = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train_lines] == [5, 10, 15, 20, 25, 30]
  assert all(r['tokens_per_sec'] > 0 and 0 < r['mfu'] < 1 for r in train_lines)
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [10, 20, 30]
  assert {r['eval_split'] for r in evals} == {'validation'}  # what text evaluates
  assert evals[-1]['loss'] < evals[0]['loss'] < np.log(257)  # learning, below uniform bytes
  assert os.path.exists(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))
  assert open(os.path.join(workdir, 'samples.txt')).read().count('=== step') == 3

  sampled = run_launch(f'--workdir={workdir}', '--mode=sample', '--prompt=import ',
                       '--max_new_tokens=24', '--temperature=0')
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sampled.stdout.startswith('import ') and len(sampled.stdout) > len('import \n')
  # Settings that cannot sample are said before anything is printed (the prompt was printed,
  # then the error; a negative --max_new_tokens printed the prompt alone and succeeded).
  for bad in ('--temperature=-1', '--temperature=nan', '--top_p=2', '--top_p=nan',
              '--max_new_tokens=-5'):
    refused = run_launch(f'--workdir={workdir}', '--mode=sample', bad)
    assert refused.returncode != 0 and refused.stdout == '', (bad, refused.stdout)
    assert bad.split('=')[0] in refused.stderr and 'Traceback' not in refused.stderr, (
        bad, refused.stderr[-2000:])
  evaluated = run_launch(f'--workdir={workdir}', '--mode=eval')  # config from the workdir
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert f'eval at step 30 ({evals[-1]["eval_split"]}): loss {evals[-1]["loss"]:.4f}' in (
      evaluated.stdout)

  # The same from Python: greedy sampling is deterministic and matches the command.
  model, params, tokenizer, config = sample.load_trained(workdir)
  config.sample.prompt, config.sample.max_new_tokens = 'import ', 24
  config.sample.temperature = 0.0
  text = sample.sample_text(model, params, tokenizer, config.sample, jax.random.key(1))
  assert sampled.stdout == 'import ' + text + '\n'
  # A run without checkpoints says so.
  untrained = os.path.join(str(tmp_path), 'untrained')
  shutil.copytree(workdir, untrained, ignore=shutil.ignore_patterns('checkpoints'))
  os.makedirs(os.path.join(untrained, 'checkpoints'))
  with pytest.raises(FileNotFoundError, match=r'No checkpoint in .*untrained/checkpoints: train'):
    sample.load_trained(untrained)


def test_launch_explains_an_unprepared_tfds_text_dataset(tmp_path):
  """A text TFDS source that is not prepared is a DataError that launch.py prints cleanly."""
  result = run_launch('--config=experiments/gpt_small.py:cpu', f'--workdir={tmp_path}/run',
                      '--config.data.source=tfds:tiny_shakespeare',
                      f'--config.data.data_dir={tmp_path}/tfds', '--config.data.download=False')
  assert result.returncode == 1, result.stderr[-3000:]
  assert "DataError: TFDS dataset 'tiny_shakespeare' is not prepared" in result.stderr
  assert 'tfds build tiny_shakespeare --file_format=array_record' in result.stderr
  assert str(tmp_path / 'tfds') in result.stderr and 'Traceback' not in result.stderr


def test_gpt_small_full_config_is_gpt2_small():
  config = gpt_small.get_config()
  assert (config.model.n_layer, config.model.n_head, config.model.n_embd,
          config.model.block_size) == (12, 12, 768, 1024)
  assert config.batch_size * config.data.seq_len == 512 * 1024  # 0.5M tokens per update
  assert config.batch_size // config.grad_accum_steps == 64  # micro-batches (BENCHMARKS.md)
  assert config.optimizer.b2 == 0.95 and config.optimizer.grad_clip_norm == 1.0


def test_text_evaluation_scores_every_validation_window_once(tmp_path):
  """Batches of whole windows would leave out the tail; the last batch is filled and masked."""
  source = tmp_path / 'text.txt'
  source.write_text('the quick brown fox jumps over the lazy dog. ' * 200)  # 9000 characters
  config = gpt_small.get_config('cpu')
  config.data.source, config.data.tokenizer = str(source), 'char'
  config.data.max_bytes = 0
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
  config.max_eval_batches, config.sample.max_new_tokens = 0, 0
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  # The last 10% (900 characters) in windows of 128 + 1: 7 windows, in one batch of 16 (whole
  # batches only would have had none).
  assert result['num_examples'] == (900 - 1) // 128 == 7
  # The loss is the mean cross-entropy per token over those windows (not a sum over a window's
  # tokens, which the real-data test alone caught): recomputed here with numpy.
  exp = train.setup(config, str(tmp_path / 'run'))
  state, _ = train.restore_or_init(exp)
  params = jax.device_get(exp.compiled.get_state(state).params)
  nll = []
  for batch in exp.data.eval_batches():
    logits = np.asarray(exp.model.apply({'params': params}, batch['inputs']), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
    nll += list(-picked[batch['mask'] == 1].ravel())
  assert len(nll) == 7 * 128
  np.testing.assert_allclose(result['loss'], np.mean(nll), rtol=1e-5)


def test_a_resume_drops_the_samples_of_steps_it_runs_again(tmp_path):
  """A run stopped after its step-30 sample but before a step-30 checkpoint samples step 30
  again when resumed from step 20: samples.txt had it twice (metrics.jsonl drops such lines).
  Samples with blank lines and lines of '=' are kept whole. (A sample holding a line
  '=== step N' of its own would be taken for two.)"""
  samples = ('=== step 10\n\ndef f\n\n=== step 20\n=== = ===\n'
             '=== step 30\nx\n=== step 40\ny\n')
  (tmp_path / 'samples.txt').write_text(samples)
  train._drop_samples_after(str(tmp_path), 20)  # pylint: disable=protected-access
  assert (tmp_path / 'samples.txt').read_text() == samples[:samples.index('=== step 30')]
  train._drop_samples_after(str(tmp_path), 20)  # pylint: disable=protected-access
  assert (tmp_path / 'samples.txt').read_text() == samples[:samples.index('=== step 30')]
  train._drop_samples_after(str(tmp_path / 'none'), 20)  # pylint: disable=protected-access
