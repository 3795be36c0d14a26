"""Test set-up: 8 simulated CPU devices (before JAX is imported) and shared fixtures."""
import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data (real MNIST test set, tiny-shakespeare); skips when it is absent."""
  if not (SHARED_DATA / 't10k-images-idx3-ubyte.gz').exists():
    pytest.skip(f'real data folder {SHARED_DATA} is absent (the project\'s machines keep the '
                'real MNIST test set and tiny-shakespeare there; see README.md)')
  return SHARED_DATA
