"""PyTorch reference for the benchmark: the same networks, trained the same way, in eager torch.

  python -m research.torch_reference --config=experiments/gpt_small.py:nano [--steps=N]

Reads the experiment's config and builds the matching torch network (a nanoGPT-style GPT with
the same layer sizes, tied head and dropout placement, checked against ours in
tests/test_torch_reference.py; or the MNIST CNN / LeNet-5), trains it with the same optimizer
(AdamW / Adam) and gradient accumulation on random data of the same shape, and prints one JSON
line with `research.benchmark`'s throughput fields (tokens/examples per second, step_ms,
params, batch_size, seq_len; `mfu_vs_989tflops` on GPUs) and its own (threads, torch,
compiled). On CPU it runs float32 in eager mode, with torch's default (per-tensor) optimizer as
nanoGPT does there (`--fused_optimizer`: torch's fused CPU kernel instead). On a
GPU (`--device=cuda`) it runs as nanoGPT does there: parameters float32, activations under
bfloat16 autocast when the config's model.dtype is bfloat16, fused AdamW, flash attention
through `scaled_dot_product_attention`, and `--compile` for `torch.compile`. Host memory is
tuned as for `research.benchmark` (research/hostmem.py), so both run under the same malloc
settings. Only for measuring; torch is a test dependency (requirements-test.txt), not a
dependency of the library.
"""
# First, as in research.benchmark: see research/hostmem.py.
from research import hostmem  # pylint: disable=g-import-not-at-top,g-bad-import-order
hostmem.keep_freed_memory(jax_on_main_thread=False)
import json
import math
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import torch
from torch import nn
from torch.nn import functional as F

from research import cli
from research.models import transformer

config_flags.DEFINE_config_file('config', None, 'Experiment file: experiments/X.py[:ARG].')
flags.DEFINE_integer('steps', 20, 'Timed steps.')
flags.DEFINE_integer('warmup', 3, 'Untimed steps.')
flags.DEFINE_integer('vocab_size', 257, 'GPT: the vocabulary (the byte tokenizer has 257; '
                     'GPT-2 small: 50304, its 50257 padded as ours is).')
flags.DEFINE_string('device', 'cpu', "'cpu' or 'cuda'.")
flags.DEFINE_bool('compile', False, 'torch.compile the model (as nanoGPT does on GPUs).')
flags.DEFINE_bool('fused_optimizer', False, "On CPU too: torch's fused AdamW/Adam kernel (on GPUs "
                  'it is always used, as in nanoGPT).')
FLAGS = flags.FLAGS


class Block(nn.Module):
  def __init__(self, width, heads, bias, dropout):
    super().__init__()
    self.heads = heads
    self.drop = nn.Dropout(dropout)  # on each residual branch, as research/models/transformer.py
    self.ln_1, self.ln_2 = nn.LayerNorm(width, bias=bias), nn.LayerNorm(width, bias=bias)
    self.c_attn, self.attn_proj = nn.Linear(width, 3 * width, bias), nn.Linear(width, width, bias)
    self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width, bias), nn.Linear(4 * width, width, bias)

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
    q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.drop(self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c)))
    return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate='tanh')))


class GPT(nn.Module):
  def __init__(self, vocab, block_size, n_layer, n_head, n_embd, bias, dropout):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
    self.drop = nn.Dropout(dropout)  # on the embeddings
    self.h = nn.ModuleList(Block(n_embd, n_head, bias, dropout) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd, bias=bias)

  def forward(self, idx):
    x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
    for block in self.h:
      x = block(x)
    return self.ln_f(x) @ self.wte.weight.T  # tied head


def mnist_cnn():
  return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3),
                       nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                       nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))


