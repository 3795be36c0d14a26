"""The config a run saved in its workdir, loaded as an experiment file.

  python launch.py --workdir=runs/mine --config.total_steps=2000   # resume, with more steps
  python launch.py --workdir=runs/mine --mode=eval --config.data.eval_split='train[:1000]'

launch.py passes `--config=research/saved_config.py:WORKDIR` itself when it gets a --workdir
holding a config.json and no --config, so that --config.KEY overrides change that run's own
settings rather than an experiment file's.
"""
import json
import os

import ml_collections


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def with_saved_config(argv: list[str]) -> list[str]:
  """`argv` with `--config=research/saved_config.py:WORKDIR` added where a launch names no
  --config, a --workdir with a config.json and a mode that reads a config (train, eval)."""
  def value(name):
    for i, arg in enumerate(argv[1:], 1):
      if arg.startswith(f'--{name}='):
        return arg.split('=', 1)[1]
      if arg == f'--{name}' and i + 1 < len(argv):
        return argv[i + 1]
    return None
  workdir = value('workdir')
  if (value('config') is not None or not workdir or value('mode') == 'sample'
      or not os.path.isfile(os.path.join(workdir, 'config.json'))):
    return argv
  return [argv[0], f'--config={os.path.abspath(__file__)}:{workdir}', *argv[1:]]
