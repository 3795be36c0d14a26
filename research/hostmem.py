"""Host memory for CPU training: each step reuses the previous step's memory.

On a CPU backend XLA allocates each step's temporary buffer (328 MB for the nano GPT, GBs for
shakespeare_char) with malloc and frees it at the end of the step. glibc serves an allocation
that large with a fresh mmap and gives it back with munmap, so every step page-faults its whole
working set in again, the kernel zeroing every page: for `experiments/gpt_small.py:nano` 85k
page faults and ~140 ms of system time per 290 ms step (BENCHMARKS.md).

`keep_freed_memory()`, which the entry points (`launch.py`, `research.benchmark`,
`research.torch_reference`) call first, makes glibc's main heap never mmap and never shrink
(mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1) and JAX run single-device CPU computations on the
calling thread (`jax_cpu_enable_async_dispatch=False`; computations over several devices stay
asynchronous), so XLA's buffers come from the main heap and a freed step's pages serve the
next step. Worker threads keep their own heaps (a block beyond their 64 MB is still mmapped).
2-core CPU: nano's step 1.3x faster, shakespeare_char's 1.35x, the image models' unchanged.
(Making the main heap every thread's, M_ARENA_MAX=1, with dispatch left asynchronous, did as
well for shakespeare_char but less for nano, and slowed LeNet's 9 ms step to 15 ms: its threads
contend for the one heap.) The cost: the process keeps its peak host memory until it exits.
RESEARCH_KEEP_FREED_MEMORY=0 in the environment leaves glibc's and JAX's defaults.

Nothing is changed off glibc, under another malloc (LD_PRELOAD), or when an accelerator plugin
for JAX is installed or JAX_PLATFORMS names one (device buffers are not host malloc). It runs
before anything else so that JAX's CPU client is created with the dispatch setting.
"""
import ctypes
import importlib.util
import os
import platform
import warnings

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

ACCELERATOR_PACKAGES = ('jax_plugins', 'libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin')


def accelerator_expected() -> bool:
  """True when JAX will (or may) run on an accelerator: JAX_PLATFORMS names one, or, with
  JAX_PLATFORMS unset, a GPU/TPU plugin is installed. Decided without importing JAX."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PACKAGES)


def keep_freed_memory(jax_on_main_thread: bool = True) -> bool:
  """Unless RESEARCH_KEEP_FREED_MEMORY=0, tunes glibc's malloc (and JAX's CPU dispatch, unless
  `jax_on_main_thread` is False) for a CPU training process; returns whether it did."""
  setting = os.environ.get('RESEARCH_KEEP_FREED_MEMORY', '1')
  if setting not in ('0', '1'):
    raise ValueError(f'RESEARCH_KEEP_FREED_MEMORY={setting!r}: use 1 (the default) or 0 to '
                     'leave host memory alone (research/hostmem.py).')
  if setting == '0' or platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  if accelerator_expected():
    return False
  if 'malloc' in os.environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc, mimalloc: not glibc's
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  # No mmap for large blocks, no trimming (-1 turns it off): freed blocks stay in the heap for
  # the next step.
  if not all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))):
    return False
  if jax_on_main_thread:
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():  # JAX read the setting already: too late
      warnings.warn('research.hostmem.keep_freed_memory() was called after JAX created its '
                    'backends, so CPU dispatch stays asynchronous and step buffers are not '
                    'reused; call it before anything uses JAX.', stacklevel=2)
    else:
      jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
