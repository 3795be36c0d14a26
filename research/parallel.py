"""Devices, the mesh, shardings and compiled steps.

The default (`parallel.mode='jit'`) compiles the pure steps with `jax.jit` over a `Mesh` with
axes ('data', 'fsdp', 'tensor') spanning every device of every process (`config.parallel.mesh`;
any axis may be 1, and -1 takes the devices left over). The batch is split over 'data' and
'fsdp'. Parameters and optimizer state are laid out by their *logical* axis names (models name
them with `nn.with_logical_partitioning`, e.g. GPT's ('embed', 'mlp')), mapped to mesh axes by
`config.parallel.rules`: with the default rules 'fsdp' shards parameters and optimizer state
(FSDP / ZeRO-3) and 'tensor' splits attention heads, MLP width and the vocabulary (Megatron-style
tensor parallelism). A model without names (the image models) is replicated, and tensor > 1
refused for it. XLA inserts the collectives. With mesh data=-1 (the default) this is plain data
parallelism.

`parallel.mode='pmap'` wraps the *same* step functions in `jax.pmap` (gradients averaged by
`lax.pmean` inside the step), for pure data parallelism within one process only; it is tested
to give the same numbers.

On CPUs the jitted steps are compiled with `config.parallel.cpu_compiler_options` (see
`compiler_options`; by default 'auto', chosen by the CPU's features); pmap mode cannot take
them and warns when they were set.
"""
import dataclasses
import functools
import math
import os
import warnings
from typing import Any, Callable

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

PMAP_AXIS = 'batch'
AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')  # the mesh axes the batch is split over


def devices(num_devices: int = 0) -> list:
  """All devices of all processes, or the first `num_devices` (single-process only)."""
  if not num_devices:
    return jax.devices()
  if jax.process_count() > 1 or num_devices > jax.device_count():
    raise ValueError(f'config.parallel.num_devices={num_devices}, but there are '
                     f'{jax.device_count()} devices in {jax.process_count()} process(es); use 0 '
                     '(all devices) or a number of this process\'s devices.')
  return jax.devices()[:num_devices]