def lenet5():
  return nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                       nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                       nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def build(config):
  """(model, optimizer, inputs, targets, tokens per example) for the experiment."""
  m, opt, b = config.model, config.optimizer, config.batch_size
  device = torch.device(FLAGS.device)
  fused = device.type == 'cuda' or FLAGS.fused_optimizer or None
  # What this reference does not implement is refused, not silently trained otherwise.
  unsupported = [f'{key}={value!r}' for key, value, fine in (
      ('optimizer.name', opt.name, opt.name in ('adam', 'adamw')),
      ('label_smoothing', config.get('label_smoothing', 0.0), not config.get('label_smoothing')),
      ('loss', config.get('loss', 'cross_entropy'),
       config.get('loss', 'cross_entropy') == 'cross_entropy'),
      ('optimizer.weight_decay (with adam)', opt.get('weight_decay', 0.0),
       opt.name != 'adam' or not opt.get('weight_decay'))) if not fine]
  if unsupported:
    raise app.UsageError('The PyTorch reference trains with AdamW or Adam (no weight decay) on '
                         'the plain cross-entropy; not with config.'
                         + ', config.'.join(unsupported))
  if m.name == 'gpt':
    model = GPT(FLAGS.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.use_bias,
                m.get('dropout_rate', 0.0))
    t = config.data.seq_len
    x = torch.randint(0, FLAGS.vocab_size, (b, t))
    y = torch.randint(0, FLAGS.vocab_size, (b, t))
  elif m.name in ('mnist_cnn', 'lenet5'):
    model = mnist_cnn() if m.name == 'mnist_cnn' else lenet5()
    shape = (b, 1, 28, 28) if m.name == 'mnist_cnn' else (b, 3, 32, 32)
    x, y, t = torch.randn(shape), torch.randint(0, 10, (b,)), None
  else:
    raise app.UsageError(f'No torch reference for model {m.name!r}.')
  model.to(device)
  if opt.name == 'adamw':
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': opt.weight_decay},
                                   {'params': rest, 'weight_decay': 0.0}],
                                  lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                                  fused=fused)
  else:
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.learning_rate,
                                 betas=(opt.b1, opt.b2), eps=opt.eps, fused=fused)
  return model, optimizer, x.to(device), y.to(device), t


def main(argv):
  del argv
  config = FLAGS.config
  torch.manual_seed(0)
  model, optimizer, x, y, seq_len = build(config)
  forward = torch.compile(model) if FLAGS.compile else model
  cuda = x.device.type == 'cuda'
  autocast = torch.autocast('cuda', torch.bfloat16, enabled=(
      cuda and config.model.get('dtype') in ('bfloat16', 'auto')))
  accum = config.get('grad_accum_steps', 1) or 1
  micro_x, micro_y = x.chunk(accum), y.chunk(accum)

  def step():
    optimizer.zero_grad(set_to_none=True)
    for xs, ys in zip(micro_x, micro_y):
      with autocast:
        logits = forward(xs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ys.reshape(-1))
      (loss / accum).backward()
    if config.optimizer.grad_clip_norm:
      nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
    optimizer.step()
    return loss.item()  # waits for the step, on a GPU too

  for _ in range(FLAGS.warmup):
    step()
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  assert math.isfinite(loss)
  step_s = statistics.median(times)
  result = {'examples_per_sec': config.batch_size / step_s}
  if seq_len:
    result['tokens_per_sec'] = result['examples_per_sec'] * seq_len
  result.update(step_ms=1000 * step_s, params=sum(p.numel() for p in model.parameters()),
                batch_size=config.batch_size, seq_len=seq_len, threads=torch.get_num_threads(),
                torch=torch.__version__, compiled=FLAGS.compile,
                fused_optimizer=bool(cuda or FLAGS.fused_optimizer),
                device=torch.cuda.get_device_name() if cuda else 'cpu',
                config=flags.FLAGS['config'].config_filename)
  if seq_len and config.model.name == 'gpt':  # MFU as research.benchmark counts it
    m = config.model
    per_token = transformer.flops_per_token(result['params'] - m.block_size * m.n_embd,
                                            m.n_layer, m.n_embd, seq_len)
    result['mfu_vs_989tflops'] = per_token * result['tokens_per_sec'] / 989e12 if cuda else None
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
