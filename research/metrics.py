"""Classification metrics from a confusion matrix, and the loss functions the steps use."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import parallel


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy on integer labels, computed in float32.

  Without label smoothing no one-hot array is made (for GPT-2's vocabulary it would be as large
  as the logits).
  """
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  onehot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, onehot)


def squared_error(predictions, targets):
  """Per-example squared error, summed over output dimensions."""
  return jnp.sum((predictions - targets.reshape(predictions.shape)) ** 2,
                 axis=tuple(range(1, predictions.ndim)))


def confusion_matrix(labels, predictions, num_classes: int, mask=None):
  """counts[i, j] = number of examples of true class i predicted as class j (jittable)."""
  weights = jnp.ones_like(labels, jnp.float32) if mask is None else mask
  index = labels * num_classes + predictions
  return jnp.zeros(num_classes * num_classes, jnp.float32).at[index].add(weights).reshape(
      num_classes, num_classes)


def classification_report(confusion: np.ndarray) -> dict[str, float]:
  """Accuracy and macro-averaged precision, recall and F1 from a confusion matrix.

  A class never predicted has precision 0, a class absent from the labels recall 0
  (zero_division=0); macro averages are over the classes that occur in the labels or the
  predictions, as scikit-learn's and torchmetrics' are: a class absent from both (a small or
  partial eval split) says nothing of the model, and counting it as 0 gave a perfect model an
  F1 of 0.5. No examples at all: all zeros.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  predicted, actual = confusion.sum(0), confusion.sum(1)
  with np.errstate(divide='ignore', invalid='ignore'):
    precision = np.where(predicted > 0, tp / predicted, 0.0)
    recall = np.where(actual > 0, tp / actual, 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  seen = (predicted + actual) > 0
  macro = lambda x: float(x[seen].mean()) if seen.any() else 0.0
  return {
      'accuracy': float(tp.sum() / max(confusion.sum(), 1)),
      'precision': macro(precision),
      'recall': macro(recall),
      'f1': macro(f1),
  }


# Dense bf16 peak FLOP/s per device (chip) from the vendors' data sheets.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
    'A100': 312e12,
    'H100': 989e12,
    'H200': 989e12,
}


def cpu_flops_per_core() -> float:
  """An estimate: 2.5 GHz x 2 FMA units x fp32 lanes (16 with AVX-512, else 8) x 2."""
  lanes = 16 if 'avx512f' in (parallel.cpu_flags() or ()) else 8
  return 2.5e9 * 2 * lanes * 2


def total_peak_flops(num_devices: int) -> tuple[float, bool]:
  """(peak FLOP/s of the `num_devices` devices a run uses, whether it is an estimate): MFU's
  denominator. Simulated CPU devices share the host's cores: the host's, however many."""
  device = jax.devices()[0]
  peak, estimated = peak_flops(device)
  return peak * (jax.device_count() if device.platform == 'cpu' else num_devices), estimated


def peak_flops(device) -> tuple[float, bool]:
  """(peak FLOP/s of one device, whether it is an estimate) for MFU."""
  kind = device.device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, False
  if device.platform == 'cpu':  # the host's cores are shared by all simulated CPU devices
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return cpu_flops_per_core() * cores / jax.device_count(), True
  return float('nan'), True
