"""GPT-2: a decoder-only Transformer language model in Flax Linen, with a KV cache for sampling.

Pre-LayerNorm blocks (causal self-attention, then a 4x GELU MLP), learned position embeddings,
and an output head tied to the token embedding, initialised as in GPT-2. Parameter names follow
GPT-2 (`wte`, `wpe`, `h_0/ln_1`, `h_0/c_attn`, ...) so that released weights map over by name.

The token embedding has `vocab_size` rounded up to a multiple of 128 rows (GPT-2's 50257 ->
50304, as in nanoGPT) so that the output matmul tiles well on accelerators. The extra rows are
never looked up and never predicted: the logits are sliced back to exactly `vocab_size`, so the
softmax, the loss and sampling never see them (and they receive no gradient).

With `decode=True` each block keeps the keys and values of the tokens seen so far in the 'cache'
collection (`cached_key`, `cached_value` of shape [batch, block_size, heads, head_dim] and a
`cache_index`), as in the Flax lm1b example; positions come from the model's own `cache_index`.
Each call appends its tokens (one, or a whole prompt); the caller keeps the total within
block_size, as `research/sample.py` does. This works with `scan_layers` too (the cache is then
stacked on a leading layer axis like the parameters).
"""
import math
from typing import Any

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp

SIZES = {
    'nano': dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    'small': dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),    # GPT-2 124M
    'medium': dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    'large': dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),   # 774M
    'xl': dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),      # 1558M
}
ATTENTION = ('auto', 'xla', 'cudnn', 'chunked', 'reference')
QUERY_CHUNK = 64  # rows of queries per block of 'chunked' attention


def attention_for(q, mask) -> str:
  """What 'auto' runs: cuDNN's fused flash attention where it applies (an NVIDIA GPU from
  Ampere on, 16-bit inputs, plain causal attention, head_dim a multiple of 8 up to 128);
  'chunked' on CPUs; else XLA's.

  `jax.nn.dot_product_attention` with no implementation named runs XLA's version even on GPUs,
  which measured half the speed of cuDNN's for GPT-2 small on an H200, and on a 2-core CPU a
  quarter of the speed of 'chunked' for the nano GPT's shapes (BENCHMARKS.md).
  """
  if mask is not None:
    return 'xla'
  backend = jax.default_backend()
  if (backend == 'gpu' and cudnn_flash_attention(jax.devices()[0])
      and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
      and q.shape[-1] <= 128):
    return 'cudnn'
  return 'chunked' if backend == 'cpu' else 'xla'


def cudnn_flash_attention(device) -> bool:
  """Whether cuDNN's flash attention runs on `device`: an NVIDIA GPU (not ROCm's, also
  platform 'gpu') from Ampere on (compute capability 8.0; JAX itself does not check)."""
  if 'cuda' not in str(getattr(device.client, 'platform_version', '')).lower():
    return False
  try:
    return tuple(int(x) for x in device.compute_capability.split('.')) >= (8, 0)
  except (AttributeError, ValueError):
    return False


def gpt_config(size: str, **overrides) -> dict:
  """The fields of `GPT` for a named size, e.g. `gpt_config('small', vocab_size=50257)`."""
  if size not in SIZES:
    raise ValueError(f'Unknown GPT size {size!r}; known sizes: {list(SIZES)}.')
  return {**SIZES[size], **overrides}


def count_params(params) -> int:
  """Number of parameters in a pytree of arrays (or of `jax.ShapeDtypeStruct`s)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
  """Training FLOPs per token (forward + backward): 6 N + 12 L C T, as in nanoGPT and PaLM.

  `n_params` is N as nanoGPT counts it: all parameters except the position embedding
  (`count_params(params) - params['wpe']['embedding'].size`). The tied token embedding stays in
  because it is the output head's matmul. 12 L C T is the attention scores and the weighted sum
  of values over the full (not causally halved) context of `seq_len` tokens.
  """
  return 6 * n_params + 12 * n_layer * n_embd * seq_len


def gpt_flops_per_token(params, n_layer: int, n_embd: int, seq_len: int) -> int:
  """`flops_per_token` of a GPT's parameters: N is all of them but the position table."""
  return flops_per_token(count_params(params) - math.prod(params['wpe']['embedding'].shape),
                         n_layer, n_embd, seq_len)


