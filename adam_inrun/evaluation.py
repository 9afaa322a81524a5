"""Scoring data values against known label noise, and comparing estimators.

Data values are judged in two ways in this project. On a dataset whose labels
were corrupted on purpose, a good valuation ranks the corrupted examples
first: `mislabel_auc` gives the ROC AUC of that ranking and `detection_curve`
the fraction of corrupted labels found as a function of the fraction of the
dataset inspected. Against a ground truth, or another estimator, `pearson`
and `spearman` give the linear and the rank correlation.

Every score here follows one convention: a lower score is more suspicious.
A data value fits it as it is (an example that hurt the validation loss has a
negative value), a per-example loss fits it after negation.

The functions are pure NumPy on host arrays; pass `jax.Array`s or lists as
well. `mislabel_auc` needs scikit-learn, an optional dependency, imported only
when it is called; the correlations use SciPy, which JAX itself requires.
"""

from typing import Any

import numpy as np
from scipy import stats


def _as_scores(scores: Any, argname: str) -> np.ndarray:
  """Returns `scores` as a finite one-dimensional float64 array."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1:
    raise ValueError(
        f'{argname} must be one-dimensional, one entry per example; got '
        f'shape {scores.shape}.')
  if scores.size == 0:
    raise ValueError(f'{argname} must not be empty.')
  bad = ~np.isfinite(scores)
  if bad.any():
    position = int(np.argmax(bad))
    raise ValueError(
        f'{argname} must be finite; got {argname}[{position}]='
        f'{scores[position]}.')
  return scores


def _as_flags(flipped: Any, size: int) -> np.ndarray:
  """Returns `flipped` as a boolean array of `size` entries."""
  flags = np.asarray(flipped)
  if flags.dtype != np.bool_:
    if not np.issubdtype(flags.dtype, np.integer) or not np.isin(
        flags, (0, 1)).all():
      raise ValueError(
          'flipped must be booleans, or integers 0 and 1, marking the '
          f'corrupted examples; got dtype {flags.dtype} with values '
          f'{np.unique(flags)[:5]}.')
    flags = flags.astype(np.bool_)
  if flags.shape != (size,):
    raise ValueError(
        'flipped must have the shape of scores, one flag per example; got '
        f'shape {flags.shape}, expected ({size},).')
  return flags


def _import_metrics() -> Any:
  """Imports scikit-learn's metrics, which only `mislabel_auc` needs."""
  try:
    from sklearn import metrics  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        'adam_inrun.evaluation.mislabel_auc needs scikit-learn, an optional '
        'dependency; install it with `pip install scikit-learn`.') from error
  return metrics


def mislabel_auc(scores: Any, flipped: Any) -> float:
  """ROC AUC of finding corrupted labels by ranking on `scores`, lowest first.

  The probability that a corrupted example, drawn at random, scores lower
  than a clean one, ties counting one half: 1 is a perfect ranking, 0.5 a
  random one, below 0.5 a ranking that prefers the clean examples.

  Args:
    scores: one score per example, shape (n,); lower is more suspicious.
    flipped: booleans (or 0/1) of shape (n,), True where the label was
      corrupted.

  Returns:
    The ROC AUC, a float in [0, 1].

  Raises:
    ImportError: if scikit-learn is not installed.
    ValueError: if `scores` is not finite and one-dimensional, `flipped`
      does not match it, or `flipped` holds only one class.

  Examples:
    >>> from adam_inrun import evaluation
    >>> evaluation.mislabel_auc([-3.0, 0.5, -1.0, 2.0], [1, 0, 0, 0])
    1.0
    >>> evaluation.mislabel_auc([-3.0, 0.5, -1.0, 2.0], [0, 0, 1, 1])
    0.25
  """
  scores = _as_scores(scores, 'scores')
  flags = _as_flags(flipped, scores.size)
  if flags.all() or not flags.any():
    raise ValueError(
        'flipped must mark at least one corrupted and one clean example; got '
        f'{int(flags.sum())} corrupted out of {flags.size}.')
  metrics = _import_metrics()
  return float(metrics.roc_auc_score(flags, -scores))


