"""`python -m research.benchmark`'s comparisons (--against_torch: ours and the PyTorch reference
alternated; --config_b) and its profile (--profile_dir).

Run as commands: importing research.benchmark here would define its absl flags a second time
next to research.torch_reference's (tests/test_torch_reference.py) and tune this process's
malloc for a benchmark (research/hostmem.py).
"""
import glob
import importlib.util
import json
import subprocess
import sys

import pytest

from research import parallel

needs_torch = pytest.mark.skipif(importlib.util.find_spec('torch') is None,
                                 reason='the PyTorch reference needs torch')

# gpt_small.py:cpu with one layer instead of two; a batch the 8 test devices and the 2 parts
# of `cpu_batch_parts` divide.
TINY = ['--config=experiments/gpt_small.py:cpu', '--config.batch_size=32']


def benchmark(*args):
  return subprocess.run([sys.executable, '-m', 'research.benchmark', *TINY, *args],
                        capture_output=True, text=True, check=False, timeout=600)


def test_the_last_line_is_the_issue_s_json_and_its_figures_agree():
  """The figures a benchmark reports, checked against each other: tokens/s from the batch, the
  context and the median step; MFU from the model's FLOPs per token and the stated peak."""
  done = benchmark('--config.model.n_layer=1', '--steps=3', '--warmup=1')
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(done.stdout.strip().splitlines()[-1])
  assert (r['config'], r['batch_size'], r['device_kind']) == (
      'experiments/gpt_small.py:cpu', 32, 'cpu')
  assert r['overrides'] == ['--config.batch_size=32', '--config.model.n_layer=1']
  assert r['device_count'] == 8 and r['compile_s'] > 0  # conftest's 8 simulated devices
  # The CPU and the XLA options the step was compiled with: the default, 'auto', resolved.
  assert r['cpu_model'] == parallel.cpu_model()
  assert r['cpu_compiler_options'] == parallel.auto_cpu_options(parallel.cpu_flags())
  assert r['tokens_per_sec'] == pytest.approx(32 * r['seq_len'] * 1000 / r['step_ms'])
  assert r['examples_per_sec'] == pytest.approx(32 * 1000 / r['step_ms'])
  # One layer of width 128 (12 * 128^2 + biases and norms), the final norm, and the token
  # (the vocabulary padded to a multiple of 128) and position (block_size = seq_len) tables.
  layer = 12 * 128 ** 2 + 13 * 128
  padded = -(-r['vocab_size'] // 128) * 128
  assert r['params'] == layer + 2 * 128 + 128 * (padded + r['seq_len'])
  assert r['peak_flops_estimated'] is True and r['peak_flops'] > 0  # CPUs: from the core count
  per_token = 6 * (r['params'] - 128 * r['seq_len']) + 12 * 128 * r['seq_len']
  assert r['mfu'] == pytest.approx(per_token * r['tokens_per_sec'] / r['peak_flops'], rel=1e-6)
  assert r['peak_memory_from'] == 'xla_estimate' and r['peak_memory_bytes'] > 4 * r['params']


@needs_torch
def test_against_torch_runs_both_with_the_same_overrides():
  # Overrides in all three spellings: =VALUE, a separate VALUE, and a bare boolean.
  done = benchmark('--config.model.n_layer', '1', '--config.model.scan_layers',
                   '--steps=2', '--warmup=1', '--against_torch', '--rounds=2')
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout.strip().splitlines()
  assert [line.split(':')[0] for line in out[:-1]] == ['round 1/2', 'round 2/2']
  result = json.loads(out[-1])
  assert result['batch_size'] == 32 and result['config'] == 'experiments/gpt_small.py:cpu'
  assert len(result['rounds']) == 2
  for r in result['rounds']:
    assert r['ours_step_ms'] > 0 and r['torch_step_ms'] > 0
    assert r['speedup'] == pytest.approx(r['torch_step_ms'] / r['ours_step_ms'])
    # One layer, not the experiment's two (462K parameters), in both: the override reached them.
    assert 0 < r['ours_params'] < 400_000 and 0 < r['torch_params'] < 400_000
  assert min(r['speedup'] for r in result['rounds']) <= result['speedup'] <= max(
      r['speedup'] for r in result['rounds'])


@needs_torch
def test_a_failing_reference_shows_its_command_and_output():
  done = benchmark('--config.model.n_layer=1', '--steps=1', '--warmup=0', '--against_torch',
                   '--rounds=1', '--torch_args=--no_such_flag')
  assert done.returncode != 0
  assert 'research.torch_reference' in done.stderr and 'no_such_flag' in done.stderr


def test_a_dataset_that_is_not_there_is_said_in_a_few_lines(tmp_path):
  """As launch.py says it (a DataError naming the dataset, its folder and how to prepare it),
  with the benchmark's own way round: --mock_data."""
  done = subprocess.run(
      [sys.executable, '-m', 'research.benchmark', '--config=experiments/cifar10_lenet.py',
       f'--config.data.data_dir={tmp_path}', '--config.data.download=False', '--steps=1'],
      capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 1
  assert "DataError: TFDS dataset 'cifar10' is not prepared" in done.stderr, done.stderr[-3000:]
  assert 'tfds build cifar10' in done.stderr and '--mock_data' in done.stderr
  assert 'Traceback' not in done.stderr and len(done.stderr.splitlines()) < 10, done.stderr


@needs_torch
def test_image_models_run_on_mock_data_against_their_reference():
  # No CIFAR-10 on disk here: --mock_data stands in for it (TFDS's mock data), in our process.
  done = subprocess.run(
      [sys.executable, '-m', 'research.benchmark', '--config=experiments/cifar10_lenet.py',
       '--mock_data', '--steps=2', '--warmup=1', '--against_torch', '--rounds=1'],
      capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['batch_size'] == 64 and result['seq_len'] is None
  (r,) = result['rounds']
  assert r['ours_params'] == r['torch_params'] == 62_006  # LeNet-5 for 32x32x3 images, 10 classes


def test_a_language_model_runs_on_random_tokens_without_its_corpus():
  """--mock_data for GPTs: random tokens of the vocabulary each config fixes (A: a BPE of 1000
  tokens, B: bytes), with no text read and no tokenizer trained; the same command without it
  fails on the missing corpus, in one line that names --mock_data. A 'char' alphabet comes
  only from the text: that is read (TFDS's mock text for a tfds: source; a missing file is
  said in one line)."""
  missing = ('--config.model.n_layer=1', '--config.data.source=/no/such/corpus.txt',
             '--steps=1', '--warmup=0')
  bpe = ('--config.data.tokenizer=bpe', '--config.data.vocab_size=1000')
  done = benchmark(*missing, *bpe, '--mock_data', '--config_b=experiments/gpt_small.py:cpu',
                   '--config_b.model.n_layer=1', '--config_b.data.source=/no/such/corpus.txt')
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(done.stdout.strip().splitlines()[-1])
  # One layer of width 128, the final norm, the token table (the vocabulary padded to a
  # multiple of 128: 1024 rows for 1000 tokens, 384 for 257 bytes) and the position table.
  params = lambda rows: 12 * 128 ** 2 + 13 * 128 + 2 * 128 + 128 * (rows + 128)
  assert (r['a_params'], r['b_params']) == (params(1024), params(384))
  without = benchmark(*missing, *bpe)
  assert without.returncode != 0 and 'Traceback' not in without.stderr
  assert "config.data.source='/no/such/corpus.txt' is not a file" in without.stderr
  assert without.stderr.strip().endswith('(Or benchmark on random tokens: --mock_data.)')
  char = benchmark(*missing, '--config.data.tokenizer=char', '--mock_data')
  assert char.returncode != 0 and 'Traceback' not in char.stderr
  assert "reads the text of a 'char' tokenizer" in char.stderr
  tfds_char = subprocess.run(
      [sys.executable, '-m', 'research.benchmark', '--config=experiments/shakespeare_char.py:cpu',
       '--config.model.n_layer=1', '--mock_data',
       '--steps=1', '--warmup=0'], capture_output=True, text=True, check=False, timeout=600)
  assert tfds_char.returncode == 0, tfds_char.stderr[-3000:]
  assert json.loads(tfds_char.stdout.strip().splitlines()[-1])['tokens_per_sec'] > 0


def test_config_b_is_compared_in_the_same_process():
  # B has three layers where A has one. Which is faster is the machine's to say (timings are
  # benchmarks, not tests); what each side ran is asserted through its parameter count.
  done = benchmark('--config.model.n_layer=1', '--config_b=experiments/gpt_small.py:cpu',
                   '--config_b.batch_size=32', '--config_b.model.n_layer=3', '--steps=6',
                   '--warmup=1', '--config_b.parallel.cpu_compiler_options=')
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['pairs'] == 6  # each side named with its overrides (B's were left out)
  assert result['config_b'] == ('experiments/gpt_small.py:cpu --config_b.batch_size=32 '
                                '--config_b.model.n_layer=3 '
                                '--config_b.parallel.cpu_compiler_options='), result
  assert (result['a_cpu_compiler_options'], result['b_cpu_compiler_options']) == (
      parallel.auto_cpu_options(parallel.cpu_flags()), '')  # A's default 'auto', resolved
  assert result['config'].endswith('--config.batch_size=32 --config.model.n_layer=1'), result
  assert result['b_params'] > result['a_params'], result  # B: two more layers
  assert result['a_step_ms'] > 0 and result['b_step_ms'] > 0 and result['b_over_a'] > 0
  assert result['b_faster_share'] in [i / 6 for i in range(7)]


def test_profile_prints_where_the_step_time_went(tmp_path):
  done = benchmark('--config.model.n_layer=2', '--steps=1', '--warmup=1',
                   f'--profile_dir={tmp_path}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert glob.glob(str(tmp_path / 'plugins' / 'profile' / '*' / 'perfetto_trace.json.gz'))
  out = done.stdout.strip().splitlines()
  json.loads(out[-1])  # the JSON line stays last
  header = next(i for i, line in enumerate(out) if line.split() == ['ms/step', 'share', 'ops',
                                                                     'operation'])
  rows = [line.split() for line in out[header + 1:-1]]
  assert 5 <= len(rows) <= 20
  ms = [float(r[0]) for r in rows]
  assert ms == sorted(ms, reverse=True) and ms[0] > 0
  assert sum(float(r[1].rstrip('%')) for r in rows) <= 100.5
  # Named by the model's JAX operations, the two layers' ops merged (h_0, h_1 -> h_*).
  names = [r[3] for r in rows]
  assert any(n.endswith('h_*/c_fc/dot_general') for n in names), names
  assert not any('h_0' in n or 'h_1' in n for n in names), names


def test_profile_is_refused_with_the_comparisons():
  done = benchmark('--profile_dir=/tmp/unused', '--against_torch')
  assert done.returncode != 0 and '--profile_dir profiles a plain benchmark run' in done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # not the 80-line usage text


def test_steps_that_time_nothing_are_refused_by_the_flags():
  done = benchmark('--steps=0')  # compiled, then failed in a TypeError
  assert done.returncode != 0 and 'Traceback' not in done.stderr
  assert 'flag --steps=0: 0 is not a positive integer' in done.stderr, done.stderr[-2000:]


def test_an_override_of_config_b_is_named_with_its_flag():
  # n_layer is a key of A's experiment (a GPT), not of B's (a CNN): B's override is named.
  done = benchmark('--config.model.n_layer=1', '--config_b=experiments/mnist_cnn.py:cpu',
                   '--config_b.model.n_layer=2')
  assert done.returncode != 0 and 'Traceback' not in done.stderr
  assert ('a --config_b override names a key the experiment does not have: '
          'config_b.model.n_layer') in done.stderr


def test_a_setting_our_checks_refuse_is_one_line():
  done = benchmark('--config.model.n_head=5')  # was a 20-line traceback before the message
  assert done.returncode != 0 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines() == [
      'ValueError: config.model.n_embd=128 must be divisible by config.model.n_head=5.']


def test_an_override_of_a_key_the_experiment_lacks_is_named():
  done = benchmark('--config.model.dropoutrate=0.1')  # shared with launch.py (research/cli.py)
  assert done.returncode != 0 and 'Traceback' not in done.stderr
  assert ('a --config override names a key the experiment does not have: '
          'config.model.dropoutrate (did you mean config.model.dropout_rate?)') in done.stderr


def test_compile_only_gives_xla_s_flops_and_the_model_s():
  """XLA's cost analysis counts a loop body once (here the 2 micro-batches' loop): its figure
  is about half the step's; model_flops_per_step is the whole step as MFU counts it."""
  done = benchmark('--config.model.n_layer=1', '--config.grad_accum_steps=2', '--compile_only')
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['flops_per_step_counts'] == 'one device; loop bodies once'
  ratio = result['model_flops_per_step'] / (result['flops_per_step'] * result['device_count'])
  assert 1.6 < ratio < 2.4, result


def test_matmul_floor_times_every_product_of_the_step():
  """--matmul_floor: each product of the step timed alone, listed, and summed beside the step
  time; their FLOPs are the step's (one layer of width 128, 4 heads, context 128 in two query
  blocks of 64, 2 micro-batches of 16 sequences), counted here from the shapes."""
  done = benchmark('--config.model.n_layer=1', '--config.grad_accum_steps=2',
                   '--config.parallel.num_devices=1', '--steps=2', '--warmup=1',
                   '--matmul_floor')
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  r = json.loads(lines[-1])
  # gpt_small.py:cpu computes its batch as 2 parts at once (cpu_batch_parts): so are the products.
  header = lines.index("The step's matrix products timed alone (ms per step, GFLOP/s, "
                       "2 part-sized products at once):")
  table, summary = lines[header + 1:-2], lines[-2]
  # 5 dense layers (c_attn, attn_proj, c_fc, mlp_proj, the head) x 3 products, 2 blocks x 6.
  assert len(table) == 15 + 12, table
  assert [line.split(None, 2)[2] for line in table[-6:]] == [
      f'attention, queries 64-128: {p}' for p in ('scores', 'values', 'dP', 'dV', 'dQ', 'dK')]
  ms = [float(line.split()[0]) for line in table]
  assert r['matmul_floor_dense_ms'] == pytest.approx(sum(ms[:15]), abs=0.01 * 15)
  assert r['matmul_floor_attention_ms'] == pytest.approx(sum(ms[15:]), abs=0.01 * 12)
  assert summary == (f"{r['matmul_floor_ms']:10.2f} ms in all, one product after another; "
                     f"the step: {r['step_ms']:.2f} ms")
  width, tokens, vocab = 128, 32 * 128, r['vocab_size']
  dense = 6 * tokens * (12 * width ** 2 + width * vocab)  # the head: the unpadded rows on CPUs
  attention = 12 * 32 * (64 * 64 + 64 * 128) * width  # 6 products; queries x keys seen
  assert r['matmul_floor_flops'] == dense + attention
  assert r['step_ms'] > 0 and r['device_count'] == 1


def test_matmul_floor_is_refused_where_it_does_not_apply():
  mlp = [sys.executable, '-m', 'research.benchmark', '--config=experiments/mnist_mlp.py:cpu']
  for done, message in (
      (benchmark('--matmul_floor', '--config_b=experiments/gpt_small.py:cpu'),
       '--matmul_floor goes with a plain benchmark'),
      (subprocess.run([*mlp, '--matmul_floor'], capture_output=True, text=True, check=False,
                      timeout=600), "--matmul_floor lists the products of GPTs; "
                                    "config.model.name is 'mlp'"),
      (benchmark('--matmul_floor'), "--matmul_floor times one device's products")):  # TINY: 8
    assert done.returncode != 0 and 'Traceback' not in done.stderr, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
