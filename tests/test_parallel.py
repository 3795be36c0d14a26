"""Data parallelism: 1 device, 8 devices with jit over a mesh, and 8 devices with pmap agree."""
import os
import re
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research import checkpoint
from research import parallel
from research import sample
from research import train
from tests.conftest import ROOT, xla_flags
from tests.test_train import cpu_config


def one_step(config, workdir):
  """Builds the experiment, runs one train step; returns its metrics and state on the host, and
  XLA's FLOPs per device of the compiled step (as --mode=compile and benchmark --compile_only
  give them)."""
  exp = train.setup(config, workdir)
  state, _ = train.restore_or_init(exp)
  batch = exp.compiled.put_batch(next(exp.data.train_batches(0)))
  step = exp.compiled.train_step.lower(state, batch, exp.rng, exp.schedule_inputs).compile()
  cost = step.cost_analysis()
  state, metrics = step(state, batch, exp.rng, exp.schedule_inputs)
  metrics = jax.device_get(exp.compiled.get_metrics(metrics))
  return (metrics, jax.device_get(exp.compiled.get_state(state)),
          (cost[0] if isinstance(cost, list) else cost)['flops'])


@pytest.mark.parametrize('name', ['mnist_cnn', 'cifar10_resnet'])  # ResNet: BatchNorm across devices
def test_one_step_agrees_on_1_device_jit_8_and_pmap_8(name, tmp_path):
  assert jax.device_count() == 8
  results = {}
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    for mode, devices in (('jit', 1), ('jit', 8), ('pmap', 8)):
      config = cpu_config(name, batch_size=32)
      if name == 'cifar10_resnet':  # smaller, and no augmentation: pmap draws it per device
        config.model.stage_sizes, config.model.width = (1, 1), 8
        config.data.crop_padding, config.data.random_flip = 0, False
        config.optimizer.warmup_steps = 0  # else the first step has learning rate 0
      config.parallel.mode, config.parallel.num_devices = mode, devices
      results[mode, devices] = one_step(config, str(tmp_path / f'{mode}{devices}'))
    exp = train.setup(config, str(tmp_path / 'init'))
    init = jax.device_get(train.restore_or_init(exp)[0].params)
  ref_metrics, ref_state, _ = results['jit', 1]
  assert np.isfinite(ref_metrics['loss'])
  for key in (('jit', 8), ('pmap', 8)):
    metrics, state, _ = results[key]
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 state.params, ref_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 state.model_state, ref_state.model_state)
  # The step did something: parameters moved away from their initial values.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), init, ref_state.params))
  assert max(moved) > 1e-4


MESHES = {'1 device': dict(num_devices=1), 'data=8': dict(data=8),
          'fsdp=8': dict(data=1, fsdp=8), 'data=2 fsdp=2 tensor=2': dict(data=2, fsdp=2, tensor=2),
          'data=2 tensor=4': dict(data=2, tensor=4)}


def gpt_config(**parallel):
  config = cpu_config('gpt_small', batch_size=16, **{'data.max_bytes': 100000})
  config.model.n_head = 4  # heads to split over 'tensor'
  config.model.scan_layers = True  # parameters stacked on a 'layers' axis
  config.parallel.num_devices = parallel.pop('num_devices', 0)
  for axis, size in parallel.items():
    config.parallel.mesh[axis] = size
  return config


def test_gpt_agrees_under_data_fsdp_and_tensor_parallelism(tmp_path, capfd):
  """The same loss and update on every mesh; and each device's FLOPs under tensor parallelism
  are those of data=8, give or take the vocabulary's padding rows: on CPUs the qkv kernel,
  flattened to a matrix for speed, was gathered and computed whole on every device (1.8x
  here), and the head's logits too; the token lookup in a split table made XLA replicate its
  result ('involuntary full rematerialization')."""
  results = {name: one_step(gpt_config(**mesh), str(tmp_path / name.replace(' ', '_')))
             for name, mesh in MESHES.items()}
  ref_metrics, ref_state, _ = results['1 device']
  for name, (metrics, state, _) in results.items():
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, ref_state.params)
  flops = {name: result[2] for name, result in results.items()}
  for name in ('data=2 tensor=4', 'data=2 fsdp=2 tensor=2'):
    assert flops[name] < 1.1 * flops['data=8'], flops
  assert 'Involuntary full rematerialization' not in capfd.readouterr().err


