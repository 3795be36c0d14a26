"""CIFAR-10 with ResNet-18 (11.2M parameters, BatchNorm), SGD + Nesterov, cosine schedule.

  python launch.py --config=experiments/cifar10_resnet.py
  python launch.py --config=experiments/cifar10_resnet.py:cpu   # a 4-block, 16-wide ResNet

Batch 128, 100 epochs, learning rate 0.1 with 2 warm-up epochs then cosine decay, weight decay
5e-4 (not on biases or BatchNorm scales), label smoothing 0.1, random crop (pad 4) and flip.
Data: TFDS `cifar10`, prepared on first use (needs network once).
Full run: not measured yet in this repository (this recipe is published at about 95%).
"""
from experiments.cifar10_lenet import CIFAR_MEAN, CIFAR_STD
from research import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  c = config_lib.defaults('resnet', num_classes=10, stage_sizes=(2, 2, 2, 2), width=64)
  c.seed = 0
  c.batch_size = 128
  steps_per_epoch = 50000 // 128
  c.total_steps = 100 * steps_per_epoch
  c.log_every_steps = 100
  c.eval_every_steps = 5 * steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch
  c.label_smoothing = 0.1
  c.model.dtype = 'auto'  # bfloat16 activations on GPUs and TPUs, float32 on CPUs
  c.data.name = 'cifar10'
  c.data.mean, c.data.std = CIFAR_MEAN, CIFAR_STD
  c.data.crop_padding, c.data.random_flip = 4, True
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum, c.optimizer.nesterov = 0.9, True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule, c.optimizer.warmup_steps = 'warmup_cosine', 2 * steps_per_epoch
  if 'cpu' in options:
    c.batch_size = 64
    c.model.stage_sizes, c.model.width = (1, 1, 1, 1), 16
    c.total_steps = 200
    c.log_every_steps = 50
    c.eval_every_steps = c.checkpoint_every_steps = 200
    c.optimizer.warmup_steps = 20
  return c
