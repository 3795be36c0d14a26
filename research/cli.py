"""Command-line flag parsing shared by launch.py, research.benchmark and research.torch_reference.

Light on purpose (absl only), so that launch.py's --help stays fast.
"""
import sys

from absl import app


def parse_flags(argv):
  """absl's parsing, with a --config.KEY override of a key the experiment lacks explained
  (ml_collections raises a bare AttributeError or KeyError for it, deep in a traceback)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    e = error
    while e.args and isinstance(e.args[0], (AttributeError, KeyError)):
      e = e.args[0]  # ml_collections wraps the KeyError in an AttributeError
    key = str(e.args[0] if e.args else e).strip('\'"').split("'")[0].split('\n')[0]
    overridden = {part for arg in argv[1:] if arg.startswith('--config.')
                  for part in arg[len('--config.'):].split('=')[0].split('.')}
    if key not in overridden:  # raised by the experiment file itself: its own traceback
      raise
    hint = str(e.args[0] if e.args else e).partition('\n')[2].rstrip('?')
    key += f' ({hint})' if hint else ''
    sys.exit(f'FATAL Flags parsing error: a --config override names a key the experiment '
             f'does not have: {key}. An override can only change keys the experiment file '
             "sets (research/config.py lists the common ones; a model's fields are in its "
             'module).')
