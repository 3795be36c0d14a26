"""Real data: the MNIST test set from ../shared/data through the project's own loading code.

Train the small CNN (experiments/mnist_cnn.py:cpu, 400 steps of 64) on the first 8,000 test
images and evaluate on the last 2,000: the issue asks for at least 97%. Measured on a 2-core
CPU: 98.65% in about 35 s.
"""
import json

from experiments import mnist_cnn
from research import train


def test_mnist_cnn_reaches_97_percent_on_real_mnist(shared_data, tmp_path):
  config = mnist_cnn.get_config('cpu')
  config.data.name, config.data.path = 'mnist_idx', str(shared_data)
  config.data.train_split, config.data.eval_split = 'test[:8000]', 'test[8000:]'
  config.parallel.num_devices = 1  # a single CPU device is fastest on 2 cores
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['num_examples'] == 2000
  assert result['accuracy'] >= 0.97, result
  assert result['f1'] >= 0.96, result
  train_lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"train"' in l]
  assert train_lines[-1]['loss'] < train_lines[0]['loss'] / 3
