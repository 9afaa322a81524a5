"""Tests for adam_inrun.evaluation against hand-computed cases and references.

The references are independent of the implementation: ROC AUC counted over
every (corrupted, clean) pair by hand, scikit-learn's `roc_auc_score` on the
negated scores, the detection curve by a plain loop, NumPy's `corrcoef` and
SciPy's `pearsonr` and `spearmanr`.
"""

import builtins
import doctest
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from adam_inrun import evaluation


def _pairwise_auc(scores, flipped):
  """The AUC by its definition: P(corrupted scores lower), ties count 1/2."""
  scores, flipped = np.asarray(scores, float), np.asarray(flipped, bool)
  wins = 0.0
  pairs = 0
  for bad, good in itertools.product(scores[flipped], scores[~flipped]):
    wins += 1.0 if bad < good else 0.5 if bad == good else 0.0
    pairs += 1
  return wins / pairs


def _random_problem(seed, n=200, rate=0.1):
  rng = np.random.default_rng(seed)
  flipped = rng.random(n) < rate
  flipped[:2] = (True, False)
  # Corrupted examples score lower on average, with overlap.
  scores = rng.normal(size=n) - 1.5 * flipped
  return scores, flipped


def test_module_doctests_pass():
  results = doctest.testmod(evaluation)
  assert results.attempted > 0
  assert results.failed == 0


def test_mislabel_auc_of_hand_computed_cases():
  # Perfect, reversed, and one of four pairs ordered right.
  assert evaluation.mislabel_auc([-2., 1., 3.], [True, False, False]) == 1.0
  assert evaluation.mislabel_auc([5., 1., 3.], [True, False, False]) == 0.0
  assert evaluation.mislabel_auc([-3., .5, -1., 2.], [0, 0, 1, 1]) == 0.25
  # A tie between a corrupted and a clean example counts one half.
  assert evaluation.mislabel_auc([0., 0., 1.], [True, False, False]) == 0.75


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mislabel_auc_matches_pairwise_count_and_sklearn(seed):
  from sklearn import metrics

  scores, flipped = _random_problem(seed)
  # Rounded so that ties occur.
  scores = np.round(scores, 1)
  auc = evaluation.mislabel_auc(scores, flipped)
  np.testing.assert_allclose(auc, _pairwise_auc(scores, flipped), rtol=1e-12)
  np.testing.assert_allclose(
      auc, metrics.roc_auc_score(flipped, -scores), rtol=1e-12)
  assert 0.5 < auc < 1.0


def test_mislabel_auc_accepts_jax_arrays_and_lower_means_suspicious():
  scores, flipped = _random_problem(3)
  auc = evaluation.mislabel_auc(jnp.asarray(scores), jnp.asarray(flipped))
  np.testing.assert_allclose(auc, _pairwise_auc(scores, flipped), rtol=1e-6)
  np.testing.assert_allclose(
      evaluation.mislabel_auc(-scores, flipped), 1.0 - auc, rtol=1e-12)


@pytest.mark.parametrize(
    'scores, flipped, match',
    [
        ([1., np.nan, 2.], [True, False, False], r'scores\[1\]=nan'),
        ([[1., 2.]], [True, False], 'one-dimensional'),
        ([1., 2., 3.], [True, False], r'shape \(2,\), expected \(3,\)'),
        ([1., 2., 3.], [0, 2, 1], 'booleans'),
        ([1., 2., 3.], [False, False, False], 'at least one corrupted'),
        ([1., 2., 3.], [True, True, True], 'one clean'),
        ([], [], 'must not be empty'),
    ],
)
def test_mislabel_auc_rejects_bad_inputs(scores, flipped, match):
  with pytest.raises(ValueError, match=match):
    evaluation.mislabel_auc(scores, flipped)


def test_mislabel_auc_without_sklearn_raises_clear_import_error(monkeypatch):
  real_import = builtins.__import__

  def no_sklearn(name, *args, **kwargs):
    if name == 'sklearn' or name.startswith('sklearn.'):
      raise ImportError('No module named sklearn')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_sklearn)
  with pytest.raises(ImportError, match='pip install scikit-learn'):
    evaluation.mislabel_auc([0., 1.], [True, False])


