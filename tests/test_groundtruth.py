"""Tests for adam_inrun.groundtruth against plain, independent references.

Every reference below runs the real optax step by hand (jax.grad, tx.update,
optax.apply_updates) on one weight vector at a time, with no vmap and no code
from the module under test.
"""

import itertools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adam_inrun import groundtruth

NUM_EXAMPLES = 6
NUM_PERMUTATIONS = 2001


@pytest.fixture(scope='module', autouse=True)
def x64():
  """Runs this module in float64 and restores the previous mode afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


class _TinyMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _loss_fn(params, batch):
  logits = _TinyMLP().apply(params, batch['x'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])


def _make_batch(rng, n):
  x = rng.normal(size=(n, 4))
  y = rng.integers(0, 3, size=n)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(y)}


def _warmed_up(tx, seed=0, warmup_steps=2):
  """Params and optimizer state after a few real steps, plus fresh batches."""
  rng = np.random.default_rng(seed)
  # Drawn by NumPy in float64: Flax's init would give float32 parameters even
  # in x64 mode, and compiling its PRNG costs more than every test here.
  shapes = jax.eval_shape(_TinyMLP().init, jax.random.key(0),
                          jnp.zeros((1, 4)))
  params = jax.tree.map(
      lambda leaf: jnp.asarray(rng.normal(scale=0.7, size=leaf.shape)),
      shapes)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    grads = jax.grad(lambda p: jnp.mean(_loss_fn(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(warmup_steps):
    params, opt_state = train_step(params, opt_state, _make_batch(rng, 8))
  batch = _make_batch(rng, NUM_EXAMPLES)
  val_batch = _make_batch(rng, 16)
  return params, opt_state, batch, val_batch


@pytest.fixture(scope='module')
def adam_problem(x64):
  del x64  # Only orders the fixtures: the problem is built in float64.
  tx = optax.adam(0.05)
  return (tx, *_warmed_up(tx))


@pytest.fixture(scope='module')
def clipped_adamw_problem(x64):
  del x64
  tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(0.05, b1=0.8))
  return (tx, *_warmed_up(tx, seed=1))


@pytest.fixture(scope='module')
def adam_game(adam_problem):
  return _reference_game(*adam_problem)


def _reference_game(tx, params, opt_state, batch, val_batch):
  """U(weights) by the plain optax step, one weight vector at a time."""
  n = batch['y'].shape[0]

  def val_loss(p):
    return jnp.mean(_loss_fn(p, val_batch))

  @jax.jit
  def game(weights):
    def weighted_loss(p):
      return jnp.sum(weights * _loss_fn(p, batch)) / n

    grads = jax.grad(weighted_loss)(params)
    updates, _ = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return val_loss(params) - val_loss(new_params)

  return lambda weights: float(game(jnp.asarray(weights, jnp.float64)))


def _exact_shapley(game, n):
  """Shapley values by enumerating all 2^n coalitions."""
  values = {}
  for members in itertools.product((0.0, 1.0), repeat=n):
    values[members] = game(np.array(members))
  phi = np.zeros(n)
  for members, value in values.items():
    size = int(sum(members))
    for i in range(n):
      if members[i]:
        continue
      weight = (math.factorial(size) * math.factorial(n - size - 1)
                / math.factorial(n))
      joined = members[:i] + (1.0,) + members[i + 1:]
      phi[i] += weight * (values[joined] - value)
  return phi


def test_shapley_matches_exact_enumeration_under_adam(adam_problem,
                                                     adam_game):
  tx, params, opt_state, batch, val_batch = adam_problem
  exact = _exact_shapley(adam_game, NUM_EXAMPLES)

  estimate = groundtruth.shapley(
      _loss_fn, tx, params, opt_state, batch, val_batch,
      num_permutations=NUM_PERMUTATIONS, key=jax.random.key(0))

  # Leave-one-out differs from Shapley here (Adam makes the game
  # non-additive), so the tolerance is tight enough to tell them apart.
  full = adam_game(np.ones(NUM_EXAMPLES))
  loo = np.array([full - adam_game(1.0 - np.eye(NUM_EXAMPLES)[i])
                  for i in range(NUM_EXAMPLES)])
  tolerance = 0.02 * np.max(np.abs(exact))
  assert np.max(np.abs(loo - exact)) > 5 * tolerance
  np.testing.assert_allclose(estimate, exact, rtol=0, atol=tolerance)


@pytest.mark.parametrize('antithetic', [True, False])
def test_shapley_is_efficient(adam_problem, adam_game, antithetic):
  tx, params, opt_state, batch, val_batch = adam_problem
  total = adam_game(np.ones(NUM_EXAMPLES)) - adam_game(np.zeros(NUM_EXAMPLES))

  # An odd count, so the last sampled permutation goes without its reverse;
  # the same count as the other Shapley tests, to share one compilation.
  values = groundtruth.shapley(
      _loss_fn, tx, params, opt_state, batch, val_batch,
      num_permutations=NUM_PERMUTATIONS, key=jax.random.key(3),
      antithetic=antithetic)

  assert values.shape == (NUM_EXAMPLES,)
  assert values.dtype == jnp.float64
  np.testing.assert_allclose(np.sum(values), total, rtol=0, atol=1e-10)


def test_shapley_of_a_single_example_is_its_whole_step(adam_problem):
  tx, params, opt_state, batch, val_batch = adam_problem
  one = jax.tree.map(lambda x: x[:1], batch)
  game = _reference_game(tx, params, opt_state, one, val_batch)

  values = groundtruth.shapley(_loss_fn, tx, params, opt_state, one,
                               val_batch, num_permutations=1,
                               key=jax.random.key(0))

  np.testing.assert_allclose(values, [game([1.0]) - game([0.0])], rtol=1e-12)


def test_leave_one_out_matches_zeroed_loss_weight_step(adam_problem):
  tx, params, opt_state, batch, val_batch = adam_problem
  n = NUM_EXAMPLES

  @jax.jit
  def validation_after_step(weights):
    grads = jax.grad(
        lambda p: jnp.sum(weights * _loss_fn(p, batch)) / n)(params)
    updates, _ = tx.update(grads, opt_state, params)
    return jnp.mean(_loss_fn(optax.apply_updates(params, updates), val_batch))

  with_everyone = validation_after_step(jnp.ones(n))
  expected = [validation_after_step(jnp.ones(n).at[i].set(0.0))
              - with_everyone for i in range(n)]

  values = groundtruth.leave_one_out(_loss_fn, tx, params, opt_state, batch,
                                     val_batch, chunk_size=4)

  assert values.shape == (n,)
  np.testing.assert_allclose(values, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize('problem', ['adam_problem', 'clipped_adamw_problem'])
def test_utility_of_full_batch_is_the_plain_optax_step(request, problem):
  tx, params, opt_state, batch, val_batch = request.getfixturevalue(problem)

  @jax.jit
  def plain_step_val_loss_decrease():
    grads = jax.grad(lambda p: jnp.mean(_loss_fn(p, batch)))(params)
    updates, _ = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return (jnp.mean(_loss_fn(params, val_batch))
            - jnp.mean(_loss_fn(new_params, val_batch)))

  value = groundtruth.utility(_loss_fn, tx, params, opt_state, batch,
                              val_batch, jnp.ones(NUM_EXAMPLES))

  assert value.shape == ()
  np.testing.assert_allclose(value, plain_step_val_loss_decrease(),
                             rtol=1e-12)


def test_utility_of_a_stack_matches_the_reference_game(adam_problem,
                                                       adam_game):
  tx, params, opt_state, batch, val_batch = adam_problem
  weights = np.random.default_rng(2).integers(0, 2, size=(5, NUM_EXAMPLES))
  weights[0] = 0  # The empty coalition: Adam's momentum still moves w.

  values = groundtruth.utility(_loss_fn, tx, params, opt_state, batch,
                               val_batch, weights, chunk_size=2)

  assert values.shape == (5,)
  assert abs(values[0]) > 1e-4
  np.testing.assert_allclose(values, [adam_game(m) for m in weights],
                             rtol=1e-10, atol=1e-15)


def _cast_floating(tree, dtype):
  def cast(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf

  return jax.tree.map(cast, tree)


def test_float32_inputs_are_cast_to_float64(adam_problem):
  tx, params, opt_state, batch, val_batch = adam_problem
  as_float32 = _cast_floating((params, opt_state, batch, val_batch),
                              jnp.float32)
  as_float64 = _cast_floating(as_float32, jnp.float64)

  from_float32 = groundtruth.leave_one_out(_loss_fn, tx, *as_float32,
                                           chunk_size=4)
  from_float64 = groundtruth.leave_one_out(_loss_fn, tx, *as_float64,
                                           chunk_size=4)

  assert from_float32.dtype == jnp.float64
  np.testing.assert_array_equal(from_float32, from_float64)


@pytest.mark.parametrize('function', ['utility', 'leave_one_out', 'shapley'])
def test_refuses_to_run_without_x64(adam_problem, function):
  tx, params, opt_state, batch, val_batch = adam_problem
  args = (_loss_fn, tx, params, opt_state, batch, val_batch)
  calls = {
      'utility': lambda: groundtruth.utility(*args, np.ones(NUM_EXAMPLES)),
      'leave_one_out': lambda: groundtruth.leave_one_out(*args),
      'shapley': lambda: groundtruth.shapley(
          *args, num_permutations=2, key=jax.random.PRNGKey(0)),
  }
  with jax.enable_x64(False):
    with pytest.raises(groundtruth.Float64RequiredError,
                       match=r'jax_enable_x64.*float32 resolution'):
      calls[function]()


@pytest.mark.parametrize('num_permutations,error,match', [
    (0, ValueError, 'num_permutations=0'),
    (-4, ValueError, 'num_permutations=-4'),
    (2.0, TypeError, 'num_permutations must be a positive int; got 2.0'),
    (True, TypeError, 'num_permutations must be a positive int; got True'),
    (None, TypeError, 'num_permutations must be a positive int; got None'),
])
def test_shapley_rejects_bad_num_permutations(adam_problem, num_permutations,
                                              error, match):
  tx, params, opt_state, batch, val_batch = adam_problem
  with pytest.raises(error, match=match):
    groundtruth.shapley(_loss_fn, tx, params, opt_state, batch, val_batch,
                        num_permutations=num_permutations,
                        key=jax.random.key(0))


@pytest.mark.parametrize('make_key,match', [
    (lambda: 0, 'got 0 of type int'),
    (lambda: jnp.zeros(2), r'dtype float64 and shape \(2,\)'),
    (lambda: jax.random.split(jax.random.key(0), 2), r'shape \(2,\)'),
], ids=['int', 'float_array', 'stack_of_keys'])
def test_shapley_rejects_bad_key(adam_problem, make_key, match):
  tx, params, opt_state, batch, val_batch = adam_problem
  with pytest.raises(TypeError, match='key must be a single JAX PRNG key.*'
                     + match):
    groundtruth.shapley(_loss_fn, tx, params, opt_state, batch, val_batch,
                        num_permutations=2, key=make_key())


def test_shapley_accepts_raw_uint32_keys(adam_problem):
  tx, params, opt_state, batch, val_batch = adam_problem
  args = (_loss_fn, tx, params, opt_state, batch, val_batch)

  kwargs = dict(num_permutations=NUM_PERMUTATIONS)
  raw = groundtruth.shapley(*args, key=jax.random.PRNGKey(5), **kwargs)
  typed = groundtruth.shapley(
      *args, key=jax.random.wrap_key_data(jax.random.PRNGKey(5)), **kwargs)
  other = groundtruth.shapley(*args, key=jax.random.PRNGKey(6), **kwargs)

  np.testing.assert_array_equal(raw, typed)
  assert np.max(np.abs(raw - other)) > 1e-6


def _scalar_mean_loss(params, batch):
  return jnp.mean(_loss_fn(params, batch))


def _column_loss(params, batch):
  return _loss_fn(params, batch)[:, None]


def _float32_loss(params, batch):
  return _loss_fn(params, batch).astype(jnp.float32)


@pytest.mark.parametrize('loss_fn,error,match', [
    (_scalar_mean_loss, ValueError, r'shape \(6,\).*got shape \(\).*not their'
     ' mean'),
    (_column_loss, ValueError, r'shape \(6,\).*got shape \(6, 1\)'),
    (_float32_loss, TypeError, 'returned dtype float32'),
], ids=['scalar', 'column', 'float32'])
@pytest.mark.parametrize('function', ['utility', 'leave_one_out', 'shapley'])
def test_rejects_bad_loss_fn_output(adam_problem, loss_fn, error, match,
                                   function):
  tx, params, opt_state, batch, val_batch = adam_problem
  args = (loss_fn, tx, params, opt_state, batch, val_batch)
  calls = {
      'utility': lambda: groundtruth.utility(*args, np.ones(NUM_EXAMPLES)),
      'leave_one_out': lambda: groundtruth.leave_one_out(*args),
      'shapley': lambda: groundtruth.shapley(
          *args, num_permutations=2, key=jax.random.key(0)),
  }
  with pytest.raises(error, match=match):
    calls[function]()


@pytest.mark.parametrize('which,replace,match', [
    ('batch', lambda b: {**b, 'y': b['y'][:4]},
     r"leaves of batch disagree.*batch\['x'\] has 6, batch\['y'\] has 4"),
    ('batch', lambda b: {**b, 'x': jnp.float64(1.0)},
     r"batch\['x'\] is a scalar"),
    ('batch', lambda b: {}, 'batch has no array leaves'),
    ('val_batch', lambda b: {**b, 'x': b['x'][:3]},
     r"leaves of val_batch disagree.*val_batch\['x'\] has 3"),
], ids=['ragged_batch', 'scalar_leaf', 'empty_batch', 'ragged_val_batch'])
def test_rejects_malformed_batches(adam_problem, which, replace, match):
  tx, params, opt_state, batch, val_batch = adam_problem
  batches = {'batch': batch, 'val_batch': val_batch}
  batches[which] = replace(batches[which])
  with pytest.raises(ValueError, match=match):
    groundtruth.leave_one_out(_loss_fn, tx, params, opt_state,
                              batches['batch'], batches['val_batch'])


@pytest.mark.parametrize('shape', [(NUM_EXAMPLES + 1,), (2, 3, NUM_EXAMPLES),
                                   ()])
def test_utility_rejects_misshapen_weights(adam_problem, shape):
  tx, params, opt_state, batch, val_batch = adam_problem
  with pytest.raises(ValueError, match=r'weights must have shape \(6,\) or '
                     r'\(k, 6\).*got shape ' + re.escape(str(shape))):
    groundtruth.utility(_loss_fn, tx, params, opt_state, batch, val_batch,
                        np.ones(shape))


@pytest.mark.parametrize('chunk_size,error', [(0, ValueError),
                                              (1.5, TypeError)])
def test_rejects_bad_chunk_size(adam_problem, chunk_size, error):
  tx, params, opt_state, batch, val_batch = adam_problem
  with pytest.raises(error, match='chunk_size'):
    groundtruth.leave_one_out(_loss_fn, tx, params, opt_state, batch,
                              val_batch, chunk_size=chunk_size)