def detection_curve(scores: Any, flipped: Any) -> tuple[np.ndarray,
                                                         np.ndarray]:
  """Fraction of corrupted labels found against fraction of data inspected.

  Examples are inspected in order of increasing score (the most suspicious
  first); equal scores keep their dataset order. After inspecting `k` of the
  `n` examples, the curve is at `(k / n, found_k / num_flipped)`. It starts
  at (0, 0) and ends at (1, 1); the diagonal is a random order, and a perfect
  ranking reaches 1 at `num_flipped / n`.

  Args:
    scores: one score per example, shape (n,); lower is more suspicious.
    flipped: booleans (or 0/1) of shape (n,), True where the label was
      corrupted.

  Returns:
    `(inspected, found)`, two float64 arrays of shape (n + 1,).

  Raises:
    ValueError: if `scores` is not finite and one-dimensional, `flipped`
      does not match it, or no label is corrupted.

  Examples:
    >>> from adam_inrun import evaluation
    >>> inspected, found = evaluation.detection_curve(
    ...     [0.2, -1.0, 0.7, -0.5], [False, True, False, False])
    >>> inspected.tolist()
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> found.tolist()
    [0.0, 1.0, 1.0, 1.0, 1.0]
  """
  scores = _as_scores(scores, 'scores')
  flags = _as_flags(flipped, scores.size)
  num_flipped = int(flags.sum())
  if num_flipped == 0:
    raise ValueError(
        'flipped must mark at least one corrupted example; got none out of '
        f'{flags.size}.')

  order = np.argsort(scores, kind='stable')
  found = np.concatenate([[0], np.cumsum(flags[order])]) / num_flipped
  inspected = np.arange(scores.size + 1) / scores.size
  return inspected, found


def _paired(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
  """Returns `x` and `y` as finite float64 arrays of one shape, checked."""
  x, y = _as_scores(x, 'x'), _as_scores(y, 'y')
  if x.shape != y.shape:
    raise ValueError(
        f'x and y must have the same shape; got {x.shape} and {y.shape}.')
  if x.size < 2:
    raise ValueError(f'a correlation needs at least two pairs; got {x.size}.')
  return x, y


def pearson(x: Any, y: Any) -> float:
  """Pearson's linear correlation coefficient of `x` and `y`.

  Args:
    x: one-dimensional, finite.
    y: the same shape as `x`, finite.

  Returns:
    The coefficient in [-1, 1]; NaN if `x` or `y` is constant.

  Raises:
    ValueError: for inputs that are not finite, one-dimensional, of equal
      shape and of at least two entries.

  Examples:
    >>> from adam_inrun import evaluation
    >>> round(evaluation.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]), 4)
    0.9934
  """
  x, y = _paired(x, y)
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
  if denominator == 0.0:
    return float('nan')
  return float(np.clip(np.sum(x * y) / denominator, -1.0, 1.0))


def spearman(x: Any, y: Any) -> float:
  """Spearman's rank correlation of `x` and `y`, ties given their mean rank.

  Args:
    x: one-dimensional, finite.
    y: the same shape as `x`, finite.

  Returns:
    The coefficient in [-1, 1]; NaN if `x` or `y` is constant.

  Raises:
    ValueError: for inputs that are not finite, one-dimensional, of equal
      shape and of at least two entries.

  Examples:
    >>> from adam_inrun import evaluation
    >>> evaluation.spearman([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
    1.0
    >>> round(evaluation.spearman([1, 2, 3, 4], [1, 1, 0, 0]), 4)
    -0.8944
  """
  x, y = _paired(x, y)
  return pearson(stats.rankdata(x), stats.rankdata(y))
