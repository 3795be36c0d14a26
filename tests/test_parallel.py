"""Data parallelism: 1 device, 8 devices with jit over a mesh, and 8 devices with pmap agree."""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from research import train
from tests.test_train import cpu_config


def one_step(config, workdir):
  """Builds the experiment, runs one train step, returns (loss, params) on the host."""
  exp = train.setup(config, workdir)
  state, _ = train.restore_or_init(exp)
  batch = exp.compiled.put_batch(next(exp.data.train_batches(0)))
  state, metrics = exp.compiled.train_step(state, batch, exp.rng)
  metrics = jax.device_get(exp.compiled.get_metrics(metrics))
  return metrics, jax.device_get(exp.compiled.get_state(state))


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
  (ref_metrics, ref_state) = results['jit', 1]
  assert np.isfinite(ref_metrics['loss'])
  for key in (('jit', 8), ('pmap', 8)):
    metrics, state = results[key]
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 state.params, ref_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 state.model_state, ref_state.model_state)
  # The step did something: parameters moved away from their initial values.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), init, ref_state.params))
  assert max(moved) > 1e-4
