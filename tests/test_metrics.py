"""Tests of research.metrics against scikit-learn and PyTorch, which compute the same things
independently."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk

from research import metrics


def random_labels(seed, n=200, num_classes=6):
  """Labels never contain class 5 and predictions never contain class 4."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes - 1, n)                    # 0..4
  predictions = np.where(rng.random(n) < 0.5, labels, rng.integers(0, num_classes, n))
  predictions[predictions == 4] = 3                               # 4 is never predicted
  return labels, predictions


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_classification_report_matches_sklearn(seed):
  """Against scikit-learn's defaults: macro averages over the classes in the labels or the
  predictions. The matrix has a 7th class, 6, in neither (as a small eval split lacks some)."""
  labels, predictions = random_labels(seed, num_classes=6)
  assert 4 not in predictions and 5 not in labels and 5 in predictions
  confusion = sk.confusion_matrix(labels, predictions, labels=list(range(7)))
  report = metrics.classification_report(confusion)
  precision, recall, f1, _ = sk.precision_recall_fscore_support(
      labels, predictions, average='macro', zero_division=0)
  assert report['accuracy'] == pytest.approx(sk.accuracy_score(labels, predictions))
  assert report['precision'] == pytest.approx(precision)
  assert report['recall'] == pytest.approx(recall)
  assert report['f1'] == pytest.approx(f1)


def test_classification_report_perfect_and_empty():
  perfect = metrics.classification_report(np.diag([3, 0, 5]))
  # class 1 has no examples and no predictions: it is not averaged (it was, as 0: 2/3).
  assert perfect == {'accuracy': 1.0, 'precision': 1.0, 'recall': 1.0, 'f1': 1.0}
  empty = metrics.classification_report(np.zeros((3, 3)))
  assert empty == {'accuracy': 0.0, 'precision': 0.0, 'recall': 0.0, 'f1': 0.0}


def test_confusion_matrix_with_mask_matches_sklearn():
  num_classes = 6
  labels, predictions = random_labels(3, num_classes=num_classes)
  mask = (np.random.default_rng(4).random(len(labels)) < 0.7).astype(np.float32)
  confusion = jax.jit(functools.partial(metrics.confusion_matrix, num_classes=num_classes))(
      jnp.asarray(labels), jnp.asarray(predictions), mask=jnp.asarray(mask))
  keep = mask == 1
  expected = sk.confusion_matrix(labels[keep], predictions[keep], labels=range(num_classes))
  np.testing.assert_array_equal(np.asarray(confusion), expected)
  assert confusion.sum() == keep.sum() < len(labels)


def test_confusion_matrix_without_mask_counts_everything():
  labels, predictions = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 2, 1, 2, 0, 2])
  # rows are true classes, columns predictions, counted by hand from the pairs above
  expected = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 2]])
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, predictions, 3), expected)


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch(smoothing):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, 16)
  expected = torch.nn.functional.cross_entropy(
      torch.tensor(logits), torch.tensor(labels), label_smoothing=smoothing,
      reduction='none').numpy()
  got = metrics.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  assert got.shape == (16,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_squared_error():
  predictions = np.array([[1.0, 2.0], [0.0, -1.0]], np.float32)
  targets = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32)
  # (1 + 4), (0 + 4): summed over output dimensions, one value per example
  np.testing.assert_allclose(metrics.squared_error(predictions, targets), [5.0, 4.0])
  # targets of shape (n,) against predictions (n, 1), as in 1-D regression
  np.testing.assert_allclose(
      metrics.squared_error(jnp.array([[1.0], [3.0]]), jnp.array([0.5, 1.0])), [0.25, 4.0])


def test_cpu_peak_flops_are_the_hosts_cores_shared_by_its_devices(monkeypatch):
  """MFU's denominator on CPU: simulated CPU devices share the host's cores, so one device's
  peak is per-core FLOP/s x cores / devices, and all devices together have the host's
  per-core x cores, however many devices are simulated. Catches the division by the device
  count dropped (an 8-device run's peak, and so its MFU, off by 8x)."""
  import os  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(metrics, 'cpu_flops_per_core', lambda: 1e9)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(6)), raising=False)
  monkeypatch.setattr(os, 'cpu_count', lambda: 6)
  device, n = jax.devices()[0], jax.device_count()  # conftest simulates 8
  assert device.platform == 'cpu'
  assert metrics.peak_flops(device) == (pytest.approx(6e9 / n), True)
  for used in (n, 1):  # a run on one of them (config.parallel.num_devices) has every core too
    assert metrics.total_peak_flops(used) == (pytest.approx(6e9), True)
  monkeypatch.setattr(jax, 'device_count', lambda: 3)
  assert metrics.peak_flops(device) == (pytest.approx(2e9), True)
  assert metrics.total_peak_flops(3) == (pytest.approx(6e9), True)


def test_accelerator_peak_flops_are_per_chip_times_chips(monkeypatch):
  import types  # pylint: disable=g-import-not-at-top
  h100 = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3', platform='gpu')
  assert metrics.peak_flops(h100) == (989e12, False)
  monkeypatch.setattr(jax, 'devices', lambda: [h100] * 4)
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  assert metrics.total_peak_flops(4) == (4 * 989e12, False)
  assert metrics.total_peak_flops(1) == (989e12, False)  # num_devices=1: MFU was 4x too low
  unknown = types.SimpleNamespace(device_kind='Mystery chip', platform='gpu')
  flops, estimated = metrics.peak_flops(unknown)
  assert np.isnan(flops) and estimated


def test_train_throughput_and_mfu_formulas():
  """train._write_train: tokens/s = examples/s x seq_len and MFU = FLOPs per token x tokens/s /
  the peak FLOP/s of all devices. A window of 2 steps at 0.5 s per step, batch 8, seq_len 128:
  16 examples/s, 2048 tokens/s; 1e6 FLOPs per token against 1e12 FLOP/s: MFU 2.048e-3."""
  import types  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from research import train  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(batch_size=8, total_steps=100,
                                          data=dict(seq_len=128)))
  exp = types.SimpleNamespace(config=config, learning_rates=[0.1] * 100, flops_per_token=1e6,
                              peak_flops=1e12, ckpt=None)
  written = []
  writer = types.SimpleNamespace(write=lambda step, split, values: written.append(values),
                                 log=lambda line: None)
  clock = types.SimpleNamespace(seconds_per_step=lambda step: 0.5)
  window = [{'loss': np.float32(1.0), 'grad_norm': np.float32(2.0)},
            {'loss': np.float32(3.0), 'grad_norm': np.float32(4.0)}]
  train._write_train(exp, writer, 10, window, clock)  # pylint: disable=protected-access
  (values,) = written
  assert values['loss'] == 2.0 and values['grad_norm'] == 3.0
  assert values['examples_per_sec'] == pytest.approx(16.0)
  assert values['tokens_per_sec'] == pytest.approx(16.0 * 128)
  assert values['mfu'] == pytest.approx(1e6 * 2048 / 1e12)
  # Not a language model (no FLOPs per token): no tokens/s or MFU.
  exp.flops_per_token, written[:] = 0.0, []
  train._write_train(exp, writer, 10, window, clock)  # pylint: disable=protected-access
  assert 'tokens_per_sec' not in written[0] and 'mfu' not in written[0]