@pytest.mark.parametrize('shape, order, ok', [
    ((8, 1, 1), range(8), True), ((2, 2, 2), range(8), True), ((1, 2, 4), range(8), True),
    ((8, 1, 1), (0, 4, 1, 5, 2, 6, 3, 7), True),    # rows interleaved: the batch permuted
    ((1, 1, 8), range(8), False),                   # every device holds the whole batch
    ((2, 1, 4), (0, 1, 4, 5, 2, 3, 6, 7), False)])  # each half of it on both processes
def test_each_process_must_own_its_rows_of_the_batch(shape, order, ok):
  """The 8 test devices as 2 processes of 4 (device ids 0-3 and 4-7). Tensor parallelism across
  processes would have a process hold rows it never loaded."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices())[list(order)].reshape(shape), parallel.AXES)
  check = lambda: parallel.check_process_rows(mesh, 32, process_of=lambda d: d.id // 4)
  if ok:
    check()
  else:
    with pytest.raises(ValueError, match='does not give each of the 2 processes its own rows'):
      check()
  parallel.check_process_rows(mesh, 32)  # one process: anything goes


def test_micro_batches_are_split_where_the_batch_already_is(tmp_path):
  """With the batch split over 8 devices and 2 micro-batches, each device computes its share of
  every micro-batch from its own rows: the compiled step's only collective is the gradients'
  all-reduce. (Micro-batches of consecutive rows gathered and permuted the activations.)"""
  config = gpt_config(data=8)
  config.batch_size, config.grad_accum_steps = 32, 2  # x 2 parts (gpt_small.py:cpu sets them)
  exp = train.setup(config, str(tmp_path))
  state, _ = train.restore_or_init(exp)
  batch = exp.compiled.put_batch(next(exp.data.train_batches(0)))
  hlo = exp.compiled.train_step.lower(state, batch, exp.rng,
                                      exp.schedule_inputs).compile().as_text()
  ops = r' (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\('
  assert set(re.findall(ops, hlo)) == {'all-reduce'}


def test_parameters_and_optimizer_state_are_sharded_by_logical_names(tmp_path):
  exp = train.setup(gpt_config(data=2, fsdp=2, tensor=2), str(tmp_path))
  state, _ = train.restore_or_init(exp)
  spec = lambda x: tuple(x.sharding.spec)
  block = state.params['h']  # scanned layers: a leading 'layers' axis, never sharded
  assert spec(block['c_fc']['kernel']) == (None, 'fsdp', 'tensor')           # embed, mlp
  assert spec(block['mlp_proj']['kernel']) == (None, 'tensor', 'fsdp')       # mlp, embed
  assert spec(block['c_attn']['kernel']) == (None, 'fsdp', None, 'tensor', None)  # heads
  assert spec(state.params['wte']['embedding']) == ('tensor', 'fsdp')         # vocab, embed
  assert spec(state.opt_state[1][0].mu['h']['c_fc']['kernel']) == (None, 'fsdp', 'tensor')
  shard = block['c_fc']['kernel'].addressable_shards[0].data
  assert shard.shape[1:] == (128 // 2, 512 // 2)


def test_save_with_fsdp_restore_with_data_parallelism(tmp_path):
  workdir = str(tmp_path / 'run')
  config = gpt_config(data=1, fsdp=8)
  config.total_steps, config.eval_every_steps = 2, 2
  config.sample.max_new_tokens, config.max_eval_batches = 0, 1
  train.train_and_evaluate(config, workdir)
  saved = train.setup(config, workdir)
  fsdp_state, _ = train.restore_or_init(saved)
  data = train.setup(gpt_config(data=8), workdir)
  data_state, step = train.restore_or_init(data)
  assert step == 2
  assert not fsdp_state.params['h']['c_fc']['kernel'].sharding.is_fully_replicated
  assert data_state.params['h']['c_fc']['kernel'].sharding.is_fully_replicated  # fsdp axis: 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fsdp_state.params),
               jax.device_get(data_state.params))


_LOAD_ON_ONE_DEVICE = """
import sys
import jax
import numpy as np
from research import checkpoint, sample
assert jax.device_count() == 1, jax.devices()
model, params, tokenizer, config = sample.load_trained(sys.argv[1])
config.sample.prompt, config.sample.max_new_tokens, config.sample.temperature = 'def ', 4, 0.0
text = sample.sample_text(model, params, tokenizer, config.sample, jax.random.key(0))
init_from = checkpoint.load_params(sys.argv[1])['params']
flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)
                     for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