def mesh_shape(parallel_config) -> tuple[int, ...]:
  """(data, fsdp, tensor) from config.parallel.mesh, -1 filled in; checked against devices."""
  n = len(devices(parallel_config.num_devices))
  sizes = [int(parallel_config.mesh[axis]) for axis in AXES]
  given = dict(zip(AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.parallel.mesh={given}: sizes must be positive, with at most one '
                     '-1 (the devices left over).')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes and n % known == 0:
    sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    fix = (f'the other axes multiply to {known}, which does not divide them' if -1 in sizes
           else f'make the product {n} (or set one axis to -1)')
    raise ValueError(f'config.parallel.mesh={given} multiplies to {known} devices, but there '
                     f'are {n}: {fix}. For data parallelism on any number of devices: '
                     '--config.parallel.mesh.data=-1 --config.parallel.mesh.fsdp=1 '
                     '--config.parallel.mesh.tensor=1.')
  return tuple(sizes)


def check_mode(mode: str):
  """Rejects an unknown config.parallel.mode, and pmap across several processes."""
  if mode not in ('jit', 'pmap'):
    raise ValueError(f'config.parallel.mode={mode!r}: use jit or pmap.')
  if mode == 'pmap' and jax.process_count() > 1:
    raise ValueError(f'config.parallel.mode=pmap is not supported with several processes '
                     f'({jax.process_count()} here): use config.parallel.mode=jit, which spans '
                     'the devices of every process.')


def make_mesh(parallel_config) -> Mesh:
  check_mode(parallel_config.get('mode', 'jit'))
  shape = mesh_shape(parallel_config)
  return Mesh(device_grid(devices(parallel_config.num_devices), shape), AXES)


def device_grid(devs: list, shape: tuple[int, ...]) -> np.ndarray:
  """The devices laid out as the mesh (data, fsdp, tensor: the most talkative axis last). The
  TPU chips of one host by their links (`mesh_utils.create_device_mesh`, as `jax.make_mesh`
  calls it: each axis' collectives along rings of neighbouring chips; JAX's docs give v3's 8
  chips as 0 1 2 3 6 7 4 5); other devices, several processes (a layout by links can give a
  tensor group chips of two hosts, which `check_process_rows` refuses; not tried on a pod), or a
  shape the links cannot take, in jax.devices() order (process by process)."""
  if devs[0].platform == 'tpu' and len({d.process_index for d in devs}) == 1:
    try:  # jax.make_mesh splits physical axes on v5e only
      return mesh_utils.create_device_mesh(
          shape, devs, allow_split_physical_axes=devs[0].device_kind in ('TPU v5 lite',
                                                                         'TPU v5e'))
    except (ValueError, NotImplementedError, AssertionError):
      pass
  return np.asarray(devs).reshape(shape)


def all_cpu(mesh: Mesh) -> bool:
  return all(device.platform == 'cpu' for device in mesh.devices.flat)


def batch_parts(parallel_config, mesh: Mesh) -> int:
  """`config.parallel.cpu_batch_parts` on a mesh of CPUs, 1 on accelerators."""
  return parallel_config.cpu_batch_parts if all_cpu(mesh) else 1


def check_batch_size(batch_size: int, grad_accum_steps: int, mesh: Mesh,
                     eval_batch_size: int = 0, parts: int = 1):
  """Fails before any compilation when a global batch cannot be split evenly."""
  n = math.prod(mesh.shape[a] for a in BATCH)
  whole = n * grad_accum_steps * parts  # what must divide batch_size
  for key, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
    if size % n:
      step = whole if key == 'batch_size' else n
      raise ValueError(
          f'config.{key}={size} is not divisible by the number of devices it is split over '
          f'({n} = mesh data x fsdp); use a multiple of {n}, e.g. {max(1, size // step) * step}.')
  if batch_size % whole:
    names, sizes = 'devices x config.grad_accum_steps', f'{n} x {grad_accum_steps}'
    if parts > 1:
      names, sizes = names + ' x config.parallel.cpu_batch_parts', sizes + f' x {parts}'
    raise ValueError(f'config.batch_size={batch_size} must be divisible by {names} = {sizes}, '
                     f'e.g. {max(1, batch_size // whole) * whole}.')
  check_process_rows(mesh, batch_size)


def check_process_rows(mesh: Mesh, batch_size: int, process_of=lambda d: d.process_index):
  """Each process loads its own B/P rows of every global batch (research/data), which
  `put_batch` places on that process's devices; fails unless the mesh gives each process B/P
  rows that no other process holds, since otherwise the global batch would be assembled wrongly
  without any error (e.g. 2 processes with mesh data=1, tensor=-1: every device holds the
  whole batch). Which rows a process gets does not matter (the batch is only permuted)."""
  owners = {}
  for device, (rows,) in NamedSharding(mesh, P(BATCH)).devices_indices_map(
      (batch_size,)).items():
    owners.setdefault(process_of(device), set()).update(range(*rows.indices(batch_size)))
  count = len(owners)
  if count == 1:
    return
  if any(len(rows) != batch_size // count for rows in owners.values()):  # shared or uneven
    raise ValueError(
        f'config.parallel.mesh={dict(mesh.shape)} does not give each of the {count} '
        "processes its own rows of the batch (each loads only its share): make data x fsdp a "
        f'multiple of {count} and tensor a divisor of the devices per process, so that '
        'tensor parallelism stays within a process.')


def state_shardings(abstract_boxed_state, mesh: Mesh, rules) -> Any:
  """A NamedSharding per state leaf, from the logical names the model gave its parameters.

  Fails, naming the config to change, where a mesh axis would split a dimension it does not
  divide (e.g. 4 attention heads over tensor=8), and for tensor > 1 when no parameter is split
  over 'tensor' (a model without logical names: every tensor device would compute the same).
  """
  specs = nn.get_partition_spec(abstract_boxed_state)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  is_spec = lambda x: isinstance(x, P)
  logical = jax.tree.leaves(specs, is_leaf=is_spec)
  placed = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  values = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_boxed_state))[0]
  sizes = dict(mesh.shape)
  as_tuple = lambda axes: (axes,) if isinstance(axes, str) else tuple(axes or ())  # a spec entry
  for (path, value), names, sharding in zip(values, logical, placed):
    for dim, (size, axes) in enumerate(zip(value.shape, map(as_tuple, sharding.spec))):
      ways = math.prod(sizes[a] for a in axes)
      if size % ways:
        name = names[dim] if dim < len(names) else None
        raise ValueError(
            f'{jax.tree_util.keystr(path, simple=True, separator="/")} (shape {value.shape}) '
            f'would be split {ways} ways along its axis {dim} ({name!r}, {size} long) by mesh '
            f'axes {axes} (config.parallel.mesh={sizes}): {size} is not divisible by {ways}. '
            f'Make those mesh axes divide it, map {name!r} elsewhere in config.parallel.rules, '
            'or change the model size.')
  uses = {a for sharding in placed for axes in sharding.spec for a in as_tuple(axes)}
  if sizes['tensor'] > 1 and 'tensor' not in uses:
    raise ValueError(
        f'config.parallel.mesh.tensor={sizes["tensor"]}, but config.parallel.rules split no '
        "parameter of this model over 'tensor' (it names no such axes): every tensor device "
        'would compute the same rows. Use those devices for data (or fsdp) instead.')
  return shardings


