"""Where a traced step's time went: `jax.profiler` trace events grouped by JAX operation.

Used by `python -m research.benchmark --profile_dir=DIR` (research/benchmark.py).
"""
import bisect
import collections
import glob
import gzip
import json
import os
import re


def hlo_op_names(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
  """Each instruction of a compiled HLO module -> the JAX operation it came from (`op_name`),
  and -> its opcode (`dot`, `fusion`, ...)."""
  names, opcodes = {}, {}
  for line in hlo_text.splitlines():
    line = re.sub(r'/\*index=\d+\*/', '', line)  # inside long tuple shapes
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      names.setdefault(match.group(1), op_name.group(1) if op_name else '')
      opcodes.setdefault(match.group(1), match.group(2))
  return names, opcodes


# On CPUs XLA runs the matmuls that its YNNPACK fusions do not take (those contracting the
# leading axis of an operand: weight gradients) as plain `dot` ops in Eigen, whose work goes on
# on the same threads after the op's trace event has ended (a [2048, 128]^T @ [2048, 512]
# product, jaxlib 0.10.2: a 0.19 ms event, 2.2 ms of wall time). The time until the thread's
# next op is theirs. (Convolutions, and the fused matmuls, ran inside their events.)
EIGEN_ASYNC = ('dot',)
BETWEEN_OPS = '(between ops: scheduling, waiting)'


def summary(trace_dir: str, hlo_text: str, steps: int, top: int = 20):
  """The traced steps' op time by JAX operation: [(ms per step, share, ops, operation)].

  Reads the newest perfetto_trace.json.gz under `trace_dir`; counts the events of the
  operations of the compiled module `hlo_text` (their `hlo_op` argument), on the accelerator
  where there is one (its "XLA Ops" line, if it has one, so that an op is not counted twice),
  else on the host's threads. There, a thread's time between one op and its next op of the
  same step is counted too: after an Eigen matmul (`EIGEN_ASYNC`) as that op's, whose work it
  is, otherwise as `BETWEEN_OPS`.
  """
  traces = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not traces:
    raise FileNotFoundError(f'No perfetto_trace.json.gz under {trace_dir}.')
  module = re.match(r'HloModule ([^\s,]+)', hlo_text).group(1)
  with gzip.open(max(traces, key=os.path.getmtime)) as f:
    events = json.load(f)['traceEvents']
  named = lambda kind: {(e['pid'], e.get('tid')) if kind == 'thread_name' else e['pid']:
                        e['args']['name'] for e in events
                        if e.get('ph') == 'M' and e.get('name') == kind}
  processes, threads = named('process_name'), named('thread_name')
  ops = [e for e in events if e.get('ph') == 'X'
         and (e.get('args') or {}).get('hlo_op') and e['args'].get('hlo_module') == module]
  on_device = [e for e in ops if processes.get(e['pid'], '').startswith('/device:')]
  if on_device:
    ops = on_device
    xla_ops = [e for e in ops if threads.get((e['pid'], e['tid'])) == 'XLA Ops']
    ops = xla_ops or ops
  op_names, opcodes = hlo_op_names(hlo_text)

  def name_of(hlo_op):
    name = op_names.get(hlo_op) or re.sub(r'\.\d+$', '', hlo_op)
    name = re.sub(r'^jit\([^)]*\)/(closed_call/)?', '', name)
    return re.sub(r'(?<=_)\d+(?=/|$)', '*', name)  # h_0 ... h_11 -> h_*, ln_1 -> ln_*

  micros, counts = collections.Counter(), collections.Counter()
  for e in ops:
    name = name_of(e['args']['hlo_op'])
    micros[name] += e['dur']
    counts[name] += 1
  # Steps start where the host calls the compiled step; a thread's wait from one step into the
  # next (the calling thread's, after the first ops) is not the step's. Without those events
  # (another JAX version) only the op events are counted.
  calls = [e for e in events
           if e.get('ph') == 'X' and e.get('name', '').startswith('PjitFunction(')]
  starts = sorted(e['ts'] for e in calls)
  if not on_device and starts:
    step_of = lambda ts: bisect.bisect(starts, ts)
    step_end = collections.defaultdict(float)  # the last op's end, or the call's if later
    for e in ops + calls:
      step_end[step_of(e['ts'])] = max(step_end[step_of(e['ts'])], e['ts'] + e['dur'])
    by_thread = collections.defaultdict(list)
    for e in ops:
      by_thread[e['pid'], e.get('tid')].append(e)
    for thread_ops in by_thread.values():
      thread_ops.sort(key=lambda e: e['ts'])
      for op, after in zip(thread_ops, thread_ops[1:] + [None]):
        end, step = op['ts'] + op['dur'], step_of(op['ts'])
        hlo_op = op['args']['hlo_op']
        async_op = opcodes.get(hlo_op) in EIGEN_ASYNC
        if after is not None and step_of(after['ts']) == step:
          gap = after['ts'] - end
        elif async_op:  # the thread's last op of the step: its work runs on to the step's end
          gap = step_end[step] - end
        else:  # the calling thread waiting for the step, or the trace's end
          continue
        if gap > 0:
          micros[name_of(hlo_op) if async_op else BETWEEN_OPS] += gap
  total = sum(micros.values()) or 1
  return [(us / 1000 / steps, us / total, counts[name] // steps, name)
          for name, us in micros.most_common(top)]