np.savez(sys.argv[2], **{'sampled ' + k: v for k, v in flat(params).items()},
         **{'init_from ' + k: v for k, v in flat(init_from).items()}, text=np.array(text))
"""


def test_fsdp_checkpoint_loads_for_sampling_and_init_from_on_one_device(tmp_path):
  """A run trained sharded over 8 devices is read back on one device (and in a process that
  has only one), with the same values."""
  workdir = str(tmp_path / 'run')
  config = gpt_config(data=1, fsdp=8)
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 1, 1
  config.sample.max_new_tokens, config.max_eval_batches = 0, 1
  train.train_and_evaluate(config, workdir)
  saved, _ = train.restore_or_init(train.setup(config, workdir))
  saved = saved.params
  assert len(saved['h']['c_fc']['kernel'].sharding.device_set) == 8  # saved sharded over 8
  flat = lambda tree: {jax.tree_util.keystr(p): x
                       for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  model, params, tokenizer, loaded_config = sample.load_trained(workdir)
  init_from = checkpoint.load_params(workdir)['params']
  for path, x in flat(saved).items():
    assert len(flat(params)[path].sharding.device_set) == 1, path
    assert flat(init_from)[path].sharding.is_fully_replicated, path
    np.testing.assert_array_equal(flat(params)[path], x, err_msg=path)
    np.testing.assert_array_equal(flat(init_from)[path], x, err_msg=path)
  loaded_config.sample.prompt, loaded_config.sample.max_new_tokens = 'def ', 4
  loaded_config.sample.temperature = 0.0
  text = sample.sample_text(model, params, tokenizer, loaded_config.sample, jax.random.key(0))

  # The same in a process with a single device (there, restoring the saved layout fails).
  out = tmp_path / 'one_device.npz'
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1),
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', _LOAD_ON_ONE_DEVICE, workdir, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  one_device = np.load(out)
  assert str(one_device['text']) == text
  for path, x in flat(saved).items():
    np.testing.assert_array_equal(one_device['sampled ' + path], x, err_msg=path)
    np.testing.assert_array_equal(one_device['init_from ' + path], x, err_msg=path)


def test_mesh_that_does_not_fit_the_devices_is_explained(tmp_path):
  with pytest.raises(ValueError, match=r'config\.parallel\.mesh=.* multiplies to 12 devices, but '
                                       r'there are 8'):
    train.setup(gpt_config(data=3, fsdp=2, tensor=2), str(tmp_path))
  # An axis at -1 already: the others must divide the devices (it said 'set one axis to -1').
  with pytest.raises(ValueError, match=r'the other axes multiply to 3, which does not divide '
                                       r'them\. For data parallelism on any number of devices'):
    train.setup(gpt_config(data=3, tensor=-1), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.parallel\.mode=pmap is data parallelism only'):
    config = gpt_config(data=4, fsdp=2)
    config.parallel.mode = 'pmap'
    train.setup(config, str(tmp_path))


def test_a_mesh_axis_that_does_not_divide_a_parameter_is_named(tmp_path):
  # 4 heads over tensor=8: JAX's IndivisibleError named no config key.
  with pytest.raises(ValueError, match=r"params/h/attn_proj/kernel \(shape \(2, 4, 32, 128\)\) "
                                       r"would be split 8 ways along its axis 1 \('heads', 4 "
                                       r"long\) by mesh axes \('tensor',\)"):
    train.setup(gpt_config(data=1, tensor=8), str(tmp_path))
  train.setup(gpt_config(data=2, tensor=4), str(tmp_path))  # 4 heads over 4: fine


def test_tensor_parallelism_for_a_model_without_axis_names_is_refused(tmp_path):
  # Linear regression names no axes: tensor devices would each compute the whole batch.
  config = cpu_config('linear_regression')
  config.parallel.mesh.data, config.parallel.mesh.tensor = 1, 8
  with pytest.raises(ValueError, match=r"config\.parallel\.mesh\.tensor=8, but config\.parallel"
                                       r"\.rules split no parameter of this model over 'tensor'"):
    train.setup(config, str(tmp_path))
  config.parallel.mesh.fsdp, config.parallel.mesh.tensor = 8, 1  # the batch split: fine
  train.setup(config, str(tmp_path))


def test_pmap_with_several_processes_is_refused_before_compilation(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config = cpu_config('mnist_cnn')
  config.parallel.mode = 'pmap'
  with pytest.raises(ValueError, match=r'config\.parallel\.mode=pmap is not supported with '
                                       r'several processes .*use config\.parallel\.mode=jit'):
    train.setup(config, str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.parallel\.mode=jit'):
    parallel.compile_steps('pmap', None, None, None, None, ())
  config.parallel.mode = 'jit'  # the mesh of every process's devices is fine
  assert parallel.make_mesh(config.parallel).shape['data'] == jax.device_count()


def test_cpu_compiler_options_reach_the_compiled_step_and_keep_its_numbers(tmp_path, monkeypatch):
  """config.parallel.cpu_compiler_options: YNNPACK off (an empty fusion list) leaves no YNNPACK
  call in the compiled train step (there are some by default) and the same loss."""
  monkeypatch.delenv('XLA_FLAGS', raising=False)  # the simulated devices are already made
  results = {}
  for name, spec in (('default', ''), ('eigen', 'xla_cpu_experimental_ynn_fusion_type=')):
    config = gpt_config(num_devices=1)
    config.parallel.cpu_compiler_options = spec
    exp = train.setup(config, str(tmp_path / name))
    state, _ = train.restore_or_init(exp)
    batch = exp.compiled.put_batch(next(exp.data.train_batches(0)))
    hlo = exp.compiled.train_step.lower(state, batch, exp.rng,
                                      exp.schedule_inputs).compile().as_text()
    _, metrics = exp.compiled.train_step(state, batch, exp.rng, exp.schedule_inputs)
    results[name] = ('__ynn_fusion' in hlo, float(jax.device_get(metrics['loss'])))
  assert results['default'][0] and not results['eigen'][0]
  np.testing.assert_allclose(results['eigen'][1], results['default'][1], rtol=1e-5)


def test_auto_cpu_compiler_options_follow_the_cpu(tmp_path, monkeypatch, caplog):
  """'auto' (the default): matmuls in Eigen on x86 CPUs without AVX-512, else XLA's default."""
  amd = tmp_path / 'amd'
  amd.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\n'
                 'flags\t\t: fpu sse sse2 avx fma avx2 bmi2\n\nprocessor\t: 1\n')
  intel = tmp_path / 'intel'
  intel.write_text('flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw amx_tile\n')
  arm = tmp_path / 'arm'
  arm.write_text('processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n')
  assert parallel.cpu_flags(str(amd)) >= {'sse2', 'avx2'}
  assert parallel.cpu_flags(str(arm)) is None and parallel.cpu_flags(str(tmp_path / 'no')) is None
  assert parallel.auto_cpu_options(parallel.cpu_flags(str(amd))) == parallel.EIGEN_MATMULS
  for path in (intel, arm, tmp_path / 'no'):
    assert parallel.auto_cpu_options(parallel.cpu_flags(str(path))) == ''
  assert cpu_config('mnist_mlp').parallel.cpu_compiler_options == 'auto'
  mesh = parallel.make_mesh(cpu_config('mnist_mlp').parallel)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  read = parallel.cpu_flags
  monkeypatch.setattr(parallel, 'cpu_flags', lambda: read(str(amd)))
  assert parallel.compiler_options('auto', mesh) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  monkeypatch.setattr(parallel, 'cpu_flags', lambda: read(str(intel)))
  assert parallel.compiler_options(' Auto ', mesh) == {}
  # An XLA without the option it chooses: XLA's defaults, with a warning (an option the user
  # set is refused instead: test_cpu_compiler_options_parsing).
  monkeypatch.setattr(parallel, 'cpu_flags', lambda: read(str(amd)))
  monkeypatch.setattr(parallel, 'EIGEN_MATMULS', 'xla_cpu_no_such_option=1')
  with caplog.at_level('WARNING'):
    assert parallel.compiler_options('auto', mesh) == {}
  assert "'auto' chose 'xla_cpu_no_such_option=1', which this XLA refuses" in caplog.text


