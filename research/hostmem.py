"""Host memory for CPU training: transparent huge pages by default, optionally never freeing.

On a CPU backend XLA allocates each step's temporary buffer (328 MB for the nano GPT, GBs for
shakespeare_char) with malloc on one of its worker threads and frees it at the end of the step.
glibc serves an allocation that large on a worker thread with a fresh mmap and gives it back
with munmap, so every step page-faults its whole working set in again, the kernel zeroing every
page: for `experiments/gpt_small.py:nano` 85k page faults and ~140 ms of system time per 290 ms
step (BENCHMARKS.md). Two remedies, both set up by `configure()`:

- Huge pages (default): glibc's `glibc.malloc.hugetlb=1` tunable asks the kernel for 2 MB
  transparent huge pages for malloc's mmaps, 512x fewer faults. Tunables are read only when a
  process starts, so an entry point run as a script re-executes itself once with
  GLIBC_TUNABLES set (before anything else is imported). The GPTs' steps are 1.2x faster on
  the 2-core CPU; the image models' unchanged. RESEARCH_HUGE_PAGES=0 turns it off.
- Keeping freed memory (opt-in, RESEARCH_KEEP_FREED_MEMORY=1): `keep_freed_memory()` makes
  glibc serve every thread from its main heap, never mmap, and never trim that heap, so each
  step reuses the previous step's pages (0 faults). It is off by default because one heap for
  all threads is slower where many threads allocate small blocks: LeNet's 9 ms step took 15 ms
  with it. The cost: the process keeps its peak host memory until it exits.

Both must happen before any other thread exists (before numpy, JAX or absl are imported):
arenas that worker threads already own are not changed. Entry points (`launch.py`,
`research.benchmark`) call `configure` first. Neither does anything off glibc, under another
malloc (LD_PRELOAD), or when an accelerator plugin for JAX is installed or JAX_PLATFORMS names
one (device buffers are not host malloc).
"""
import ctypes
import importlib.util
import os
import platform
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ACCELERATOR_PACKAGES = ('jax_plugins', 'libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin')


def accelerator_expected() -> bool:
  """True when JAX will (or may) run on an accelerator: JAX_PLATFORMS names one, or, with
  JAX_PLATFORMS unset, a GPU/TPU plugin is installed. Decided without importing JAX."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PACKAGES)


THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def configure(entry_point: bool) -> None:
  """Sets up host memory for a CPU training process; `entry_point`: this module is running as
  a script (`__name__ == '__main__'`), which may then be re-executed for huge pages."""
  if entry_point:
    use_huge_pages()
  keep_freed_memory()


def _glibc_malloc(min_version=(2, 0)) -> bool:
  """glibc's malloc of at least `min_version` serves this process."""
  if platform.system() != 'Linux':
    return False
  libc, version = platform.libc_ver()
  try:
    at_least = tuple(int(n) for n in version.split('.')[:2]) >= min_version
  except ValueError:
    return False
  # jemalloc, tcmalloc, mimalloc under LD_PRELOAD: not glibc's.
  return libc == 'glibc' and at_least and 'malloc' not in os.environ.get('LD_PRELOAD', '')


def use_huge_pages() -> bool:
  """Re-executes this process (same interpreter, same arguments) with glibc's malloc using
  transparent huge pages, unless it already does, RESEARCH_HUGE_PAGES=0, JAX may run on an
  accelerator, or the kernel's THP setting is 'never' (nothing to ask for) or 'always' (glibc
  gets them without asking). Returns False where it does not re-execute."""
  if os.environ.get('RESEARCH_HUGE_PAGES', '1') == '0':
    return False
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables or not _glibc_malloc((2, 35)) or accelerator_expected():
    return False
  try:
    with open(THP_ENABLED, encoding='ascii') as f:
      if '[madvise]' not in f.read():
        return False
  except OSError:
    return False
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))
  try:
    os.execv(sys.executable, sys.orig_argv)
  except OSError:  # carry on without: only slower
    return False
  return True  # not reached: execv replaced the process


def keep_freed_memory() -> bool:
  """With RESEARCH_KEEP_FREED_MEMORY=1, tunes glibc's malloc for a CPU training process;
  returns whether it did."""
  if os.environ.get('RESEARCH_KEEP_FREED_MEMORY', '0') != '1':
    return False
  if not _glibc_malloc() or accelerator_expected():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  # One arena for all threads (the main heap), no mmap for large blocks, no trimming (-1 turns
  # it off): freed blocks stay in the heap for the next step.
  return all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
