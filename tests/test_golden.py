"""Golden losses: the first steps of two real runs, pinned to 6 digits.

Any change to what a run computes (initialisation, data order, tokenization, the loss, the
optimizer, the schedule, dropout's bits) moves these numbers; a change that should not (a
refactor, a faster kernel) must leave them. The runs are the real `train.train_and_evaluate` on
data made here (no download, no Python-version-dependent corpus), with the 8 test devices.

Refresh them only for a change meant to alter the numbers, and say so in its commit: run
`python -m pytest -q tests/test_golden.py`, check that the new values are plausible (a GPT's
first loss near ln(vocabulary) = 5.55 nats for bytes), and copy them from the failure message
into GOLDEN. They were computed with the versions in requirements-test.txt on a 2-core x86 CPU.
"""
import numpy as np
import pytest

from research import train
from tests.test_train import cpu_config, read_metrics

# (step, split) -> loss, as metrics.jsonl records them.
GOLDEN = {
    'gpt_small': {(1, 'train'): 5.579999923706055, (2, 'train'): 5.571866989135742,
                  (3, 'train'): 5.517963409423828, (3, 'eval'): 5.404731750488281},
    'linear_regression': {(1, 'train'): 0.17118191719055176, (2, 'train'): 0.1981039047241211,
                          (3, 'train'): 0.23862189054489136, (3, 'eval'): 0.22988088428974152},
}


def words(path):
  """20,000 words of a ten-word vocabulary drawn by numpy (`Generator.choice` may draw others in
  another numpy version: numpy is pinned in requirements.txt)."""
  vocabulary = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran', 'far']
  path.write_text(' '.join(np.random.default_rng(0).choice(vocabulary, 20000)))
  return str(path)


@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_the_first_losses_are_the_golden_ones(name, tmp_path):
  steps = {'total_steps': 3, 'log_every_steps': 1, 'eval_every_steps': 3,
           'checkpoint_every_steps': 3}
  if name == 'gpt_small':  # one layer, bytes of the text above
    steps.update({'data.source': words(tmp_path / 'words.txt'), 'model.n_layer': 1,
                  'sample.max_new_tokens': 0, 'max_eval_batches': 2})
  train.train_and_evaluate(cpu_config(name, **steps), str(tmp_path / 'run'))
  losses = {(r['step'], r['split']): r['loss'] for r in read_metrics(str(tmp_path / 'run'))}
  assert losses == pytest.approx(GOLDEN[name], rel=1e-6, abs=0), (
      f'{name}: {losses} (see the module docstring before refreshing GOLDEN)')