def test_auto_cpu_compiler_options_reach_the_compiled_steps(tmp_path, monkeypatch):
  """The default, 'auto', reaches the jitted train and eval steps as the options chosen for the
  CPU. (Whether Eigen or YNNPACK runs a matmul does not show in the compiled HLO text.)"""
  monkeypatch.delenv('XLA_FLAGS', raising=False)  # the simulated devices are already made
  jit, seen = jax.jit, {}

  def spy(fn, *args, **kwargs):
    seen[getattr(fn, '__name__', '?')] = kwargs.get('compiler_options')
    return jit(fn, *args, **kwargs)
  monkeypatch.setattr(jax, 'jit', spy)
  chosen = {}
  for cpu, flags in (('amd', {'sse2', 'avx2'}), ('intel', {'sse2', 'avx2', 'avx512f'})):
    monkeypatch.setattr(parallel, 'cpu_flags', lambda flags=flags: flags)
    seen.clear()
    train.setup(gpt_config(num_devices=1), str(tmp_path / cpu))
    chosen[cpu] = {name: seen[name] for name in ('train_step', 'eval_step')}
  eigen = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  assert chosen == {'amd': {'train_step': eigen, 'eval_step': eigen},
                    'intel': {'train_step': {}, 'eval_step': {}}}


def test_pmap_warns_of_cpu_compiler_options_only_when_they_were_set(tmp_path):
  config = cpu_config('linear_regression')
  config.parallel.mode = 'pmap'
  with warnings.catch_warnings():
    # The default, 'auto', is not a request that pmap ignores: no warning.
    warnings.filterwarnings('error', message='.*cpu_compiler_options is not applied')
    train.setup(config, str(tmp_path / 'auto'))
  config.parallel.cpu_compiler_options = parallel.EIGEN_MATMULS
  with pytest.warns(UserWarning, match='not applied with parallel.mode=pmap'):
    train.setup(config, str(tmp_path / 'set'))


