"""`python -m research.benchmark --against_torch`: ours and the PyTorch reference, alternated."""
import json
import subprocess
import sys

import pytest

from research import benchmark


def test_config_overrides_are_forwarded_in_both_spellings():
  args = ['--config=experiments/gpt_small.py:nano', '--config.batch_size=4', '--steps=3',
          '--config.model.n_layer', '1', '--against_torch']
  assert benchmark.config_overrides(args) == ['--config.batch_size=4', '--config.model.n_layer=1']


def test_a_failing_process_shows_its_output():
  command = [sys.executable, '-c', 'print("partial"); import sys; sys.exit("boom")']
  with pytest.raises(RuntimeError, match=r'(?s)exit status 1.*partial.*boom'):
    benchmark._last_json_line(command)  # pylint: disable=protected-access


@pytest.mark.filterwarnings('ignore')
def test_against_torch_runs_both_with_the_same_overrides():
  pytest.importorskip('torch')
  done = subprocess.run(
      [sys.executable, '-m', 'research.benchmark', '--config=experiments/gpt_small.py:cpu',
       '--config.batch_size=32', '--config.model.n_layer', '1', '--steps=2', '--warmup=1',
       '--against_torch', '--rounds=2'],
      capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout.strip().splitlines()
  assert [line.split(':')[0] for line in out[:-1]] == ['round 1/2', 'round 2/2']
  result = json.loads(out[-1])
  assert result['batch_size'] == 32 and result['config'] == 'experiments/gpt_small.py:cpu'
  assert len(result['rounds']) == 2
  for r in result['rounds']:
    assert r['ours_step_ms'] > 0 and r['torch_step_ms'] > 0
    assert r['speedup'] == pytest.approx(r['torch_step_ms'] / r['ours_step_ms'])
  assert min(r['speedup'] for r in result['rounds']) <= result['speedup'] <= max(
      r['speedup'] for r in result['rounds'])
