"""The config a run saved in its workdir, loaded as an experiment file.

  python launch.py --workdir=runs/mine --config.total_steps=2000   # resume, with more steps
  python launch.py --workdir=runs/mine --mode=eval --config.data.eval_split='train[:1000]'

launch.py passes `--config=research/saved_config.py:WORKDIR` itself when it gets a --workdir
holding a config.json and no --config, so that --config.KEY overrides change that run's own
settings rather than an experiment file's.
"""
import json
import os
import sys

import ml_collections

from research import cli


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json as a ConfigDict; a ValueError naming the file if it is not one."""
  from research import config as config_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  with open(path, encoding='utf-8') as f:
    try:
      saved = json.load(f)
    except ValueError as e:
      raise ValueError(f'{path} is not a config written by a run ({e}).') from e
  for key in config_lib.REQUIRED:
    node = saved
    for part in key.split('.'):
      node = node.get(part) if isinstance(node, dict) else None
    if node is None:
      raise ValueError(f'{path} is not a config written by a run: it has no {key}. Launch with '
                       '--config=experiments/X.py and this --workdir to write it again.')
  # JSON has no tuples; the experiments' sequences are tuples, which overrides can replace.
  tuples = lambda x: ({k: tuples(v) for k, v in x.items()} if isinstance(x, dict) else
                      tuple(tuples(v) for v in x) if isinstance(x, list) else x)
  return ml_collections.ConfigDict(tuples(saved))


def with_saved_config(argv: list[str]) -> list[str]:
  """`argv` with `--config=research/saved_config.py:WORKDIR` added where a launch names no
  --config, a --workdir with a config.json and a mode that reads a config (train, eval,
  compile).
  --config.KEY overrides that have no config to change exit with a line saying why."""
  value = lambda name: (cli.flag_values(argv, name) or [None])[-1]
  if value('config') is not None:
    return argv
  workdir, mode = value('workdir'), value('mode')
  overrides = any(arg.lstrip('-').startswith('config.') for arg in argv[1:])
  saved = bool(workdir) and os.path.isfile(os.path.join(workdir, 'config.json'))
  if overrides and mode == 'sample':
    sys.exit('FATAL Flags parsing error: --mode=sample takes --prompt, --max_new_tokens, '
             '--temperature, --top_k, --top_p and --seed, not --config.KEY overrides.')
  if overrides and not saved:
    sys.exit('FATAL Flags parsing error: --config.KEY overrides need --config=experiments/X.py'
             + (f' or a --workdir holding a run\'s config.json ({workdir}/config.json is '
                'missing).' if workdir else '.'))
  if not saved or mode == 'sample':
    return argv
  here = os.path.relpath(__file__)  # the config flag splits its value at the first ':'
  return [argv[0], f'--config={here if ":" not in here else __file__}:{workdir}', *argv[1:]]