def test_cpu_compiler_options_parsing(monkeypatch):
  mesh = parallel.make_mesh(cpu_config('mnist_mlp').parallel)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  spec = ('xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE, '
          'xla_cpu_enable_fast_math=true')
  # The environment's setting wins over the config's.
  assert parallel.compiler_options(spec, mesh) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  assert parallel.compiler_options('', mesh) == {}
  assert parallel.compiler_options('xla_cpu_multi_thread_eigen=false', mesh) == {
      'xla_cpu_multi_thread_eigen': False}  # XLA takes no 'false' string for a bool option
  with pytest.raises(ValueError, match="'fast_math' is not name=value"):
    parallel.compiler_options('fast_math,a=1', mesh)
  # An option that lost its '=value' after another is refused, not taken as that one's value.
  with pytest.raises(ValueError, match="'xla_cpu_enable_fast_math' is not name=value"):
    parallel.compiler_options('xla_dump_hlo_pass_re=foo,xla_cpu_enable_fast_math', mesh)
  # XLA's list options take several values, comma-separated as XLA_FLAGS writes them.
  fusions = ('xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE, '
             'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,xla_cpu_multi_thread_eigen=FALSE')
  assert parallel.compiler_options(fusions, GpuMesh()) == {}
  assert parallel.compiler_options(fusions, mesh) == {
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
      'xla_cpu_multi_thread_eigen': False}
  # Both values reach XLA: the second puts a lone matmul into a YNNPACK fusion, the first alone
  # leaves it to Eigen.
  matmul = lambda options: jax.jit(jnp.matmul, compiler_options=options).lower(
      jnp.ones((64, 32)), jnp.ones((32, 64))).compile().as_text()
  assert 'ynn_fusion' in matmul(parallel.compiler_options(fusions, mesh))
  assert 'ynn_fusion' not in matmul(parallel.compiler_options(fusions.split(',')[0], mesh))
  # A value that is not an option's (a name=value missing its '=') is XLA's to refuse.
  with pytest.raises(ValueError, match="XLA refuses it: .*'true,fast_math'"):
    parallel.compiler_options('xla_cpu_multi_thread_eigen=true,fast_math', mesh)
  # Refused when the step is built, not at its first step in a JaxRuntimeError's traceback.
  with pytest.raises(ValueError, match=r"cpu_compiler_options='xla_cpu_nope=1': XLA refuses it: "
                     r".*No such compile option: 'xla_cpu_nope'"):
    parallel.compiler_options('xla_cpu_nope=1', mesh)
  with pytest.raises(ValueError, match="XLA refuses it: .*'abc' is not a valid int32 value"):
    parallel.compiler_options('xla_cpu_prefer_vector_width=abc', mesh)
  assert parallel.compiler_options(spec, GpuMesh()) == {}  # CPU options only for CPU meshes


