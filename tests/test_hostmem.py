"""research/hostmem.py: huge pages (default) and kept freed memory (opt-in) cut page faults."""
import ast
import os
import platform
import subprocess
import sys

import pytest

from research import hostmem
from tests.conftest import ROOT

# As XLA does on a CPU: a large temporary malloc'd, written and freed on a worker thread, once
# per step. The probe calls `configure` as an entry point does (so huge pages may re-execute
# it) and prints whether freed memory is kept, GLIBC_TUNABLES and each step's page faults.
_PROBE = """
from research import hostmem
hostmem.configure(entry_point=True)
import ctypes, os, resource, threading
tuned = hostmem.keep_freed_memory()
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
print(tuned, os.environ.get('GLIBC_TUNABLES', '-'), *faults)
"""


def _read(path):
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except OSError:
    return ''


PAGES = (256 << 20) // 4096
GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def _probe(**env_overrides):
  env = {name: value for name, value in os.environ.items()  # no other malloc settings
         if name not in ('XLA_FLAGS', 'GLIBC_TUNABLES', 'LD_PRELOAD')
         and not name.startswith(('MALLOC_', 'RESEARCH_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), **env_overrides)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  return out[0] == 'True', out[1], [int(n) for n in out[2:]]


@pytest.mark.skipif(not GLIBC, reason='the tuning is for glibc malloc')
def test_kept_memory_stops_steps_page_faulting():
  tuned, _, faults = _probe(RESEARCH_KEEP_FREED_MEMORY='1', RESEARCH_HUGE_PAGES='0')
  untuned, tunables, faults_default = _probe(RESEARCH_HUGE_PAGES='0')
  assert tuned and not untuned and tunables == '-'
  # Tuned: later steps reuse the first step's pages.
  assert all(n < PAGES * 0.01 for n in faults[1:]), faults
  # Default glibc: mmapped and unmapped every time, so every step faults all 65,536 pages in
  # (unless the kernel backs every mmap with huge pages, THP 'always': then far fewer faults).
  if '[always]' not in _read(hostmem.THP_ENABLED):
    assert faults[0] >= PAGES * 0.9, faults
    assert all(n >= PAGES * 0.9 for n in faults_default), faults_default


@pytest.mark.skipif(not GLIBC or '[madvise]' not in _read(hostmem.THP_ENABLED)
                    or tuple(map(int, platform.libc_ver()[1].split('.')[:2])) < (2, 35),
                    reason="needs glibc >= 2.35 and the kernel's THP setting 'madvise'")
def test_huge_pages_by_default_fault_far_fewer_pages():
  kept, tunables, faults = _probe()  # as an entry point run with a clean environment
  assert not kept and tunables == hostmem.HUGE_PAGES_TUNABLE  # re-executed with it, once
  # 2 MB pages: 128 faults per step where 4 KB pages took 65,536 (the kernel falls back to
  # small pages where it cannot find free huge ones, hence the margin).
  assert all(n < PAGES * 0.25 for n in faults), faults
  _, tunables, _ = _probe(GLIBC_TUNABLES='glibc.malloc.arena_max=4')
  assert tunables == 'glibc.malloc.arena_max=4:' + hostmem.HUGE_PAGES_TUNABLE  # kept theirs


@pytest.mark.parametrize('env,thp,reexec', [
    ({}, 'always [madvise] never', True),
    ({'RESEARCH_HUGE_PAGES': '0'}, 'always [madvise] never', False),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'always [madvise] never', False),  # theirs
    ({'JAX_PLATFORMS': 'cuda'}, 'always [madvise] never', False),
    ({}, 'always madvise [never]', False),
    ({}, '[always] madvise never', False),
])
def test_huge_pages_reexecute_only_where_they_help(monkeypatch, tmp_path, env, thp, reexec):
  monkeypatch.setattr(hostmem, '_glibc_malloc', lambda min_version=(2, 0): True)
  for name in ('RESEARCH_HUGE_PAGES', 'GLIBC_TUNABLES'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  (tmp_path / 'enabled').write_text(thp + '\n')
  monkeypatch.setattr(hostmem, 'THP_ENABLED', str(tmp_path / 'enabled'))
  calls = []
  monkeypatch.setattr(os, 'execv', lambda *args: calls.append(args))
  hostmem.use_huge_pages()
  assert calls == ([(sys.executable, sys.orig_argv)] if reexec else [])
  if reexec:
    assert os.environ['GLIBC_TUNABLES'] == hostmem.HUGE_PAGES_TUNABLE


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
    ('launch.py', "hostmem.configure(entry_point=__name__ == '__main__')"),
    ('research/benchmark.py', "hostmem.configure(entry_point=__name__ == '__main__')"),
    ('research/torch_reference.py', 'hostmem.keep_freed_memory()'),  # PyTorch: no huge pages
])
def test_entry_points_tune_before_any_other_import(entry, call):
  """The tuning only reaches threads created after it (and a re-execution should come before
  any work): it must be the entry's first statement."""
  body = ast.parse((ROOT / entry).read_text()).body
  first, second = body[1], body[2]  # body[0] is the docstring
  assert isinstance(first, ast.ImportFrom) and first.module == 'research', ast.dump(first)
  assert [a.name for a in first.names] == ['hostmem']
  assert ast.unparse(second) == call
