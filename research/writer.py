"""Where metrics go: the console, WORKDIR/metrics.jsonl and TensorBoard event files."""
import json
import os
import sys
import time

import numpy as np


class MetricWriter:
  """Writes one record per (step, split). Only process 0 writes; the others are no-ops."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    self._tb = self._summary_writer()

  def _summary_writer(self, purge_step=None):
    return _tensorboardx().SummaryWriter(self._tb_dir, flush_secs=30, purge_step=purge_step)

  def write(self, step: int, split: str, metrics: dict, tags: dict | None = None):
    """`tags`: strings that go into the metrics.jsonl record only (e.g. the eval split)."""
    if not self.enabled:
      return
    metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
    record = {'step': int(step), 'split': split, **(tags or {}), **metrics, 'time': time.time()}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f'{split}/{name}', value, step)

  def drop_after(self, step: int) -> int:
    """Removes the metrics.jsonl records of steps after `step` (a resumed run recomputes them:
    they came from steps whose state was never checkpointed); returns how many."""
    if not self.enabled:
      return 0
    path = self._jsonl.name
    self._jsonl.close()
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
    def kept(line):
      try:
        return json.loads(line)['step'] <= step
      except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return False
    keep = [line if line.endswith('\n') else line + '\n' for line in lines if kept(line)]
    if keep != lines:  # also a whole last line without its newline, which the next would join
      with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(keep)
      os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if lines:  # TensorBoard: the earlier launch's events after `step` are hidden (purge_step)
      self._tb.close()
      self._tb = self._summary_writer(purge_step=step + 1)
    return len(lines) - len(keep)

  def log(self, message: str):
    if self.enabled:
      print(message, flush=True)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _tensorboardx():
  """tensorboardX, imported without PyTorch: it imports torch where one is installed, only to
  accept torch tensors (we give it floats), which cost every launch 2.8 s on a 2-core CPU
  (torch 2.13; a third of a small run's start-up) and a JAX process torch's threads. A torch
  already imported is left as it is."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


def progress_line(step: int, total: int, metrics: dict, seconds_per_step: float) -> str:
  eta = int(seconds_per_step * (total - step))
  parts = [f'step {step}/{total}']
  parts += [f'{k} {v:.4g}' for k, v in metrics.items()
            if k not in ('examples_per_sec', 'tokens_per_sec', 'mfu', 'learning_rate')]
  parts.append(f'{metrics["examples_per_sec"]:,.0f} ex/s')
  if 'tokens_per_sec' in metrics:
    parts.append(f'{metrics["tokens_per_sec"]:,.0f} tok/s')
  if 'mfu' in metrics:
    parts.append(f'MFU {100 * metrics["mfu"]:.1f}%')
  parts.append(f'ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}')
  return ' | '.join(parts)