class GpuMesh:  # what compiler_options and batch_parts read of a mesh
  devices = np.array([type('Gpu', (), {'platform': 'gpu'})()])


def test_cpu_batch_parts_only_on_cpus():
  config = cpu_config('mnist_mlp')
  config.parallel.cpu_batch_parts = 2
  assert parallel.batch_parts(config.parallel, parallel.make_mesh(config.parallel)) == 2
  assert parallel.batch_parts(config.parallel, GpuMesh()) == 1


def test_evaluation_agrees_on_1_device_jit_8_and_pmap_8(tmp_path):
  """Catches pmap's eval_step not summing over devices (lax.psum dropped, or lax.pmean): each
  device's sums would be 1/8 of the batch's. 60 examples in batches of 32: the last one padded."""
  results = {}
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
    for mode, devices in (('jit', 1), ('jit', 8), ('pmap', 8)):
      config = cpu_config('mnist_cnn', batch_size=32)
      config.parallel.mode, config.parallel.num_devices = mode, devices
      exp = train.setup(config, str(tmp_path / f'{mode}{devices}'))
      state, _ = train.restore_or_init(exp)
      results[mode, devices] = train.evaluate_state(exp, state)
  ref, ref_confusion = results['jit', 1]
  assert ref['num_examples'] == 60 and ref_confusion.sum() == 60
  assert np.isfinite(ref['loss'])
  for key in (('jit', 8), ('pmap', 8)):
    result, confusion = results[key]
    assert result['num_examples'] == 60, key
    np.testing.assert_array_equal(confusion, ref_confusion, err_msg=str(key))
    np.testing.assert_allclose(result['loss'], ref['loss'], rtol=1e-5, err_msg=str(key))
    for metric, value in ref.items():
      np.testing.assert_allclose(result[metric], value, rtol=1e-5, err_msg=f'{key} {metric}')