def step_matmuls(model, tokens: int, seq_len: int, chunked: bool) -> list[tuple]:
  """The matrix products of one GPT training step over `tokens` tokens (sequences of `seq_len`):
  [(what, einsum spec, lhs shape, rhs shape, how many)]. Dense layers: the forward product, the
  input gradient and the weight gradient, the head's too (it is the token embedding, whose rows
  it multiplies as the model does: `vocab_size` on CPUs, the padded table elsewhere; the
  embedding lookup is no product). Attention per (sequence, head): scores, the
  weighted sum of values, and the four gradient products (dP, dV, dS K, dS^T Q), per block of
  `QUERY_CHUNK` queries against the keys they see where `chunked`, else full
  [seq_len, seq_len]."""
  c, layers, heads = model.n_embd, model.n_layer, model.n_head
  rows = model.vocab_size if _head_drops_padding() else model.padded_vocab
  out = []
  for what, fin, fout in (('c_attn', c, 3 * c), ('attn_proj', c, c), ('c_fc', c, 4 * c),
                          ('mlp_proj', 4 * c, c)):  # kernels [in, out]
    out += [(f'{what} forward', 'mk,kn->mn', (tokens, fin), (fin, fout), layers),
            (f'{what} input gradient', 'mn,kn->mk', (tokens, fout), (fin, fout), layers),
            (f'{what} weight gradient', 'mk,mn->kn', (tokens, fin), (tokens, fout), layers)]
  # The head: x @ table.T, the table [rows, width].
  out += [('head forward', 'mk,nk->mn', (tokens, c), (rows, c), 1),
          ('head input gradient', 'mn,nk->mk', (tokens, rows), (rows, c), 1),
          ('head weight gradient', 'mn,mk->nk', (tokens, rows), (tokens, c), 1)]
  batch, head_dim = tokens // seq_len * heads, c // heads
  block = QUERY_CHUNK if chunked else seq_len
  for start in range(0, seq_len, block):
    q, k = min(block, seq_len - start), min(start + block, seq_len)
    where = f'attention, queries {start}-{start + q}'
    qs, ks, ss = (batch, q, head_dim), (batch, k, head_dim), (batch, q, k)
    out += [(f'{where}: scores', 'bqh,bkh->bqk', qs, ks, layers),
            (f'{where}: values', 'bqk,bkh->bqh', ss, ks, layers),
            (f'{where}: dP', 'bqh,bkh->bqk', qs, ks, layers),
            (f'{where}: dV', 'bqk,bqh->bkh', ss, qs, layers),
            (f'{where}: dQ', 'bqk,bkh->bqh', ss, ks, layers),
            (f'{where}: dK', 'bqk,bqh->bkh', ss, qs, layers)]
  return out


def einsum_flops(spec: str, lhs: tuple, rhs: tuple) -> int:
  """2 x the product of every distinct axis size of an einsum of two operands."""
  ins, _ = spec.split('->')
  sizes = {}
  for names, shape in zip(ins.split(','), (lhs, rhs)):
    sizes.update(zip(names, shape))
  return 2 * math.prod(sizes.values())


def attend(q, k, v, mask, implementation):
  """Causal multi-head attention; q [B, T, N, H], k and v [B, S, N, H] -> [B, T, N, H].

  `mask` (bool, broadcastable to [B, N, T, S], True = attend) is given when decoding from the
  cache; None means plain causal attention with T == S.
  """
  if implementation == 'auto':
    implementation = attention_for(q, mask)
  if implementation == 'chunked' and mask is None:
    return chunked_causal_attention(q, k, v)
  if implementation == 'reference':
    if mask is None:
      mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    scores = jnp.einsum('btnh,bsnh->bnts', q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(scores).astype(v.dtype), v)
  if mask is not None:  # cuDNN's fused kernel wants T == S; decoding uses XLA's.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def chunked_causal_attention(q, k, v, chunk: int = QUERY_CHUNK):
  """Causal attention computed in blocks of `chunk` queries, each against only the keys it can
  see, so the fully masked upper triangle is never computed (about half the work at length
  T >> chunk). Heads are moved before time once, so every matmul is a contiguous batched one,
  and the softmax is normalised after the values are summed (one division of [chunk, head_dim]
  instead of [chunk, keys]). Exact: the same function as 'reference', to float rounding.

  This is what XLA's CPU backend runs fastest (BENCHMARKS.md); on accelerators the fused
  kernels ('cudnn') are better.
  """
  time = q.shape[1]
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q / math.sqrt(q.shape[-1]), k, v))  # [B,N,T,H]
  outs = []
  for start in range(0, time, chunk):
    end = min(start + chunk, time)
    s = jnp.einsum('bnqh,bnkh->bnqk', qt[:, :, start:end], kt[:, :, :end]).astype(jnp.float32)
    # The mask as an added 0 or -1e30 (every row sees its own key, so its max is a real
    # score): XLA's CPU backend fuses an add into the softmax, unlike a select (3-4%). Built
    # from iotas, so the compiled program holds no [chunk, end] constants.
    rows = jax.lax.broadcasted_iota(jnp.int32, (end - start, end), 0) + start
    cols = jax.lax.broadcasted_iota(jnp.int32, (end - start, end), 1)
    s = s + jnp.where(cols <= rows, 0.0, -1e30)  # float32, like s
    p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    o = jnp.einsum('bnqk,bnkh->bnqh', p.astype(v.dtype), vt[:, :, :end])
    outs.append((o / p.sum(-1, keepdims=True)).astype(v.dtype))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


