"""Command-line flag parsing shared by launch.py, research.benchmark and research.torch_reference.

Light on purpose (absl only), so that launch.py's --help stays fast.
"""
import difflib
import dis
import glob
import importlib.util
import os
import re
import sys

from absl import app


def _overrides(argv, flag: str) -> list[list[str]]:
  """The key paths of `--FLAG.KEY=VALUE` overrides ('--config.model.n_layer=2' -> ['model',
  'n_layer']), without list indices ('sizes[0]' -> 'sizes')."""
  prefix = f'--{flag}.'
  return [[re.sub(r'\[.*\]$', '', part) for part in arg[len(prefix):].split('=')[0].split('.')]
          for arg in argv[1:] if arg.startswith(prefix)]


def flag_values(argv, flag: str) -> list[str]:
  """The values given to --FLAG in argv, in order, read as absl reads them: -FLAG or --FLAG,
  =VALUE or the next item (absl uses the last)."""
  values = []
  for i, arg in enumerate(argv[1:], 1):
    name, eq, value = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name == flag:
      if eq:
        values.append(value)
      elif i + 1 < len(argv):
        values.append(argv[i + 1])
  return values


def _load_experiment(value: str):
  """get_config(ARG) of the experiment file `value` ('PATH[:ARG]')."""
  path, _, arg = value.partition(':')
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _unknown_override(argv, flag: str, key: str) -> tuple[str, str | None] | None:
  """The first --FLAG.KEY override (FLAG: config or config_b) with `key` in its path that the
  experiment lacks, cut where it stops resolving ('config.modle' of 'config.modle.dropout'),
  with the closest key there; None if there is none or the experiment cannot be loaded."""
  try:
    config = _load_experiment(flag_values(argv, flag)[-1])
  except Exception:  # pylint: disable=broad-except  (only for the message)
    return None
  for parts in _overrides(argv, flag):
    if key not in parts:
      continue
    node = config
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part in keys:
        node = node[part]
        continue
      match = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
      return ('.'.join([flag, *parts[:i + 1]]),
              '.'.join([flag, *parts[:i], match[0]]) if match else None)
  return None


def _bad_experiment(argv) -> str | None:
  """A line naming a --config (or --config_b) file that does not exist, with the closest
  experiment file, or an ARG its get_config refuses (a ValueError); None when all load."""
  for flag in ('config', 'config_b'):
    for value in flag_values(argv, flag)[-1:]:  # absl takes the last
      path = value.partition(':')[0]
      if not os.path.isfile(path):
        here = os.path.dirname(path) or '.'
        found = sorted(glob.glob(os.path.join(here, '*.py')) + glob.glob('experiments/*.py'))
        match = difflib.get_close_matches(path, found, n=1, cutoff=0.5)
        return (f'--{flag}={value}: no such file {path!r}'
                + (f' (did you mean {match[0]}?)' if match else '') + '.')
      if ':' in value:  # e.g. ':gpu' where the experiment takes ':cpu'
        try:
          _load_experiment(value)
        except ValueError as e:  # (launch.py's own --config for a --workdir: its file named)
          return str(e) if path.endswith('saved_config.py') else f'--{flag}={value}: {e}'
        except Exception:  # pylint: disable=broad-except  (absl reports it with its traceback)
          pass
  return None


def parse_flags(argv):
  """absl's parsing, with a --config.KEY (or --config_b.KEY) override of a key the experiment
  lacks explained (ml_collections raises a bare AttributeError or KeyError for it, deep in a
  traceback), and a missing experiment file or an ARG it refuses named (a chained traceback)."""
  bad = _bad_experiment(argv)
  if bad:
    sys.exit(f'FATAL Flags parsing error: {bad}')
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    e = error
    while e.args and isinstance(e.args[0], (AttributeError, KeyError)):
      e = e.args[0]  # ml_collections wraps the KeyError in an AttributeError
    key = str(e.args[0] if e.args else e).strip('\'"').split("'")[0].split('\n')[0]
    flags = [flag for flag in ('config', 'config_b')
             if any(key in parts for parts in _overrides(argv, flag))]
    if not flags:  # raised by the experiment file itself: its own traceback
      raise
    flag, unknown = next(((flag, found) for flag in flags
                          if (found := _unknown_override(argv, flag, key))), (flags[0], None))
    if unknown:
      key = unknown[0] + (f' (did you mean {unknown[1]}?)' if unknown[1] else '')
    else:  # ml_collections' own hint
      hint = str(e.args[0] if e.args else e).partition('\n')[2].rstrip('?')
      key += f' ({hint})' if hint else ''
    sys.exit(f'FATAL Flags parsing error: a --{flag} override names a key the experiment '
             f'does not have: {key}. An override can only change keys the experiment file '
             "sets (research/config.py lists the common ones; a model's fields are in its "
             'module).')


def raised_here(error: BaseException) -> bool:
  """Whether `error` comes from a `raise` statement of this repository's own code (its input
  checks), not from a library or from an operation that failed in our code (an unpacking, a
  reshape), whose traceback is the way to the cause."""
  tb = error.__traceback__
  while tb.tb_next is not None:
    tb = tb.tb_next
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
  code = tb.tb_frame.f_code
  path = os.path.abspath(code.co_filename)
  ours = any(path.startswith(os.path.join(here, part) + os.sep)
             for part in ('research', 'experiments'))
  return ours and dis.opname[code.co_code[tb.tb_lasti]] == 'RAISE_VARARGS'


OUR_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)  # what our checks raise


def exit_if_ours(error: BaseException):
  """Exits with `error`'s one line when our own checks raised it (they name what to change);
  returns otherwise, for the caller to re-raise (a library's traceback is the way to it)."""
  if raised_here(error):
    sys.exit(f'{type(error).__name__}: {error}')