@dataclasses.dataclass
class Compiled:
  """Steps compiled for one parallel mode, and how to move data in and out of them."""
  init_state: Callable[..., Any]   # (rng) -> state on the devices
  train_step: Callable[..., Any]   # (state, batch, rng, schedule) -> (state, metrics)
  eval_step: Callable[..., Any]    # (state, batch) -> sums
  put_batch: Callable[[Any], Any]  # this process's numpy batch -> device arrays
  put_state: Callable[[Any], Any]  # a restored state -> the layout the steps use
  get_state: Callable[[Any], Any]  # the steps' layout -> the checkpointed layout
  get_metrics: Callable[[Any], Any]  # step outputs -> one copy (still on the device)
  state_sharding: Any              # a NamedSharding per leaf of the (checkpointed) state


# XLA's CPU backend runs matmuls in YNNPACK fusions by default; with this option YNNPACK keeps
# the reductions and Eigen runs the matmuls.
EIGEN_MATMULS = 'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'


def _cpuinfo(field: str, path: str = '/proc/cpuinfo') -> str | None:
  """The first `field` line of /proc/cpuinfo (Linux), or None where there is none."""
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      for line in f:
        if line.split(':')[0].strip() == field:
          return line.partition(':')[2].strip()
  except OSError:
    pass
  return None


def cpu_flags(path: str = '/proc/cpuinfo') -> set[str] | None:
  """This machine's x86 CPU feature flags (Linux), or None where they cannot be read."""
  flags = _cpuinfo('flags', path)
  return None if flags is None else set(flags.split())


def cpu_model() -> str | None:
  """This machine's CPU as Linux names it (e.g. 'AMD EPYC'), or None: for benchmark records."""
  return _cpuinfo('model name')


def is_auto(spec: str) -> bool:
  """Whether `config.parallel.cpu_compiler_options` is 'auto' (any case, spaces around)."""
  return spec.strip().lower() == 'auto'


def resolved_cpu_options(spec: str) -> str:
  """`config.parallel.cpu_compiler_options` with 'auto' replaced by its choice here."""
  return auto_cpu_options(cpu_flags()) if is_auto(spec) else spec


def auto_cpu_options(flags: set[str] | None) -> str:
  """What `cpu_compiler_options='auto'` means on a CPU with these feature flags: matmuls in Eigen
  on x86 CPUs without AVX-512, XLA's default (YNNPACK) elsewhere. Measured on 2 cores
  (BENCHMARKS.md, in-process A/B): on an AMD EPYC with AVX2 only, Eigen's matmuls made the nano
  GPT's step 3.8% faster, the MNIST CNN's 8%, LeNet-5's 2.5%; on an Intel Xeon with AVX-512,
  the nano GPT's step 1-3% slower (the image models moved within the noise). On other CPUs
  (ARM, unreadable flags) XLA's default is kept, unmeasured."""
  x86 = flags is not None and 'sse2' in flags
  return EIGEN_MATMULS if x86 and 'avx512f' not in flags else ''


def compiler_options(spec: str, mesh: Mesh) -> dict:
  """`config.parallel.cpu_compiler_options` ('name=value,...', or 'auto': see
  `auto_cpu_options`) as XLA compile options for the jitted steps when the mesh is all CPUs
  (nothing on accelerators), less any option that XLA_FLAGS also sets: the environment wins.
  true / false (any case) are booleans. An item without '=' is one more value of the option
  before it, for XLA's list options (e.g. `xla_cpu_experimental_ynn_fusion_type=A,B`), unless it
  starts with 'xla_': an option that lost its '=value' is refused, not taken as a value. An XLA
  option that does not exist, or a bad value, is refused here, by compiling a one-line program
  with the options (not at the first step, in a traceback)."""
  auto = is_auto(spec)
  spec = resolved_cpu_options(spec)
  options, name = {}, None
  for item in filter(None, (part.strip() for part in spec.split(','))):
    if '=' not in item and name is not None and not item.lower().startswith('xla_'):
      options[name] = f'{options[name]},{item}'  # another value of a list option: name=A,B
      continue
    name, sep, value = item.partition('=')
    name, value = name.strip(), value.strip()
    if not sep or not name:
      raise ValueError(f'config.parallel.cpu_compiler_options={spec!r}: {item!r} is not '
                       'name=value.')
    options[name] = value
  options = {name: {'true': True, 'false': False}.get(value.lower(), value)
             for name, value in options.items()}
  if not all_cpu(mesh):
    return {}
  flags = os.environ.get('XLA_FLAGS', '')
  options = {name: value for name, value in options.items() if f'--{name}=' not in flags}
  if options:
    one = jax.ShapeDtypeStruct((), np.float32, sharding=jax.sharding.SingleDeviceSharding(
        mesh.devices.flat[0]))  # on the mesh's CPUs, whatever the default backend
    try:
      jax.jit(lambda x: x + 1, compiler_options=options).lower(one).compile()
    except jax.errors.JaxRuntimeError as e:  # e.g. "No such compile option: 'xla_cpu_nope'"
      refusal = str(e).splitlines()[0]
      if auto:  # not the user's setting: another XLA may lack the option; its defaults then
        logging.warning("config.parallel.cpu_compiler_options='auto' chose %r, which this XLA "
                        "refuses (%s); compiling with XLA's defaults.", spec, refusal)
        return {}
      raise ValueError(f'config.parallel.cpu_compiler_options={spec!r}: XLA refuses it: '
                       f'{refusal}') from None
  if auto:
    logging.info("config.parallel.cpu_compiler_options='auto' on this CPU: %s.",
                 spec or "XLA's defaults")
  return options


