"""Test set-up: 8 simulated CPU devices (before JAX is imported), JAX's persistent compilation
cache in a folder of the session's own, and shared fixtures."""
import os
import pathlib
import shutil
import tempfile

# The tests compile far more than they run: most train a few steps of small models, in this
# process and in launch.py subprocesses. LLVM's lowest optimisation level for XLA's CPU code
# halves that compilation (a 1-layer GPT's first step in launch.py: 8.3 s -> 4.4 s) and slows
# its execution (the 150-step shakespeare test: 59 -> 76 s); over the suite it saves about a
# tenth of the CPU time (BENCHMARKS.md, nineteenth session). XLA's graph passes are the same;
# the numbers agree with the default's to float32 rounding (the golden losses, computed the
# default way, still match to 6 digits).
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's subprocess: `devices` simulated CPU devices, compiled as here."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
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
