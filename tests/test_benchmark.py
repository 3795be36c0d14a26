"""`python -m research.benchmark --against_torch`: ours and the PyTorch reference, alternated."""
import json
import subprocess
import sys

import pytest

from research import benchmark


def test_config_overrides_become_flags_again():
  values = {'batch_size': 4, 'model.scan_layers': True, 'data.source': 'a b.txt'}
  assert benchmark.override_flags(values) == [
      '--config.batch_size=4', '--config.model.scan_layers=True', '--config.data.source=a b.txt']


def test_a_failing_process_shows_its_output():
  command = [sys.executable, '-c', 'print("partial"); import sys; sys.exit("boom")']
  with pytest.raises(RuntimeError, match=r'(?s)exit status 1.*partial.*boom'):
    benchmark._last_json_line(command)  # pylint: disable=protected-access


@pytest.mark.filterwarnings('ignore')
def test_against_torch_runs_both_with_the_same_overrides():
  # Overrides in all three spellings: =VALUE, a separate VALUE, and a bare boolean.
  pytest.importorskip('torch')
  done = subprocess.run(
      [sys.executable, '-m', 'research.benchmark', '--config=experiments/gpt_small.py:cpu',
       '--config.batch_size=32', '--config.model.n_layer', '1', '--config.model.scan_layers',
       '--steps=2', '--warmup=1',
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
    # One layer, not the experiment's two (462K parameters), in both: the override reached them.
    assert 0 < r['ours_params'] < 400_000 and 0 < r['torch_params'] < 400_000
  assert min(r['speedup'] for r in result['rounds']) <= result['speedup'] <= max(
      r['speedup'] for r in result['rounds'])
