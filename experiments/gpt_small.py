"""GPT-2 small (124M with GPT-2's vocabulary): 12 layers, 12 heads, 768 wide, context 1024.

  python launch.py --config=experiments/gpt_small.py          # accelerators
  python launch.py --config=experiments/gpt_small.py --mode=compile   # fits? (memory, FLOPs)
  python launch.py --config=experiments/gpt_small.py:cpu      # 17-44 s on a 2-core CPU
  python launch.py --config=experiments/gpt_small.py:nano     # the nano model of the benchmark
  python launch.py --mode=sample --workdir=runs/... --prompt="def "

Data: by default the Python standard library's own source files, a corpus that exists on every
machine with Python (no download). To train on something else:
  --config.data.source=path/to/*.txt          local text files (one document per file)
  --config.data.source=tfds:lm1b              a prepared TFDS text dataset
  --config.data.tokenizer=gpt2                GPT-2's BPE (needs tiktoken and its files)
The full run uses a SentencePiece BPE of GPT-2's vocabulary size (50,257) trained on the
training split (cached), AdamW (beta2 0.95, weight decay 0.1 on matrices only), warmup then
cosine decay, clipping at 1.0, and a global batch of 512 x 1024 = 0.5M tokens made of 8
micro-batches of 64, layers unrolled (on an H200 scanning them cost 1.5x in step time; 16
micro-batches of 32 cost 1.1x). Full run: not measured yet in this repository.
Measured (one H200, 2026-11-26, bf16, `python -m research.benchmark`): 1.19 s per 0.5M-token
step, 439k tokens/s, 38% MFU, 46 GB peak memory; nanoGPT's model with torch.compile on the
same kind of card: 432k tokens/s (BENCHMARKS.md).
Measured (2-core CPU, 2026-11-26): `:cpu` (2 layers, 128 wide, 462K parameters, 300 steps of
16 x 128 bytes) takes 17-25 s for the whole command (47-54k tokens/s while training) and
reaches a validation loss of 2.18 nats per byte (uniform: 5.55). On 2026-11-27, the same
machine kind in a slow hour: 32-34 s warm, 42 s with nothing cached, in a fresh virtual
environment from requirements.txt (24-30k tokens/s; the code of 2026-11-26, alternated with
today's, took 41-44 s then: the machine, not the code, was slower).
Several devices: --config.parallel.mesh.fsdp=8 (and .data, .tensor); see README.md.
"""
from research import config as config_lib
from research.models import transformer


def get_config(arg=None):
  options = config_lib.parse_arg(arg, allowed=('cpu', 'nano'))
  size = 'nano' if options else 'small'
  c = config_lib.defaults('gpt', **transformer.gpt_config(size, dropout_rate=0.0))
  c.seed = 0
  c.batch_size = 512
  c.grad_accum_steps = 8
  c.total_steps = 20000
  c.log_every_steps = 10
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.max_eval_batches = 20
  c.eval_batch_size = 32
  c.model.dtype = 'bfloat16'
  c.model.scan_layers = False  # True: faster compiles, 1.5x slower steps (BENCHMARKS.md)
  c.data.name = 'text'
  c.data.source = 'python_stdlib'
  c.data.tokenizer, c.data.vocab_size = 'bpe', 50257
  c.data.seq_len = c.model.block_size
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate, c.optimizer.min_learning_rate = 6e-4, 6e-5
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.schedule, c.optimizer.warmup_steps = 'warmup_cosine', 700
  c.optimizer.grad_clip_norm = 1.0
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 128
  if options:  # CPU-sized: float32, byte vocabulary, no accumulation, layers unrolled
    c.model.dtype = 'float32'
    c.data.tokenizer, c.data.vocab_size = 'byte', 0
    c.batch_size, c.grad_accum_steps, c.eval_batch_size = 16, 1, 16
    # On CPUs, the batch as two halves that XLA runs at once on two cores: the nano step
    # 10% faster on 2 cores than one batch whose every op is split over them (BENCHMARKS.md).
    c.parallel.cpu_batch_parts = 2
    c.data.seq_len = c.model.block_size  # 256
    c.optimizer.learning_rate, c.optimizer.min_learning_rate = 1e-3, 1e-4
    c.optimizer.warmup_steps = 20
    c.total_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = c.checkpoint_every_steps = 150
    c.max_eval_batches = 10
    c.sample.max_new_tokens = 64
  if 'cpu' in options:  # smaller still: 2 layers, context 128, a 2 MB slice of the corpus
    c.model.n_layer, c.model.block_size = 2, 128
    c.data.seq_len = 128
    c.data.max_bytes = 2_000_000
  return c
