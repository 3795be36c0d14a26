"""The one entry point.

  python launch.py --config=experiments/mnist_cnn.py
  python launch.py --config=experiments/mnist_cnn.py:cpu --config.optimizer.learning_rate=0.01
  python launch.py --config=experiments/mnist_cnn.py --workdir=runs/mine --mode=eval
"""
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment file: experiments/X.py[:ARG].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs (default: runs/NAME-TIME).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (resumes if the workdir has '
                  'checkpoints) or eval (the newest checkpoint on the eval split).')
flags.mark_flag_as_required('config')
FLAGS = flags.FLAGS


def default_workdir() -> str:
  path, _, arg = flags.FLAGS['config'].config_filename.partition(':')
  name = os.path.splitext(os.path.basename(path))[0] + (f'_{arg}' if arg else '')
  return os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax logs every save at INFO; --verbosity=0 shows it
    logging.set_verbosity(logging.WARNING)
  from research import train  # pylint: disable=g-import-not-at-top  (after flag parsing: fast --help)
  from research.data.image import DataError  # pylint: disable=g-import-not-at-top
  workdir = FLAGS.workdir or default_workdir()
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, workdir)
    else:
      train.evaluate(FLAGS.config, workdir)
  except DataError as e:  # the message says what to do; a traceback would only hide it
    sys.exit(f'DataError: {e}')


if __name__ == '__main__':
  app.run(main)