def _in_context(fn, mesh, rules):
  """Traces `fn` with the mesh and logical axis rules set, for the models' constraints."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped


def compile_steps(mode: str, mesh: Mesh, init_fn: Callable, make_steps: Callable,
                  state_sharding, rules, cpu_compiler_options: str = '') -> Compiled:
  """`make_steps(axis_name)` returns (train_step, eval_step) built for that axis (or None)."""
  check_mode(mode)
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(BATCH))
  if mode == 'jit':
    train_step, eval_step = (_in_context(f, mesh, rules) for f in make_steps(None))
    options = compiler_options(cpu_compiler_options, mesh)
    return Compiled(
        init_state=jax.jit(_in_context(init_fn, mesh, rules), out_shardings=state_sharding),
        train_step=jax.jit(train_step, in_shardings=(state_sharding, data, replicated,
                                                     replicated),
                           out_shardings=(state_sharding, replicated), donate_argnums=0,
                           compiler_options=options),
        eval_step=jax.jit(eval_step, in_shardings=(state_sharding, data),
                          out_shardings=replicated, compiler_options=options),
        put_batch=lambda batch: jax.tree.map(
            functools.partial(jax.make_array_from_process_local_data, data), batch),
        put_state=lambda state: state, get_state=lambda state: state,
        get_metrics=lambda metrics: metrics, state_sharding=state_sharding)
  if mode == 'pmap':
    if cpu_compiler_options.strip() and not is_auto(cpu_compiler_options) and all_cpu(mesh):
      warnings.warn('config.parallel.cpu_compiler_options is not applied with '
                    'parallel.mode=pmap (jax.pmap takes no compiler options).', stacklevel=2)
    if mesh.shape['fsdp'] > 1 or mesh.shape['tensor'] > 1:
      raise ValueError('config.parallel.mode=pmap is data parallelism only; use mode=jit for '
                       f'config.parallel.mesh with fsdp or tensor > 1 (got {dict(mesh.shape)}).')
    train_step, eval_step = make_steps(PMAP_AXIS)
    devs = list(mesh.devices.flat)
    n = len(devs)
    stacked = NamedSharding(Mesh(np.asarray(devs), (PMAP_AXIS,)), P(PMAP_AXIS))
    shard = lambda x: jax.device_put(x.reshape(n, -1, *x.shape[1:]), stacked)
    replicate = lambda x: jax.device_put(jnp.broadcast_to(x, (n, *x.shape)), stacked)
    # Device 0's copy, as an array of its own. Indexing pmap's output (x[0]) waited for the
    # computation that makes it: in the training loop, for every step. Its shard is there at
    # once, and indexing that is queued like any other computation.
    first = lambda tree: jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)
    every_leaf = jax.tree.map(lambda _: replicated, state_sharding)
    return Compiled(
        init_state=jax.jit(init_fn, out_shardings=every_leaf),
        train_step=jax.pmap(train_step, axis_name=PMAP_AXIS, in_axes=(0, 0, None, None),
                            donate_argnums=0, devices=devs),
        eval_step=jax.pmap(eval_step, axis_name=PMAP_AXIS, devices=devs),
        put_batch=lambda batch: jax.tree.map(shard, batch),
        put_state=lambda state: jax.tree.map(replicate, state),
        get_state=lambda state: jax.device_put(first(state), replicated),
        get_metrics=first, state_sharding=every_leaf)

