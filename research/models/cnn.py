"""Convolutional networks for MNIST and CIFAR-10: LeNet-5, the small Keras MNIST CNN, ResNet."""
import functools
from typing import Any, Sequence

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

PATCH_CONV_MAX_K = 600  # CPU: convolutions with kh * kw * in_channels up to this run as matmuls
PATCH_CONV_MIN_N = 24  # ... with at least this many output columns per tile (tile_width * out)


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: on CPUs a stride-1,
  'VALID', undilated NHWC convolution with kh * kw * in_channels <= PATCH_CONV_MAX_K (all of
  LeNet's and the MNIST CNN's) runs as one matmul, which XLA's CPU backend runs faster than its
  convolution for those shapes (the first two of each, forward and gradients alone: 1.6-7x;
  the MNIST CNN's whole step 17-20 -> 12.3-12.6 ms; BENCHMARKS.md). Everything else goes to
  `lax.conv_general_dilated` unchanged.

  The matmul computes `tile` adjacent output columns per row: its inputs are the kh rows of
  the tile + kw - 1 input columns under them, against a banded (Toeplitz) matrix built from the
  kernel, [kh * (tile + kw - 1) * in, tile * out]. tile = 1 is the classic im2col matmul; with
  few output channels (LeNet's 6) its [K, 6] right-hand side wastes most of each matrix tile,
  and tile = 4 ((tile + kw - 1) / kw = 1.6x the FLOPs) ran LeNet's first convolution 2.6x
  faster. The tile is the smallest with tile * out >= PATCH_CONV_MIN_N, but at most kw + 1
  (twice im2col's FLOPs) and the output width.
  """
  kh, kw, ci, co = rhs.shape
  simple = (jax.default_backend() == 'cpu' and lhs.ndim == 4 and padding == 'VALID'
            and tuple(window_strides) == (1, 1) and feature_group_count == 1
            and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
            and dimension_numbers == lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
            and kh * kw * ci <= PATCH_CONV_MAX_K
            and lhs.shape[1] >= kh and lhs.shape[2] >= kw)  # else lax's (empty) result
  if not simple:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision)
  b, h, w, _ = lhs.shape
  oh, ow = h - kh + 1, w - kw + 1
  tile = min(-(-PATCH_CONV_MIN_N // co), kw + 1, ow)  # at most 2x im2col's FLOPs
  tiles = -(-ow // tile)
  if tiles * tile > ow:  # zero columns on the right; their outputs are sliced off below
    lhs = jnp.pad(lhs, ((0, 0), (0, 0), (0, tiles * tile - ow), (0, 0)))
  span = tile + kw - 1  # input columns under one tile
  # band[i, a, c, t, o] = rhs[i, a - t, c, o] where 0 <= a - t < kw (a: input column of the
  # tile, t: output column), as a product with a constant 0/1 tensor so that its gradient
  # flows back to rhs.
  shifts = np.arange(span)[None, :, None] - np.arange(tile)[None, None, :]
  select = (shifts == np.arange(kw)[:, None, None]).astype(np.float32)  # [kw, span, tile]
  band = jnp.einsum('jat,ijco->iacto', select.astype(rhs.dtype), rhs, precision=precision)
  # Inputs: each tile's span of columns ([b, h, tiles, span * ci], built from whichever is
  # fewer: the tiles' spans or the span's strided column shifts), then kh vertical shifts of
  # those side by side, features ordered (i, a, c) like band. Two passes beat one of kh * kw
  # shifts.
  if tiles <= span:
    cols = jnp.concatenate(
        [lhs[:, :, t * tile:t * tile + span].reshape(b, h, 1, span * ci) for t in range(tiles)],
        axis=2)
  else:
    cols = jnp.concatenate([lhs[:, :, a:a + tiles * tile:tile] for a in range(span)], axis=-1)
  rows = jnp.concatenate([cols[:, i:i + oh] for i in range(kh)], axis=-1)
  out = jnp.dot(rows.reshape(-1, kh * span * ci), band.reshape(kh * span * ci, tile * co),
                precision=precision)
  return out.reshape(b, oh, tiles * tile, co)[:, :, :ow]


def max_pool_2x2(x):
  """2x2 max pooling with stride 2 ('VALID': an odd last row or column is dropped), NHWC.

  The same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`, written as a reshape and a max
  because XLA's CPU backend turns the gradient of `reduce_window` (select_and_scatter) into a
  variadic reduce-window over four index arrays and a scatter: more than half of the MNIST
  CNN's step time on a 2-core CPU (BENCHMARKS.md). The gradient of a max reduction goes to the
  maximal element, shared only between exact ties.
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet5(nn.Module):
  """LeNet-5 style: conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> dense 120 -> 84 -> classes."""
  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding='VALID', dtype=self.dtype,
                             param_dtype=self.param_dtype, conv_general_dilated=patch_conv)
    x = x.astype(self.dtype)
    x = max_pool_2x2(nn.relu(conv(6)(x)))
    x = max_pool_2x2(nn.relu(conv(16)(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(dense(120)(x))
    x = nn.relu(dense(84)(x))
    return dense(self.num_classes)(x).astype(jnp.float32)


class MnistCNN(nn.Module):
  """The Keras/TensorFlow-tutorial MNIST CNN: conv 32-64-64 3x3 with 2x2 pooling, dense 64."""
  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding='VALID', dtype=self.dtype,
                             param_dtype=self.param_dtype, conv_general_dilated=patch_conv)
    x = x.astype(self.dtype)
    x = max_pool_2x2(nn.relu(conv(32)(x)))
    x = max_pool_2x2(nn.relu(conv(64)(x)))
    x = nn.relu(conv(64)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(dense(64)(x))
    return dense(self.num_classes)(x).astype(jnp.float32)


class ResidualBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""
  features: int
  strides: int
  norm: Any
  conv: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (3, 3), (self.strides,) * 2)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features, (3, 3))(y))
    if x.shape != y.shape:
      x = self.norm()(self.conv(self.features, (1, 1), (self.strides,) * 2)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet for 32x32 images (He et al. 2016, CIFAR stem: one 3x3 conv, no max-pool).

  The defaults are ResNet-18: stages of (2, 2, 2, 2) blocks, widths 64-128-256-512, 11.2M
  parameters. BatchNorm uses batch statistics when `train=True` (updating the running
  averages in the 'batch_stats' collection) and the running averages when `train=False`.
  `bn_axis_name` is set by the trainer under pmap so batch statistics cover the global batch.
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             kernel_init=nn.initializers.kaiming_normal())
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=self.param_dtype, axis_name=self.bn_axis_name)
    x = nn.relu(norm()(conv(self.width, (3, 3))(x.astype(self.dtype))))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = ResidualBlock(self.width * 2**i, strides, norm, conv)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    param_dtype=self.param_dtype)(x).astype(jnp.float32)
