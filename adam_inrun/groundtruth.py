r"""Ground truth: the real one-step data-valuation game, evaluated exactly.

The estimators in this library approximate the Shapley values of one game,
played by the ``n`` examples of a training batch at one optimizer step. For a
loss-weight vector ``m`` (a coalition when ``m`` is 0/1):

.. math::

  g(m) = \frac{1}{n} \sum_i m_i \nabla \ell(w, z_i), \qquad
  U(m) = L_V(w) - L_V\big(w + u(g(m))\big),

where ``u`` is the user's own ``tx.update`` applied from the current optimizer
state and ``L_V`` is the mean of ``loss_fn`` over ``val_batch``. The gradient is
normalised by the full batch size ``n`` whatever the coalition, so dropping an
example is exactly giving its loss weight 0. Under Adam with momentum the
update of the empty coalition is not zero, so neither is ``U(∅)``.

This module evaluates that game by brute force, with no approximation of the
optimizer: :func:`utility` for given weight vectors, :func:`leave_one_out`, and
Monte-Carlo :func:`shapley` by permutation sampling. Coalitions are evaluated in
chunks of ``chunk_size`` under :func:`jax.vmap` inside :func:`jax.lax.map`, so
memory grows with the chunk, not with the number of coalitions. The training
batch's forward pass is linearised once (:func:`jax.vjp`) and shared by every
coalition; each coalition then costs one backward pass over the batch, one
optimizer update and one forward pass over ``val_batch``.

Everything here computes in float64 and refuses to run without
``jax_enable_x64``: leave-one-out differences are around ``1e-6`` of the loss,
which is below float32 resolution, so float32 ground truth is mostly rounding
noise. Floating leaves of ``params``, ``opt_state``, ``batch`` and
``val_batch`` given in a lower precision are cast to float64 first; a
``loss_fn`` that still returns lower-precision losses (for instance a Flax
module built with a fixed ``dtype=jnp.float32``) is rejected.
"""

import functools
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_inrun import _checks

LossFn = Callable[[Any, Any], jax.Array]

_DEFAULT_CHUNK_SIZE = 64


class Float64RequiredError(RuntimeError):
  """Ground truth was requested while JAX runs in 32-bit mode.

  Leave-one-out and Shapley differences of one training step are around
  ``1e-6`` of the loss, below float32 resolution, so this module computes in
  float64 only. To fix, enable 64-bit mode before creating any arrays, either
  for the whole process::

    jax.config.update('jax_enable_x64', True)

  or for a block of code::

    with jax.enable_x64(True):
      values = groundtruth.leave_one_out(...)
  """


