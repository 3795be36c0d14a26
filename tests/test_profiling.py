"""`research/profiling.py`: a jax.profiler trace's time by JAX operation, on a made-up trace
whose every number is known (the end-to-end run is in tests/test_benchmark.py)."""
import gzip
import json

import pytest

from research import profiling

HLO = '''HloModule jit_train_step, entry_computation_layout={...}

ENTRY %main (p: f32[2048,128], q: f32[2048,512]) -> (f32[128,512], f32[4]) {
  %dot.7 = f32[128,512]{1,0} dot(%p, %q), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(GPT))/h_0/c_fc/transpose"}
  %ynn_fusion.3 = f32[2048,512]{1,0} fusion(%p, %w), kind=kCustom, metadata={op_name="jit(train_step)/jvp(GPT)/h_1/c_fc/dot_general"}
  %tuple_fusion = (f32[4]{0}, f32[]) fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/reduce_sum"}
  %while.2 = (s32[], f32[], f32[], f32[], f32[], /*index=5*/f32[], f32[]) while(%t), condition=%c, body=%b, metadata={op_name="jit(train_step)/while"}
  ROOT %t = (f32[128,512]{1,0}, f32[4]{0}) tuple(%dot.7, %tuple_fusion)
}
'''


def write_trace(path, events):
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': 'Host'}}]
  folder = path / 'plugins' / 'profile' / 'run'
  folder.mkdir(parents=True)
  with gzip.open(folder / 'perfetto_trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': meta + events}, f)


def op(hlo_op, ts, dur, tid, module='jit_train_step'):
  return {'ph': 'X', 'name': hlo_op, 'pid': 1, 'tid': tid, 'ts': ts, 'dur': dur,
          'args': {'hlo_op': hlo_op, 'hlo_module': module}}


def step(ts, dur=900):
  return {'ph': 'X', 'name': 'PjitFunction(jit(train_step))', 'pid': 1, 'tid': 9, 'ts': ts,
          'dur': dur}


def test_opcodes_and_names_are_read_from_the_compiled_module():
  names, opcodes = profiling.hlo_op_names(HLO)
  assert opcodes == {'dot.7': 'dot', 'ynn_fusion.3': 'fusion', 'tuple_fusion': 'fusion',
                     'while.2': 'while', 't': 'tuple'}
  assert names['while.2'] == 'jit(train_step)/while'  # a long tuple shape, /*index=5*/ in it
  assert names['dot.7'].endswith('h_0/c_fc/transpose') and names['t'] == ''


def test_eigen_matmuls_get_the_time_until_the_threads_next_op(tmp_path):
  # Two steps (starting at 0 and 1000 us). Thread 1: the dot's event lasts 10 us, its work 190
  # more; then a fusion, 40 us of waiting, another fusion. Thread 2 (the calling thread): an
  # op, then nothing until the next step: that wait is not counted.
  events = [step(0), step(1000)]
  for start in (0, 1000):
    events += [op('dot.7', start + 100, 10, 1), op('ynn_fusion.3', start + 300, 100, 1),
               op('tuple_fusion', start + 440, 20, 1), op('tuple_fusion', start + 10, 5, 2),
               op('ynn_fusion.3', start + 460, 50, 7, module='jit_other')]
  write_trace(tmp_path, events)
  rows = {name: (ms, share, count) for ms, share, count, name in
          profiling.summary(str(tmp_path), HLO, steps=2)}
  assert rows['transpose(jvp(GPT))/h_*/c_fc/transpose'][:3:2] == (pytest.approx(0.2), 1)
  assert rows['jvp(GPT)/h_*/c_fc/dot_general'][:3:2] == (pytest.approx(0.1), 1)
  assert rows['reduce_sum'][:3:2] == (pytest.approx(0.025), 2)
  assert rows[profiling.BETWEEN_OPS][0] == pytest.approx(0.04)  # 300+100 -> 440 only
  assert sum(share for _, share, _ in rows.values()) == pytest.approx(1)
  assert len(rows) == 4  # the other module's op is not this step's


def test_an_eigen_matmul_last_on_its_thread_runs_on_to_the_steps_end(tmp_path):
  # Thread 1's last op of the step is the dot (event 10 us); the step's last op, on thread 2,
  # ends at 500 us (after the host's call returned): the dot's work fills thread 1 until then.
  write_trace(tmp_path, [step(0, dur=50), op('dot.7', 100, 10, 1),
                         op('ynn_fusion.3', 200, 300, 2)])
  rows = {name: ms for ms, _, _, name in profiling.summary(str(tmp_path), HLO, steps=1)}
  assert rows == {'transpose(jvp(GPT))/h_*/c_fc/transpose': pytest.approx(0.4),
                  'jvp(GPT)/h_*/c_fc/dot_general': pytest.approx(0.3)}


def test_without_step_events_only_op_time_is_counted(tmp_path):
  write_trace(tmp_path, [op('dot.7', 100, 10, 1), op('ynn_fusion.3', 300, 100, 1)])
  rows = {name: ms for ms, _, _, name in profiling.summary(str(tmp_path), HLO, steps=1)}
  assert rows == {'transpose(jvp(GPT))/h_*/c_fc/transpose': pytest.approx(0.01),
                  'jvp(GPT)/h_*/c_fc/dot_general': pytest.approx(0.1)}
