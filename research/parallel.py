"""Devices, meshes and compiled steps.

The default (`parallel.mode='jit'`) compiles the pure steps with `jax.jit` over a `Mesh` whose
'data' axis spans every device of every process: the batch is split along 'data', the train
state is replicated, and XLA inserts the gradient all-reduce. The same code runs on one CPU
core and on a TPU pod. `parallel.mode='pmap'` wraps the *same* step functions in `jax.pmap`
(gradients averaged by `lax.pmean` inside the step); it is kept for users who ask for pmap and
is tested to give the same numbers.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

PMAP_AXIS = 'batch'


def devices(num_devices: int = 0) -> list:
  """All devices of all processes, or the first `num_devices` (single-process only)."""
  if not num_devices:
    return jax.devices()
  if jax.process_count() > 1 or num_devices > jax.device_count():
    raise ValueError(f'config.parallel.num_devices={num_devices}, but there are '
                     f'{jax.device_count()} devices in {jax.process_count()} process(es); use 0 '
                     '(all devices) or a number of this process\'s devices.')
  return jax.devices()[:num_devices]


def make_mesh(num_devices: int = 0) -> Mesh:
  return Mesh(np.asarray(devices(num_devices)), ('data',))


def check_batch_size(batch_size: int, grad_accum_steps: int = 1, num_devices: int = 0):
  """Fails before any compilation when the global batch cannot be split evenly."""
  n = len(devices(num_devices))
  if batch_size % n:
    raise ValueError(
        f'config.batch_size={batch_size} is not divisible by the number of devices ({n}); '
        f'use a multiple of {n}, e.g. {max(1, batch_size // n) * n}.')
  if batch_size % (n * grad_accum_steps):
    raise ValueError(f'config.batch_size={batch_size} must be divisible by devices x '
                     f'config.grad_accum_steps = {n} x {grad_accum_steps}.')


@dataclasses.dataclass
class Compiled:
  """Steps compiled for one parallel mode, and how to move data in and out of them."""
  init_state: Callable[..., Any]   # (rng) -> state on the devices
  train_step: Callable[..., Any]   # (state, batch, rng) -> (state, metrics)
  eval_step: Callable[..., Any]    # (state, batch) -> sums
  put_batch: Callable[[Any], Any]  # this process's numpy batch -> device arrays
  put_state: Callable[[Any], Any]  # a restored (replicated) state -> the layout the steps use
  get_state: Callable[[Any], Any]  # the steps' layout -> a replicated state (to checkpoint)
  get_metrics: Callable[[Any], Any]  # step outputs -> one copy (still on the device)
  state_sharding: Any


def compile_steps(mode: str, mesh: Mesh, init_fn: Callable, make_steps: Callable) -> Compiled:
  """`make_steps(axis_name)` returns (train_step, eval_step) built for that axis (or None)."""
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  init_state = jax.jit(init_fn, out_shardings=replicated)
  if mode == 'jit':
    train_step, eval_step = make_steps(None)
    return Compiled(
        init_state=init_state,
        train_step=jax.jit(train_step, in_shardings=(replicated, data, replicated),
                           out_shardings=(replicated, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(replicated, data), out_shardings=replicated),
        put_batch=lambda batch: jax.tree.map(
            functools.partial(jax.make_array_from_process_local_data, data), batch),
        put_state=lambda state: state, get_state=lambda state: state,
        get_metrics=lambda metrics: metrics, state_sharding=replicated)
  if mode == 'pmap':
    train_step, eval_step = make_steps(PMAP_AXIS)
    devices = list(mesh.devices.flat)
    n = len(devices)
    stacked = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
    shard = lambda x: jax.device_put(x.reshape(n, -1, *x.shape[1:]), stacked)
    replicate = lambda x: jax.device_put(jnp.broadcast_to(x, (n, *x.shape)), stacked)
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    return Compiled(
        init_state=init_state,
        train_step=jax.pmap(train_step, axis_name=PMAP_AXIS, in_axes=(0, 0, None),
                            donate_argnums=0, devices=devices),
        eval_step=jax.pmap(eval_step, axis_name=PMAP_AXIS, devices=devices),
        put_batch=lambda batch: jax.tree.map(shard, batch),
        put_state=lambda state: jax.tree.map(replicate, state),
        get_state=lambda state: jax.device_put(first(state), replicated),
        get_metrics=first, state_sharding=replicated)
  raise ValueError(f'config.parallel.mode={mode!r}: use jit or pmap.')