def utility(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    val_batch: Any,
    weights: jax.typing.ArrayLike,
    *,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  r"""Validation-loss decrease of one optimizer step on a weighted batch.

  Evaluates the game ``U(m)`` described in this module's docstring: the
  gradient of ``(1/n) Σ_i m_i ℓ_i`` (always divided by the full ``n``) is fed
  to ``tx.update`` from ``opt_state``, the update is applied, and the result
  is ``L_V(params) − L_V(new_params)``. A 0/1 ``weights`` vector is a
  coalition; other real weights are allowed.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses, shape
      ``(n,)``; the same function gives the validation loss on ``val_batch``.
    tx: the optax transformation used for training.
    params: the parameters before the step.
    opt_state: ``tx``'s state before the step.
    batch: the training batch, a pytree of arrays with ``n`` examples on the
      leading axis.
    val_batch: the validation batch, a pytree of arrays with examples on the
      leading axis.
    weights: loss weights, shape ``(n,)`` for one game value or ``(k, n)`` for
      ``k`` of them.
    chunk_size: how many weight vectors are evaluated together under
      :func:`jax.vmap`; bounds memory.

  Returns:
    A float64 scalar for ``(n,)`` weights, or shape ``(k,)`` for ``(k, n)``.

  Raises:
    Float64RequiredError: if ``jax_enable_x64`` is off.
    ValueError: if the batches, ``loss_fn``'s output or ``weights`` have the
      wrong shapes, or ``chunk_size`` is not positive.
    TypeError: if an argument has the wrong type or dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from adam_inrun import groundtruth
    >>> def loss_fn(params, batch):
    ...   return 0.5 * (batch['x'] @ params['w'] - batch['y']) ** 2
    >>> with jax.enable_x64(True):
    ...   batch = {'x': jnp.eye(4, 3), 'y': jnp.array([1.0, -1.0, 2.0, 0.0])}
    ...   params = {'w': jnp.zeros(3)}
    ...   tx = optax.sgd(0.1)
    ...   coalitions = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    ...   values = groundtruth.utility(loss_fn, tx, params, tx.init(params),
    ...                                batch, batch, coalitions)
    ...   print(values.dtype, bool(values[0] > 0), float(values[1]))
    float64 True 0.0
  """
  _require_float64()
  chunk_size = _check_positive_int(chunk_size, 'chunk_size')
  n = _checks.batch_size(batch, 'batch')
  _checks.batch_size(val_batch, 'val_batch')
  weights = _check_weights(weights, n)
  params, opt_state, batch, val_batch = _to_float64(
      (params, opt_state, batch, val_batch))
  _check_losses(loss_fn, params, batch, val_batch)

  stacked = jnp.atleast_2d(weights)
  values = _utilities(loss_fn, tx, params, opt_state, batch, val_batch,
                      stacked, chunk_size=chunk_size)
  return values[0] if weights.ndim == 1 else values


def leave_one_out(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    val_batch: Any,
    *,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  r"""Leave-one-out values of the real one-step game.

  ``value_i = U(B) − U(B ∖ {i})``: how much less the validation loss would
  fall if example ``i`` had loss weight 0 in this step, the gradient still
  being divided by the full batch size ``n``. The game ``U`` is defined in
  this module's docstring and evaluated by :func:`utility`. Costs ``n + 1``
  game evaluations.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses, shape
      ``(n,)``.
    tx: the optax transformation used for training.
    params: the parameters before the step.
    opt_state: ``tx``'s state before the step.
    batch: the training batch, ``n`` examples on every leaf's leading axis.
    val_batch: the validation batch.
    chunk_size: how many coalitions are evaluated together under
      :func:`jax.vmap`; bounds memory.

  Returns:
    Float64 values, shape ``(n,)``, in validation-loss units; positive means
    the example helped.

  Raises:
    Float64RequiredError: if ``jax_enable_x64`` is off.
    ValueError: if the batches or ``loss_fn``'s output have the wrong shapes,
      or ``chunk_size`` is not positive.
    TypeError: if an argument has the wrong type or dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from adam_inrun import groundtruth
    >>> def loss_fn(params, batch):
    ...   return 0.5 * (batch['x'] @ params['w'] - batch['y']) ** 2
    >>> with jax.enable_x64(True):
    ...   batch = {'x': jnp.eye(4, 3), 'y': jnp.array([1.0, -1.0, 2.0, 0.0])}
    ...   params = {'w': jnp.zeros(3)}
    ...   tx = optax.adam(0.1)
    ...   values = groundtruth.leave_one_out(loss_fn, tx, params,
    ...                                      tx.init(params), batch, batch)
    ...   # The last example's loss is flat in w: dropping it changes nothing.
    ...   print(values.shape, values.dtype, float(values[3]))
    (4,) float64 0.0
  """
  _require_float64()
  chunk_size = _check_positive_int(chunk_size, 'chunk_size')
  _checks.batch_size(batch, 'batch')
  _checks.batch_size(val_batch, 'val_batch')
  params, opt_state, batch, val_batch = _to_float64(
      (params, opt_state, batch, val_batch))
  _check_losses(loss_fn, params, batch, val_batch)

  return _leave_one_out(loss_fn, tx, params, opt_state, batch, val_batch,
                        chunk_size=chunk_size)


def shapley(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    val_batch: Any,
    *,
    num_permutations: int,
    key: jax.Array,
    antithetic: bool = True,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  r"""Monte-Carlo Shapley values of the real one-step game.

  Permutation sampling: for each permutation ``π`` of the batch, the examples
  join one by one and each is credited with its marginal contribution
  ``U(prefix ∪ {i}) − U(prefix)``; the estimate is the mean over
  permutations. The marginals along one permutation telescope to
  ``U(B) − U(∅)``, and both ends are evaluated once and shared by every
  permutation, so efficiency, ``Σ_i φ_i = U(B) − U(∅)``, holds to rounding
  whatever the number of permutations. The game ``U`` is defined in this
  module's docstring.

  With ``antithetic=True`` (the default) permutations come in pairs: a
  uniformly sampled one and its reverse. An example that joins early in one
  joins late in the other, so each pair sees it once against a small
  coalition and once against a large one. Because a normalised optimizer
  such as Adam makes marginals depend strongly on coalition size, this
  cancels much of the sampling variance. ``num_permutations`` counts every
  evaluated permutation, reverses included; if it is odd, the last reverse
  is left out.

  Each permutation costs ``n − 1`` game evaluations, plus two shared ones
  for ``U(∅)`` and ``U(B)``.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning per-example losses, shape
      ``(n,)``.
    tx: the optax transformation used for training.
    params: the parameters before the step.
    opt_state: ``tx``'s state before the step.
    batch: the training batch, ``n`` examples on every leaf's leading axis.
    val_batch: the validation batch.
    num_permutations: how many permutations to evaluate, a positive int.
    key: a JAX PRNG key, typed (:func:`jax.random.key`) or raw uint32
      (:func:`jax.random.PRNGKey`). Its bits seed the NumPy generator that
      draws the permutations on the host, so equal keys give equal values.
    antithetic: whether to pair every sampled permutation with its reverse.
    chunk_size: how many coalitions are evaluated together under
      :func:`jax.vmap`; bounds memory.

  Returns:
    Float64 Shapley estimates, shape ``(n,)``, in validation-loss units;
    positive means the example helped.

  Raises:
    Float64RequiredError: if ``jax_enable_x64`` is off.
    ValueError: if the batches or ``loss_fn``'s output have the wrong shapes,
      or ``num_permutations`` or ``chunk_size`` is not positive.
    TypeError: if an argument has the wrong type or dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from adam_inrun import groundtruth
    >>> def loss_fn(params, batch):
    ...   return 0.5 * (batch['x'] @ params['w'] - batch['y']) ** 2
    >>> with jax.enable_x64(True):
    ...   batch = {'x': jnp.eye(4, 3), 'y': jnp.array([1.0, -1.0, 2.0, 0.0])}
    ...   params = {'w': jnp.zeros(3)}
    ...   tx = optax.adam(0.1)
    ...   args = (loss_fn, tx, params, tx.init(params), batch, batch)
    ...   values = groundtruth.shapley(*args, num_permutations=8,
    ...                                key=jax.random.key(0))
    ...   ends = groundtruth.utility(*args, jnp.array([[1.0] * 4, [0.0] * 4]))
    ...   print(values.shape, abs(values.sum() - (ends[0] - ends[1])) < 1e-12)
    (4,) True
  """
  _require_float64()
  num_permutations = _check_positive_int(num_permutations, 'num_permutations')
  chunk_size = _check_positive_int(chunk_size, 'chunk_size')
  key = _check_key(key)
  n = _checks.batch_size(batch, 'batch')
  _checks.batch_size(val_batch, 'val_batch')
  params, opt_state, batch, val_batch = _to_float64(
      (params, opt_state, batch, val_batch))
  _check_losses(loss_fn, params, batch, val_batch)

  ranks = _sample_ranks(key, num_permutations, n, antithetic)
  return _shapley_from_ranks(loss_fn, tx, params, opt_state, batch,
                             val_batch, jnp.asarray(ranks),
                             chunk_size=chunk_size)


def _coalition_game(loss_fn, tx, params, opt_state, batch, val_batch):
  """Returns ``U`` as a function of one weight vector, for use under vmap."""
  losses, pullback = jax.vjp(lambda p: loss_fn(p, batch), params)
  n = losses.shape[0]
  val_loss = jnp.mean(loss_fn(params, val_batch))

  def game(weights):
    (grads,) = pullback(weights.astype(losses.dtype) / n)
    updates, _ = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return val_loss - jnp.mean(loss_fn(new_params, val_batch))

  return game


def _evaluate_coalitions(game, coalition, num_coalitions, chunk_size):
  """Returns ``[game(coalition(k)) for k in range(num_coalitions)]``.

  The index range is padded with repeats of the last coalition up to whole
  chunks: without a ragged last chunk, ``jax.lax.map`` traces and compiles
  the game once instead of twice, for at most ``chunk_size - 1`` wasted
  evaluations.
  """
  chunk_size = min(chunk_size, num_coalitions)
  num_chunks = -(-num_coalitions // chunk_size)
  indices = jnp.minimum(jnp.arange(num_chunks * chunk_size),
                        num_coalitions - 1)
  values = jax.lax.map(lambda k: game(coalition(k)), indices,
                       batch_size=chunk_size)
  return values[:num_coalitions]


@functools.partial(
    jax.jit, static_argnames=('loss_fn', 'tx', 'chunk_size'))
def _utilities(loss_fn, tx, params, opt_state, batch, val_batch, weights, *,
               chunk_size):
  game = _coalition_game(loss_fn, tx, params, opt_state, batch, val_batch)
  return _evaluate_coalitions(game, lambda k: weights[k], weights.shape[0],
                              chunk_size)


@functools.partial(
    jax.jit, static_argnames=('loss_fn', 'tx', 'chunk_size'))
def _leave_one_out(loss_fn, tx, params, opt_state, batch, val_batch, *,
                   chunk_size):
  game = _coalition_game(loss_fn, tx, params, opt_state, batch, val_batch)
  n = _checks.batch_size(batch, 'batch')

  # Coalition 0 is the whole batch; coalition k > 0 leaves out example k - 1.
  def coalition(k):
    return (jnp.arange(n) != k - 1).astype(jnp.float64)

  values = _evaluate_coalitions(game, coalition, n + 1, chunk_size)
  return values[0] - values[1:]


@functools.partial(
    jax.jit, static_argnames=('loss_fn', 'tx', 'chunk_size'))
def _shapley_from_ranks(loss_fn, tx, params, opt_state, batch, val_batch,
                        ranks, *, chunk_size):
  game = _coalition_game(loss_fn, tx, params, opt_state, batch, val_batch)
  num_permutations, n = ranks.shape

  # Coalition 0 is empty and 1 is the whole batch, shared by every
  # permutation. The rest are the proper non-empty prefixes, permutation by
  # permutation; their masks are built inside the map so that memory stays
  # bounded by the chunk.
  def coalition(k):
    permutation, size = jnp.divmod(jnp.maximum(k - 2, 0), max(n - 1, 1))
    prefix = ranks[permutation] <= size
    return jnp.where(k == 0, False, jnp.where(k == 1, True, prefix)).astype(
        jnp.float64)

  values = _evaluate_coalitions(game, coalition,
                                2 + num_permutations * (n - 1), chunk_size)
  empty, full, inner = values[0], values[1], values[2:]
  ends = jnp.ones((num_permutations, 1))
  prefix_values = jnp.concatenate(
      [empty * ends, inner.reshape(num_permutations, n - 1), full * ends],
      axis=1)

  # The example at position k is credited with prefix k + 1 minus prefix k.
  by_position = jnp.diff(prefix_values, axis=1)
  marginals = jnp.take_along_axis(by_position, ranks, axis=1)
  return jnp.mean(marginals, axis=0)


def _sample_ranks(key, num_permutations, n, antithetic):
  """Returns ``ranks[p, i]``, the position where example i joins permutation p.

  The permutations are a few integers each, so they are drawn on the host by
  NumPy, seeded from the key's bits. Drawing them with ``jax.random`` would
  put a threefry kernel into a program that is recompiled for every new
  ``num_permutations``, and on CPU that kernel compiles slower than the game.
  """
  seed = np.asarray(jax.random.key_data(key))
  rng = np.random.default_rng(seed)
  num_sampled = math.ceil(num_permutations / 2) if antithetic else (
      num_permutations)
  ranks = rng.permuted(np.tile(np.arange(n), (num_sampled, 1)), axis=1)
  if antithetic:
    # Reversing a permutation sends position r to position n - 1 - r.
    ranks = np.concatenate([ranks, n - 1 - ranks], axis=0)
  return ranks[:num_permutations]


def _require_float64():
  if not jax.config.jax_enable_x64:
    raise Float64RequiredError(
        'Ground-truth games need float64, but jax_enable_x64 is off. '
        'Leave-one-out differences are around 1e-6 of the loss, below '
        "float32 resolution. Call jax.config.update('jax_enable_x64', True) "
        'before creating arrays, or run inside `with jax.enable_x64(True):`.')


def _to_float64(tree):
  """Casts every floating leaf to float64; other leaves pass unchanged."""

  def cast(leaf):
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      return jnp.asarray(leaf, jnp.float64)
    return leaf

  return jax.tree.map(cast, tree)


def _check_positive_int(value, name):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f'{name} must be a positive int; got {value!r} of type '
                    f'{type(value).__name__}.')
  if value < 1:
    raise ValueError(f'{name} must be a positive int; got {name}={value}.')
  return int(value)


def _check_key(key):
  """Accepts a typed PRNG key of shape () or a raw uint32 key vector."""
  dtype = getattr(key, 'dtype', None)
  shape = getattr(key, 'shape', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return key
  elif dtype == np.uint32 and shape is not None and len(shape) == 1:
    return key
  if dtype is None:
    described = f'{key!r} of type {type(key).__name__}'
  else:
    described = f'an array of dtype {dtype} and shape {shape}'
  raise TypeError(
      f'key must be a single JAX PRNG key, from jax.random.key(seed) or '
      f'jax.random.PRNGKey(seed); got {described}.')


def _check_weights(weights, n):
  weights = jnp.asarray(weights)
  if not (jnp.issubdtype(weights.dtype, jnp.floating)
          or jnp.issubdtype(weights.dtype, jnp.integer)
          or weights.dtype == jnp.bool_):
    raise TypeError(f'weights must be real loss weights; got dtype '
                    f'{weights.dtype}.')
  if weights.ndim not in (1, 2) or weights.shape[-1] != n:
    raise ValueError(
        f'weights must have shape ({n},) or (k, {n}) for a batch of {n} '
        f'examples; got shape {weights.shape}.')
  return weights.astype(jnp.float64)


def _check_losses(loss_fn, params, batch, val_batch):
  """Checks `loss_fn` gives one float64 loss per example on both batches."""
  for name, data in (('batch', batch), ('val_batch', val_batch)):
    n = _checks.batch_size(data, name)
    out = _checks.per_example_losses(loss_fn, params, data, n, name)
    if out.dtype != jnp.float64:
      raise TypeError(
          f'loss_fn(params, {name}) returned dtype {out.dtype} from float64 '
          'inputs; ground truth needs float64 losses. Check for a fixed '
          'lower-precision dtype inside the model, e.g. a Flax module built '
          'with dtype=jnp.float32.')
