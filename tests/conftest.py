"""Test set-up: 8 simulated CPU devices (before JAX is imported), JAX's persistent compilation
cache in a folder of the session's own, and shared fixtures."""
import os
import pathlib
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'


def pytest_configure(config):
  """Many tests compile the same small steps again (a GPT of the same shapes, built anew): this
  process loads them from a cache of its own, as launch.py does from ~/.cache/research (a
  measured 41 loads saved 62 s of compilation in four of the test files). The launch.py and
  benchmark subprocesses that tests start share a second one (JAX_COMPILATION_CACHE_DIR), so
  that tests neither fill the user's ~/.cache/research nor write one cache from two pytest-xdist
  workers at once (JAX writes an entry in place, not atomically)."""
  folder = tempfile.mkdtemp(prefix='research-tests-jax-cache-')
  config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  # Set in every process (a pytest-xdist worker inherits its controller's environment).
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(folder, 'subprocesses')


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data (real MNIST test set, tiny-shakespeare); skips when it is absent."""
  if not (SHARED_DATA / 't10k-images-idx3-ubyte.gz').exists():
    pytest.skip(f'real data folder {SHARED_DATA} is absent (the project\'s machines keep the '
                'real MNIST test set and tiny-shakespeare there; see README.md)')
  return SHARED_DATA