def test_detection_curve_of_hand_computed_case():
  # Order by score: idx 1 (-2, flipped), 3 (0, clean), 0 (1, flipped),
  # 2 (5, clean).
  inspected, found = evaluation.detection_curve(
      [1., -2., 5., 0.], [True, True, False, False])
  np.testing.assert_array_equal(inspected, [0., .25, .5, .75, 1.])
  np.testing.assert_array_equal(found, [0., .5, .5, 1., 1.])


@pytest.mark.parametrize('seed', [0, 4])
def test_detection_curve_matches_a_plain_loop(seed):
  scores, flipped = _random_problem(seed, n=57)
  inspected, found = evaluation.detection_curve(scores, flipped)

  remaining = list(range(scores.size))
  expected = [0.0]
  hits = 0
  while remaining:
    lowest = min(remaining, key=lambda i: scores[i])
    remaining.remove(lowest)
    hits += int(flipped[lowest])
    expected.append(hits / flipped.sum())
  np.testing.assert_allclose(found, expected, rtol=1e-12)
  np.testing.assert_allclose(inspected, np.linspace(0, 1, scores.size + 1))
  assert found[0] == 0.0 and found[-1] == 1.0
  assert np.all(np.diff(found) >= 0)


def test_detection_curve_area_is_the_auc_up_to_the_base_rate():
  # Without ties, the trapezoidal area under found(inspected) is
  # rate / 2 + (1 - rate) * AUC: the corrupted examples among themselves
  # give the triangle, and each clean example inspected before a corrupted
  # one costs 1 / (n * num_flipped).
  scores, flipped = _random_problem(5, n=300)
  inspected, found = evaluation.detection_curve(scores, flipped)
  rate = flipped.mean()
  np.testing.assert_allclose(
      np.trapezoid(found, inspected),
      rate / 2 + (1 - rate) * evaluation.mislabel_auc(scores, flipped),
      rtol=1e-12)


def test_detection_curve_breaks_ties_by_dataset_order():
  _, found = evaluation.detection_curve([0., 0., 0.], [False, True, False])
  np.testing.assert_array_equal(found, [0., 0., 1., 1.])


def test_detection_curve_needs_a_corrupted_example():
  with pytest.raises(ValueError, match='at least one corrupted'):
    evaluation.detection_curve([1., 2.], [False, False])


def test_correlations_of_hand_computed_cases():
  # x = (1, 2, 3), y = (2, 4, 7): centred (-1, 0, 1) and (-7/3, -1/3, 8/3),
  # r = 5 / sqrt(2 * 38 / 3).
  np.testing.assert_allclose(
      evaluation.pearson([1., 2., 3.], [2., 4., 7.]),
      5 / np.sqrt(2 * 38 / 3), rtol=1e-12)
  assert evaluation.spearman([1., 2., 3.], [2., 4., 7.]) == 1.0
  assert evaluation.spearman([1., 2., 3.], [9., 4., -7.]) == -1.0
  # Monotone but not linear: rank correlation 1, linear below 1.
  x = np.arange(1.0, 8.0)
  assert evaluation.spearman(x, np.exp(x)) == 1.0
  assert evaluation.pearson(x, np.exp(x)) < 0.9


@pytest.mark.parametrize('seed', [0, 1])
def test_correlations_match_numpy_and_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=80)
  y = 0.6 * x + rng.normal(size=80)
  # Ties in y exercise the mean-rank rule.
  y = np.round(y, 1)
  np.testing.assert_allclose(
      evaluation.pearson(x, y), np.corrcoef(x, y)[0, 1], rtol=1e-12)
  np.testing.assert_allclose(
      evaluation.pearson(x, y), stats.pearsonr(x, y).statistic, rtol=1e-12)
  np.testing.assert_allclose(
      evaluation.spearman(x, y), stats.spearmanr(x, y).statistic, rtol=1e-12)


def test_correlation_of_a_constant_is_nan():
  assert np.isnan(evaluation.pearson([1., 1., 1.], [1., 2., 3.]))
  assert np.isnan(evaluation.spearman([1., 2., 3.], [4., 4., 4.]))


@pytest.mark.parametrize(
    'x, y, match',
    [
        ([1., 2.], [1., 2., 3.], 'same shape'),
        ([1.], [2.], 'at least two'),
        ([1., np.inf], [1., 2.], r'x\[1\]=inf'),
    ],
)
def test_correlations_reject_bad_inputs(x, y, match):
  for correlation in (evaluation.pearson, evaluation.spearman):
    with pytest.raises(ValueError, match=match):
      correlation(x, y)