def test_pmap_draws_dropout_and_augmentation_per_device():
  """Catches the pmap step dropping `fold_in(rng, axis_index)`: every device would then draw
  the same dropout masks and augmentation. A tiny model records, in a mutable collection that
  the step returns per device (unaveraged), the dropout mask and the augmented input of its
  first row; every device gets the same rows."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from research import steps  # pylint: disable=g-import-not-at-top

  class Recorder(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      mask = nn.Dropout(0.5, deterministic=not train)(jnp.ones_like(x))
      self.variable('stats', 'mask', jnp.zeros, x.shape[1:]).value = mask[0]
      self.variable('stats', 'input', jnp.zeros, x.shape[1:]).value = x[0]
      return nn.Dense(3)(x * mask)

  def augment(inputs, rng, train):  # noise as augmentation
    return inputs + jax.random.normal(rng, inputs.shape) if train else inputs

  n, width = 8, 32
  model, tx = Recorder(), optax.sgd(0.1)
  state = steps.init_state(model, tx, jax.random.key(0), jnp.zeros((1, width)))
  rows = {'inputs': jnp.ones((2, width)), 'targets': jnp.array([0, 1])}
  rng = jax.random.key(5)
  step_fns = {axis: steps.make_steps(model, tx, loss='cross_entropy', preprocess=augment,
                                     num_classes=3, axis_name=axis)[0]
              for axis in (None, 'batch')}
  devices = jax.devices()[:n]
  pmapped = jax.pmap(step_fns['batch'], axis_name='batch', in_axes=(0, 0, None),
                     devices=devices)
  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)
  new, _ = pmapped(replicate(state), replicate(rows), rng)
  stats = jax.device_get(new.model_state['stats'])
  for what in ('mask', 'input'):
    per_device = stats[what]
    assert per_device.shape == (n, width)
    distinct = {per_device[i].tobytes() for i in range(n)}
    assert len(distinct) == n, f'{what}: {len(distinct)} distinct of {n} devices'
  # The pmap step is deterministic: the same call gives the same draws.
  again, _ = pmapped(replicate(state), replicate(rows), rng)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.model_state['stats']), stats)
  # Without an axis (jit), the same step's draws differ from every device's.
  single, _ = jax.jit(step_fns[None])(state, rows, rng)
  for i in range(n):
    assert not np.array_equal(single.model_state['stats']['mask'], stats['mask'][i])


def test_batch_not_divisible_by_devices_x_accumulation_x_cpu_batch_parts_is_refused(tmp_path):
  """Catches check_batch_size ignoring config.parallel.cpu_batch_parts: a batch that splits
  over the devices and micro-batches but not into the CPU parts must be refused before any
  compilation, naming the keys."""
  mesh = parallel.make_mesh(cpu_config('mnist_cnn').parallel)  # 8 devices
  parallel.check_batch_size(32, 2, mesh, parts=2)  # 32 = 8 x 2 x 2
  parallel.check_batch_size(16, 2, mesh, parts=1)
  with pytest.raises(ValueError, match=r'config\.batch_size=16 must be divisible by devices x '
                                       r'config\.grad_accum_steps x config\.parallel\.'
                                       r'cpu_batch_parts = 8 x 2 x 2'):
    parallel.check_batch_size(16, 2, mesh, parts=2)
  with pytest.raises(ValueError, match=r'config\.batch_size=8 must be divisible by devices x '
                                       r'config\.grad_accum_steps x config\.parallel\.'
                                       r'cpu_batch_parts = 8 x 1 x 2'):
    parallel.check_batch_size(8, 1, mesh, parts=2)
  # The batch size suggested is one that passes (it suggested 8 here, refused for the parts).
  for size in (12, 20):
    with pytest.raises(ValueError, match=r'e\.g\. (\d+)') as error:
      parallel.check_batch_size(size, 1, mesh, parts=2)
    parallel.check_batch_size(int(re.search(r'e\.g\. (\d+)', str(error.value))[1]), 1, mesh,
                              parts=2)
  # Through train.setup: mnist_cnn's cpu config computes each batch as 2 parts on CPUs.
  config = cpu_config('mnist_cnn', batch_size=16, grad_accum_steps=2)
  assert config.parallel.cpu_batch_parts == 2
  with pytest.raises(ValueError, match=r'config\.batch_size=16 must be divisible by .*'
                                       r'cpu_batch_parts = 8 x 2 x 2'):
    train.setup(config, str(tmp_path))


def test_tpu_meshes_follow_the_chips_links_and_others_the_device_order(monkeypatch):
  """The TPU chips of one process are laid out by mesh_utils (their links); CPUs and GPUs,
  several processes, or a shape mesh_utils refuses keep jax.devices()' order."""
  chip = lambda i, process=0, platform='tpu': types.SimpleNamespace(
      id=i, platform=platform, process_index=process, device_kind='TPU v4')
  split = []
  def linked(shape, devs, allow_split_physical_axes):
    split.append(allow_split_physical_axes)
    return np.asarray(devs)[[0, 1, 3, 2]].reshape(shape)
  monkeypatch.setattr(parallel.mesh_utils, 'create_device_mesh', linked)
  ids = lambda grid: [d.id for d in grid.flat]
  assert ids(parallel.device_grid([chip(i) for i in range(4)], (2, 1, 2))) == [0, 1, 3, 2]
  assert split == [False]  # as jax.make_mesh, except on v5e
  assert ids(parallel.device_grid([chip(i, i // 2) for i in range(4)], (2, 1, 2))) == [0, 1, 2, 3]
  assert ids(parallel.device_grid([chip(i, platform='gpu') for i in range(4)], (4, 1, 1))) == [
      0, 1, 2, 3]
  def refuses(shape, devs, **kwargs):
    raise ValueError('cannot map')
  monkeypatch.setattr(parallel.mesh_utils, 'create_device_mesh', refuses)
  assert ids(parallel.device_grid([chip(i) for i in range(4)], (1, 2, 2))) == [0, 1, 2, 3]
  # The CPU devices here: jax.devices() order, as before.
  assert list(parallel.make_mesh(cpu_config('mnist_mlp').parallel).devices.flat) == jax.devices()


def test_pmap_metrics_are_taken_without_waiting_for_the_step():
  """The training loop takes each step's metrics (get_metrics) right after dispatching it. With
  pmap that was x[0] of the stacked output, which waited for the step to finish: every step
  of the hot loop synchronised with the host. The "step" in flight here is seconds of matmuls
  on every device; taking its metrics, which needs none of them done, must return before."""
  config = cpu_config('mnist_mlp')
  config.parallel.mode = 'pmap'
  mesh = parallel.make_mesh(config.parallel)
  steps = lambda axis: (lambda state, batch, rng, schedule: (state, {}), lambda state, batch: {})
  compiled = parallel.compile_steps('pmap', mesh, lambda rng: {}, steps, {}, ())
  slow = jax.pmap(lambda x: {'loss': jax.lax.fori_loop(
      0, 100, lambda i, y: jnp.tanh(y @ x), x).mean(), 'n': jnp.ones((2, 3)) * x[0, 0]})
  x = jnp.broadcast_to(jnp.eye(512) * 0.5, (jax.device_count(), 512, 512))
  jax.block_until_ready(slow(x))  # compiled
  in_flight = slow(x)
  metrics = compiled.get_metrics(in_flight)
  assert not in_flight['loss'].is_ready()  # returned while the step was still running
  host = jax.device_get(metrics)
  assert host['loss'] == pytest.approx(float(jax.device_get(in_flight['loss'])[0]))
  np.testing.assert_array_equal(host['n'], np.full((2, 3), 0.5, np.float32))
