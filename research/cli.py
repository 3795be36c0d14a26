"""Command-line flag parsing shared by launch.py, research.benchmark and research.torch_reference.

Light on purpose (absl only), so that launch.py's --help stays fast.
"""
import difflib
import importlib.util
import sys

from absl import app


def _closest_key(argv, dotted: str) -> str | None:
  """The experiment's key closest to `dotted` ('config.model.dropout'), if any comes close."""
  try:
    path = next(arg.split('=', 1)[1] for arg in argv[1:] if arg.startswith('--config='))
    path, _, arg = path.partition(':')
    spec = importlib.util.spec_from_file_location('experiment', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    node = module.get_config(arg or None)
    *parents, leaf = dotted.split('.')[1:]
    for part in parents:
      node = node[part]
    match = difflib.get_close_matches(leaf, list(node.keys()), n=1, cutoff=0.5)
  except Exception:  # pylint: disable=broad-except  (only a hint)
    return None
  return '.'.join(['config', *parents, match[0]]) if match else None


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
    dotted = next(arg[2:].split('=')[0] for arg in argv[1:] if arg.startswith('--config.')
                  and key in arg[len('--config.'):].split('=')[0].split('.'))
    hint = _closest_key(argv, dotted)
    key = dotted + (f' (did you mean {hint}?)' if hint else '')
    sys.exit(f'FATAL Flags parsing error: a --config override names a key the experiment '
             f'does not have: {key}. An override can only change keys the experiment file '
             "sets (research/config.py lists the common ones; a model's fields are in its "
             'module).')