class KVCache(nn.Module):
  """Appends this call's keys and values to the cache; returns all of them and the causal mask."""
  block_size: int

  @nn.compact
  def __call__(self, k, v):
    batch, time, heads, head_dim = k.shape
    initialized = self.has_variable('cache', 'cached_key')
    shape = (batch, self.block_size, heads, head_dim)
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, shape, v.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # `init` only builds the empty cache.
      return k, v, None
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
    index.value = i + time
    mask = jnp.arange(self.block_size)[None, :] <= i + jnp.arange(time)[:, None]  # [T, S]
    return cached_k.value, cached_v.value, mask[None, None]


def constrain(x, names):
  """Asks XLA to lay `x` out by logical axis names (a no-op outside `nn.logical_axis_rules`)."""
  return nn.with_logical_constraint(x, names)


def layer_norm(name, module):
  """GPT-2's LayerNorm (epsilon 1e-5), its scale and bias named over 'embed'."""
  return nn.LayerNorm(
      epsilon=1e-5, use_bias=module.use_bias, dtype=module.dtype,
      param_dtype=module.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class Dense(nn.Module):
  """x @ kernel + bias, contracting the last `in_dims` axes of x.

  The kernel's axes (inputs..., outputs...) carry the logical names `names`, which
  `research/parallel.py` maps to mesh axes; `features` may be a tuple (e.g. (3, heads, dim)).
  """
  features: int | tuple[int, ...]
  names: tuple
  in_dims: int = 1
  use_bias: bool = True
  std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(nn.initializers.normal(self.std), self.names),
        (*x.shape[x.ndim - self.in_dims:], *features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    # One row per token ([batch, length, ...] -> [tokens, ...]): with batch and length as two
    # axes, the kernel's gradient contracts both, and XLA's CPU backend fed that product
    # through transposes of the whole activation gradient (shakespeare_char's step on a 2-core
    # CPU: 12.5 s, 8.0 s as tokens; BENCHMARKS.md). Batch is the major axis, so its sharding
    # carries over.
    # On CPUs the kernel is flattened to a matrix as well (c_attn's [embed, 3, heads, dim] and
    # attn_proj's [heads, dim, embed]): its gradients with several contracting axes ran at half
    # the matmul speed there. Elsewhere, or where an axis other than the first of those merged
    # is split over devices (c_attn's heads under tensor parallelism), it is not: the reshape
    # would gather the kernel and every device would compute all of it.
    lead, inputs = x.shape[:x.ndim - self.in_dims], x.shape[x.ndim - self.in_dims:]
    if (jax.default_backend() == 'cpu' and _merges_in_place(self.names[:self.in_dims])
        and _merges_in_place(self.names[self.in_dims:])):
      x, kernel = x.reshape(-1, math.prod(inputs)), kernel.reshape(math.prod(inputs), -1)
      contract = ((1,), (0,))
    else:
      x = x.reshape(-1, *inputs)
      contract = (tuple(range(1, 1 + self.in_dims)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ()))).reshape(*lead, *features)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros, self.names[self.in_dims:]),
          features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _devices(names) -> list[int]:
  """Over how many devices each of the logical axes `names` is split, under the mesh and rules
  being traced with (research/parallel.py); all 1 outside them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return [1] * len(names)
  def devices(axes):
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)
  return [devices(axes) for axes in nn.logical_to_mesh_axes(names)]


def _merges_in_place(names) -> bool:
  """Whether axes with logical `names` merge into one without moving data between devices:
  only the first may be split."""
  return all(n == 1 for n in _devices(names)[1:])


def _head_drops_padding() -> bool:
  """Whether the tied head drops the embedding's padding rows before its matmul (GPT.__call__):
  on CPUs, unless the vocabulary is split over devices."""
  return jax.default_backend() == 'cpu' and _devices(('vocab',)) == [1]


class Block(nn.Module):
  """x + attention(ln_1(x)), then x + mlp(ln_2(x)); called as a scan body: (x, _) -> (x, None)."""
  n_head: int
  n_layer: int
  block_size: int
  dropout_rate: float
  use_bias: bool
  attention: str
  decode: bool
  deterministic: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, _=None):
    width = x.shape[-1]
    def dense(features, names, name, std=0.02, in_dims=1):
      return Dense(features, names, in_dims, self.use_bias, std, self.dtype, self.param_dtype,
                   name=name)
    dropout = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)
    residual_std = 0.02 / math.sqrt(2 * self.n_layer)  # GPT-2's scaled residual projections.

    # q, k, v: [batch, time, heads, head_dim]; heads are what tensor parallelism splits.
    qkv = dense((3, self.n_head, width // self.n_head), ('embed', None, 'heads', 'kv'),
                'c_attn')(layer_norm('ln_1', self)(x))
    q, k, v = (constrain(qkv[:, :, i], ('batch', 'length', 'heads', 'kv')) for i in range(3))
    mask = None
    if self.decode:
      k, v, mask = KVCache(self.block_size, name='cache')(k, v)
    y = attend(q, k, v, mask, self.attention)
    y = dense(width, ('heads', 'kv', 'embed'), 'attn_proj', residual_std, in_dims=2)(y)
    x = constrain(x + dropout(y), ('batch', 'length', 'embed'))

    y = dense(4 * width, ('embed', 'mlp'), 'c_fc')(layer_norm('ln_2', self)(x))
    y = constrain(nn.gelu(y, approximate=True), ('batch', 'length', 'mlp'))
    x = x + dropout(dense(width, ('mlp', 'embed'), 'mlp_proj', residual_std)(y))
    return constrain(x, ('batch', 'length', 'embed')), None


REMAT_ON_CPU = ("config.model.remat='{}' saves no memory on CPUs with unrolled layers (XLA's CPU "
                'compiler folds the recomputation back in); set config.model.scan_layers=True '
                'with it.')
_WARNED = set()


def remat_policy(name: str):
  """'full' saves nothing; 'dots' (or any `jax.checkpoint_policies` name) saves some matmuls."""
  if name == 'full':
    return None
  name = {'dots': 'dots_with_no_batch_dims_saveable'}.get(name, name)
  if not hasattr(jax.checkpoint_policies, name):
    raise ValueError(f"config.model.remat={name!r} is not 'none', 'full', 'dots' or a "
                     'jax.checkpoint_policies name such as dots_saveable.')
  return getattr(jax.checkpoint_policies, name)


class GPT(nn.Module):
  """GPT-2 language model: int32 tokens [batch, time] -> float32 logits [batch, time, vocab]."""
  vocab_size: int = 256
  block_size: int = 256        # the context length: positions 0 .. block_size - 1
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  dropout_rate: float = 0.0    # on the embeddings and on each residual branch
  use_bias: bool = True        # in the Dense and LayerNorm layers
  dtype: Any = jnp.float32     # activations and matmuls
  param_dtype: Any = jnp.float32
  attention: str = 'auto'      # 'auto' (cuDNN flash attention on GPUs where it applies,
                               # 'chunked' on CPUs, else 'xla'), 'xla', 'cudnn', 'chunked'
                               # (causal blocks, see chunked_causal_attention), or
                               # 'reference' (explicit einsum + softmax, for tests)
  remat: str = 'none'          # 'none', 'full', 'dots' or a jax.checkpoint_policies name
  scan_layers: bool = False    # one nn.scan over the blocks; parameters stacked on axis 0
  decode: bool = False         # KV-cache mode for sampling; see research/sample.py

  @classmethod
  def check_fields(cls, fields: dict):
    """Config validation before anything is built (see research/models/__init__.py)."""
    n_embd, n_head = fields.get('n_embd', cls.n_embd), fields.get('n_head', cls.n_head)
    for key in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'):
      value = fields.get(key, getattr(cls, key))
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'config.model.{key} must be a positive integer, got {value!r}.')
    if n_embd % n_head:
      raise ValueError(f'config.model.n_embd={n_embd} must be divisible by '
                       f'config.model.n_head={n_head}.')
    if fields.get('attention', cls.attention) not in ATTENTION:
      raise ValueError(f'config.model.attention={fields["attention"]!r} is not one of '
                       f'{list(ATTENTION)}.')
    remat = fields.get('remat', cls.remat)
    if not isinstance(remat, str):
      raise ValueError(f"config.model.remat={remat!r}: use 'none', 'full', 'dots' or a "
                       'jax.checkpoint_policies name such as dots_saveable.')
    if remat != 'none':
      remat_policy(remat)  # an unknown name: its error before the warning below
    if (remat != 'none' and not fields.get('scan_layers', cls.scan_layers)
        and jax.default_backend() == 'cpu'):
      # XLA's CPU compiler drops the barriers that keep a recomputation apart from the forward
      # pass: the step then keeps every activation (a 4-layer GPT's temporaries the same) and
      # recomputes some besides. Scanned layers keep them apart (tests/test_transformer.py).
      warning = REMAT_ON_CPU.format(remat)
      if warning not in _WARNED:  # once: the config is checked when read and when built
        _WARNED.add(warning)
        logging.warning(warning)

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // 128) * 128

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    batch, time = tokens.shape
    if time > self.block_size:
      raise ValueError(f'Input has {time} tokens but config.model.block_size={self.block_size}.')
    if self.n_embd % self.n_head:
      raise ValueError(f'config.model.n_embd={self.n_embd} must be divisible by '
                       f'config.model.n_head={self.n_head}.')
    if self.attention not in ATTENTION:
      raise ValueError(f'config.model.attention={self.attention!r} is not one of '
                       f'{list(ATTENTION)}.')

    embed = lambda rows, names, name: nn.Embed(
        rows, self.n_embd, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names))
    wte = embed(self.padded_vocab, ('vocab', 'embed'), 'wte')
    positions = jnp.arange(time)
    if self.decode:  # Continue from the positions already in the cache.
      initialized = self.has_variable('cache', 'cache_index')
      index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
      if initialized:
        positions, index.value = positions + index.value, index.value + time
    pos = embed(self.block_size, (None, 'embed'), 'wpe')(positions)  # [time, embed]
    # The same for every sequence, written as an outer product with ones so that its gradient
    # (a sum over the batch) is a contraction: XLA's CPU backend reduces over a leading axis
    # 40x slower than it contracts (28 vs 0.6 ms at shakespeare_char's [64, 256, 384]).
    # On CPU meshes the lookup reads the whole table: a lookup in its shards (vocab over
    # tensor, embed over fsdp) made XLA replicate the result to lay it out over the batch
    # ('involuntary full rematerialization'). Elsewhere not measured, and this would add a
    # gather of the table and a separate reduction of its gradient (XLA's HLO for GPUs).
    table = wte.embedding.astype(self.dtype)
    if jax.default_backend() == 'cpu':
      table = constrain(table, (None, None))
    x = jnp.take(table, tokens, axis=0) + jnp.einsum('b,tc->btc', jnp.ones((batch,), pos.dtype),
                                                     pos)
    x = constrain(nn.Dropout(self.dropout_rate, deterministic=not train)(x),
                  ('batch', 'length', 'embed'))

    block = Block
    if self.remat != 'none':
      block = nn.remat(Block, policy=remat_policy(self.remat), prevent_cse=not self.scan_layers)
    kwargs = dict(n_head=self.n_head, n_layer=self.n_layer, block_size=self.block_size,
                  dropout_rate=self.dropout_rate, use_bias=self.use_bias,
                  attention=self.attention, decode=self.decode, deterministic=not train,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      blocks = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                       split_rngs={'params': True, 'dropout': True}, length=self.n_layer,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = blocks(**kwargs, name='h')(x, None)
    else:
      for i in range(self.n_layer):
        x, _ = block(**kwargs, name=f'h_{i}')(x)

    x = layer_norm('ln_f', self)(x)
    # The head is tied to the token embedding, whose padding rows are never predicted. On CPUs
    # they are dropped before the matmul (nano's 384 rows are 257 tokens: its step 2% faster,
    # BENCHMARKS.md); elsewhere after it, so that the matmul keeps the width that tiles well,
    # and where the vocabulary is split over devices (slicing it would gather it).
    if _head_drops_padding():
      head = wte.embedding[:self.vocab_size].astype(self.dtype)
      logits = constrain(x @ head.T, ('batch', 'length', None))
    else:
      logits = constrain(wte.attend(x), ('batch', 'length', 'vocab'))[..., :self.vocab_size]
    return logits.astype(jnp.float32)
