"""Host memory: optionally keep freed memory in the process instead of returning it to the OS.

On a CPU backend XLA allocates each step's temporary buffer (328 MB for the nano GPT, GBs for
shakespeare_char) with malloc on one of its worker threads and frees it at the end of the step.
glibc serves an allocation that large on a worker thread with a fresh mmap and gives it back
with munmap, so every step page-faults its whole working set in again, the kernel zeroing every
page: for `experiments/gpt_small.py:nano` 85k page faults and ~140 ms of system time per 290 ms
step (BENCHMARKS.md). With RESEARCH_KEEP_FREED_MEMORY=1 in the environment,
`keep_freed_memory()` makes glibc serve every thread from its main heap, never mmap, and never
trim that heap, so each step reuses the previous step's pages: the GPTs' steps are 1.06-1.4x
faster on the 2-core CPU. It is off by default because one heap for all threads is slower
where many threads allocate small blocks: LeNet's 9 ms step took 15 ms with it.

It must run before any other thread exists (before numpy, JAX or absl are imported): arenas
that worker threads already own are not changed. Entry points (`launch.py`, `research.benchmark`,
`research.torch_reference`) call it first. It does nothing off glibc, under another malloc
(LD_PRELOAD), or when an accelerator plugin for JAX is installed or JAX_PLATFORMS names one
(device buffers are not host malloc).
The cost: the process keeps its peak host memory until it exits.
"""
import ctypes
import importlib.util
import os
import platform

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


def keep_freed_memory() -> bool:
  """With RESEARCH_KEEP_FREED_MEMORY=1, tunes glibc's malloc for a CPU training process;
  returns whether it did."""
  if os.environ.get('RESEARCH_KEEP_FREED_MEMORY', '0') != '1':
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  if accelerator_expected():
    return False
  if 'malloc' in os.environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc, mimalloc: not glibc's
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  # One arena for all threads (the main heap), no mmap for large blocks, no trimming (-1 turns
  # it off): freed blocks stay in the heap for the next step.
  return all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
