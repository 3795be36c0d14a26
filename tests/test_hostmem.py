"""research/hostmem.py: freed host memory stays in the process, so steps stop page-faulting."""
import ast
import os
import platform
import subprocess
import sys

import pytest

from research import hostmem
from tests.conftest import ROOT

# As XLA does on a CPU: a large temporary malloc'd, written and freed on a worker thread, once
# per step. Prints whether the tuning was applied and the page faults of each of 3 steps.
_PROBE = """
from research import hostmem
tuned = hostmem.keep_freed_memory()
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
def worker():
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=worker)
thread.start()
thread.join()
print(tuned, *faults)
"""


def _probe(**env_overrides):
  env = {name: value for name, value in os.environ.items()  # no other malloc settings
         if name not in ('XLA_FLAGS', 'GLIBC_TUNABLES', 'LD_PRELOAD')
         and not name.startswith('MALLOC_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), **env_overrides)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  return out[0] == 'True', [int(n) for n in out[1:]]


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='the tuning is for glibc malloc')
def test_steps_stop_page_faulting():
  tuned, faults = _probe(RESEARCH_KEEP_FREED_MEMORY='1')
  untuned, faults_default = _probe(RESEARCH_KEEP_FREED_MEMORY='0')
  assert tuned and not untuned
  pages = (256 << 20) // 4096
  # Tuned: later steps reuse the first step's pages.
  assert all(n < pages * 0.01 for n in faults[1:]), faults
  # Default glibc: mmapped and unmapped every time, so every step faults all 65,536 pages in
  # (unless the kernel backs every mmap with huge pages, THP 'always': then far fewer faults).
  if '[always]' not in _read('/sys/kernel/mm/transparent_hugepage/enabled'):
    assert faults[0] >= pages * 0.9, faults
    assert all(n >= pages * 0.9 for n in faults_default), faults_default


def _read(path):
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except OSError:
    return ''


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


@pytest.mark.parametrize('entry', ['launch.py', 'research/benchmark.py',
                                   'research/torch_reference.py'])
def test_entry_points_tune_before_any_other_import(entry):
  """The tuning only reaches threads created after it: it must be the entry's first statement."""
  body = ast.parse((ROOT / entry).read_text()).body
  first, second = body[1], body[2]  # body[0] is the docstring
  assert isinstance(first, ast.ImportFrom) and first.module == 'research', ast.dump(first)
  assert [a.name for a in first.names] == ['hostmem']
  assert ast.unparse(second) == 'hostmem.keep_freed_memory()'
