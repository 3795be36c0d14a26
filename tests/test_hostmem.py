"""research/hostmem.py: steps reuse freed host memory instead of page-faulting it back in."""
import ast
import os
import platform
import subprocess
import sys

import pytest

from research import hostmem
from tests.conftest import ROOT

GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
PAGES = (256 << 20) // 4096  # in the malloc probe's 256 MB block

# A large block malloc'd, written and freed 3 times on the main thread, as XLA does with a
# step's temporaries. Prints whether the tuning was applied and each time's page faults.
_MALLOC_PROBE = """
from research import hostmem
tuned = hostmem.keep_freed_memory(jax_on_main_thread=False)
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, *faults)
"""

# A jitted function whose 64 MB result XLA allocates on every call (and frees when dropped).
# Prints whether the tuning was applied, whether dispatch is asynchronous and the page faults
# of 10 calls after 3 warm-up calls.
_XLA_PROBE = """
from research import hostmem
tuned = hostmem.keep_freed_memory()
import resource
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: x * 2)
for _ in range(3):  # the heap grows to its steady size
  f(x).block_until_ready()
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, jax.config.values['jax_cpu_enable_async_dispatch'], *faults)
"""


def _run(code, **env_overrides):
  env = {name: value for name, value in os.environ.items()  # no other malloc settings
         if name not in ('XLA_FLAGS', 'GLIBC_TUNABLES', 'LD_PRELOAD', 'RESEARCH_KEEP_FREED_MEMORY')
         and not name.startswith('MALLOC_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), **env_overrides)
  return subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, check=True,
                        capture_output=True, text=True, timeout=300).stdout.split()


def _read(path):
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except OSError:
    return ''


# Unless the kernel backs every mmap with huge pages (THP 'always': then far fewer faults),
# glibc's defaults map and unmap a large block each time: all its pages fault in each time.
THP_ALWAYS = '[always]' in _read('/sys/kernel/mm/transparent_hugepage/enabled')


@pytest.mark.skipif(not GLIBC, reason='the tuning is for glibc malloc')
def test_main_heap_reuses_freed_memory():
  tuned, *faults = _run(_MALLOC_PROBE)  # RESEARCH_KEEP_FREED_MEMORY unset: the default
  assert tuned == 'True'
  assert all(int(n) < PAGES * 0.01 for n in faults[1:]), faults  # the first time's pages
  tuned, *faults = _run(_MALLOC_PROBE, RESEARCH_KEEP_FREED_MEMORY='0')
  assert tuned == 'False'
  if not THP_ALWAYS:
    assert all(int(n) >= PAGES * 0.9 for n in faults), faults


@pytest.mark.skipif(not GLIBC, reason='the tuning is for glibc malloc')
def test_xla_buffers_stop_page_faulting_by_default():
  """End to end: XLA computes on the main thread, from the main heap, reusing its pages."""
  block = (64 << 20) // 4096
  tuned, asynchronous, *faults = _run(_XLA_PROBE)
  assert (tuned, asynchronous) == ('True', 'False')
  # Most calls fault nothing in (about 1 in 12 faulted a block in, here: a result freed only
  # after the next one was allocated, or a buffer allocated on another thread); all do without.
  assert sum(int(n) > block * 0.05 for n in faults) <= len(faults) // 2, faults
  tuned, asynchronous, *faults = _run(_XLA_PROBE, RESEARCH_KEEP_FREED_MEMORY='0')
  assert (tuned, asynchronous) == ('False', 'True')
  if not THP_ALWAYS:
    assert all(int(n) >= block * 0.9 for n in faults), faults


def test_unknown_setting_is_an_error_naming_the_choices(monkeypatch):
  monkeypatch.setenv('RESEARCH_KEEP_FREED_MEMORY', 'yes')
  with pytest.raises(ValueError, match=r"RESEARCH_KEEP_FREED_MEMORY='yes': use 1 .* or 0"):
    hostmem.keep_freed_memory()


def test_accelerator_expected_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('RESEARCH_KEEP_FREED_MEMORY', '1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not hostmem.accelerator_expected()
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert hostmem.accelerator_expected()
  assert not hostmem.keep_freed_memory()  # nothing to gain on accelerators: left alone
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('RESEARCH_KEEP_FREED_MEMORY', '0')
  assert not hostmem.keep_freed_memory()


@pytest.mark.parametrize('entry,call', [
    ('launch.py', 'hostmem.keep_freed_memory()'),
    ('research/benchmark.py', 'hostmem.keep_freed_memory()'),
    ('research/torch_reference.py', 'hostmem.keep_freed_memory(jax_on_main_thread=False)'),
])
def test_entry_points_tune_before_any_other_import(entry, call):
  """JAX reads the dispatch setting when it creates its CPU client: the tuning must be the
  entry's first statement."""
  body = ast.parse((ROOT / entry).read_text()).body
  first, second = body[1], body[2]  # body[0] is the docstring
  assert isinstance(first, ast.ImportFrom) and first.module == 'research', ast.dump(first)
  assert [a.name for a in first.names] == ['hostmem']
  assert ast.unparse(second) == call


@pytest.mark.skipif(not GLIBC, reason='the tuning is for glibc malloc')
def test_called_after_jax_started_it_warns_and_leaves_dispatch_alone():
  code = """
import warnings
import jax.numpy as jnp
jnp.ones(3)  # JAX's CPU backend exists from here on
from research import hostmem
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  tuned = hostmem.keep_freed_memory()
import jax
print(tuned, jax.config.values['jax_cpu_enable_async_dispatch'], len(caught))
print(caught[0].message)
"""
  tuned, asynchronous, warned, *message = _run(code)
  assert (tuned, asynchronous, warned) == ('True', 'True', '1')
  assert 'call it before anything uses JAX' in ' '.join(message)
