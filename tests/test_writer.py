"""Tests for research/writer.py: metrics.jsonl records after a resume, TensorBoard events."""
import importlib.util
import json
import struct
import subprocess
import sys

from research import writer as writer_lib
from tests.conftest import ROOT


def test_drop_after_removes_later_records_and_a_cut_line(tmp_path):
  """A run killed after its last checkpoint resumes there and logs those steps again: their old
  records (and a line cut short by the kill, which the next record would be appended to) go."""
  writer = writer_lib.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write(step, 'train', {'loss': step / 10})
  writer.write(20, 'eval', {'loss': 0.5}, tags={'eval_split': 'test'})
  writer._jsonl.write('{"step": 40, "spl')  # pylint: disable=protected-access
  writer._jsonl.flush()  # pylint: disable=protected-access
  assert writer.drop_after(20) == 2  # step 30 and the cut line
  writer.write(30, 'train', {'loss': 9.0})
  writer.close()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split'], r['loss']) for r in records] == [
      (10, 'train', 1.0), (20, 'train', 2.0), (20, 'eval', 0.5), (30, 'train', 9.0)]
  assert records[2]['eval_split'] == 'test'
  assert not list(tmp_path.glob('*.tmp'))


def test_drop_after_keeps_everything_up_to_the_step(tmp_path):
  writer = writer_lib.MetricWriter(str(tmp_path))
  writer.write(5, 'train', {'loss': 1.0})
  assert writer.drop_after(5) == 0
  assert writer_lib.MetricWriter(str(tmp_path), enabled=False).drop_after(0) == 0
  writer.close()
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 1


def test_drop_after_ends_a_kept_last_line(tmp_path):
  """A whole last record without its newline (cut just before it): the next record was
  appended onto it, and a later resume dropped both."""
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 10, "split": "train", "loss": 1.0}\n'
                  '{"step": 20, "split": "eval", "loss": 0.5}')
  writer = writer_lib.MetricWriter(str(tmp_path))
  assert writer.drop_after(20) == 0
  writer.write(30, 'train', {'loss': 2.0})
  writer.close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [10, 20, 30]


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch where one is installed (as in the test environment): that cost
  every launch 2.8 s of start-up. In a fresh process, as launch.py starts."""
  code = f"""
import sys
from research import writer
w = writer.MetricWriter({str(tmp_path)!r})
w.write(3, 'train', {{'loss': 1.5}})
w.close()
print('torch' in sys.modules)
"""
  if importlib.util.find_spec('torch'):
    code += 'import torch\n'  # still importable afterwards
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0 and done.stdout == 'False\n', done.stderr[-3000:]
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  (path,) = (tmp_path / 'tensorboard').iterdir()
  data, scalars = path.read_bytes(), []
  while data:  # TFRecord framing: length (8 bytes), its CRC (4), the event, its CRC (4)
    (length,) = struct.unpack('<Q', data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    data = data[12 + length + 4:]
  assert scalars == [(3, 'train/loss', 1.5)]
