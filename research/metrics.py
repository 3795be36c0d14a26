"""Classification metrics from a confusion matrix, and the loss functions the steps use."""
import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy on integer labels."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
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

  A class never predicted has precision 0, a class absent from the labels recall 0 (the
  scikit-learn convention with zero_division=0); macro averages are over all classes.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  predicted, actual = confusion.sum(0), confusion.sum(1)
  with np.errstate(divide='ignore', invalid='ignore'):
    precision = np.where(predicted > 0, tp / predicted, 0.0)
    recall = np.where(actual > 0, tp / actual, 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  return {
      'accuracy': float(tp.sum() / max(confusion.sum(), 1)),
      'precision': float(precision.mean()),
      'recall': float(recall.mean()),
      'f1': float(f1.mean()),
  }
