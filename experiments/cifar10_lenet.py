"""CIFAR-10 with LeNet-5 (conv 6@5x5, conv 16@5x5, dense 120-84-10), Adam 1e-3, cross-entropy.

  python launch.py --config=experiments/cifar10_lenet.py
  python launch.py --config=experiments/cifar10_lenet.py:cpu

Batch 64, 20 epochs, per-channel standardisation, no augmentation (as in the classic
PyTorch tutorial network). Data: TFDS `cifar10`, prepared on first use (needs network once).
Full run: not measured yet in this repository (this network typically reaches 60-65%).
"""
from research import config as config_lib

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  c = config_lib.defaults('lenet5', num_classes=10)
  c.seed = 0
  c.batch_size = 64
  steps_per_epoch = 50000 // 64
  c.total_steps = 20 * steps_per_epoch
  c.log_every_steps = 100
  c.eval_every_steps = steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch
  c.model.dtype = 'auto'  # bfloat16 activations on GPUs and TPUs, float32 on CPUs
  c.data.name = 'cifar10'
  c.data.mean, c.data.std = CIFAR_MEAN, CIFAR_STD
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  c.parallel.cpu_batch_parts = 2  # on CPUs: two halves at once, 2-4% faster on 2 cores
  if 'cpu' in options:
    c.total_steps = 400
    c.log_every_steps = 50
    c.eval_every_steps = c.checkpoint_every_steps = 400
  return c
