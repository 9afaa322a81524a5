"""The low-rank sketch kernel against the exact kernel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_inrun as air
from adam_inrun import capture
from adam_inrun import ghost
import problems


class _Heads(nn.Module):
  """A dense layer, then a multi-axis DenseGeneral as attention uses."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral(features=(4, 6))(x)
    h = nn.DenseGeneral(features=5, axis=(-2, -1))(jnp.tanh(h))
    return nn.Dense(3, use_bias=False)(h)


def _exact_and_sketched(loss_fn, params, batch, direction, rank):
  n = jax.tree.leaves(batch)[0].shape[0]
  sites, _ = capture.find_sites(loss_fn, params, batch, n)
  captured = capture.backward(loss_fn, params, batch, sites)
  exact = ghost.contract(loss_fn, params, batch, sites, captured, direction)
  sketched = ghost.contract(loss_fn, params, batch, sites, captured,
                            direction, sketch_rank=rank)
  return exact, sketched


def test_sketch_whose_rank_covers_the_direction_equals_exact_replay():
  model = _Heads()
  x = jax.random.normal(jax.random.key(0), (6, 7, 8))
  params = model.init(jax.random.key(1), x)
  loss_fn = lambda p, b: jnp.sum(model.apply(p, b) ** 2, axis=(1, 2))
  direction = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(2), p.shape), params)

  # A rank-2 direction in every layer: a rank-2 sketch covers its range, so
  # it must reproduce the exact replay up to rounding.
  num_inputs = {'DenseGeneral_0': 8, 'DenseGeneral_1': 24, 'Dense_0': 5}

  def rank_two(path, leaf):
    if path[-1].key != 'kernel':
      return leaf
    rows = num_inputs[path[-2].key]
    seed = len(jax.tree_util.keystr(path))
    u = jax.random.normal(jax.random.key(seed), (rows, 2))
    v = jax.random.normal(jax.random.key(seed + 1), (2, leaf.size // rows))
    return (u @ v).reshape(leaf.shape)

  low_rank = jax.tree_util.tree_map_with_path(rank_two, direction)

  exact, sketched = _exact_and_sketched(loss_fn, params, x, low_rank, 2)
  reference = problems.reference_dots(loss_fn, params, x, low_rank) / 6
  np.testing.assert_allclose(exact, reference, rtol=1e-4,
                             atol=1e-5 * np.abs(reference).max())
  np.testing.assert_allclose(sketched, exact, rtol=1e-3,
                             atol=1e-4 * np.abs(exact).max())


def test_sketched_step_tracks_exact_values_on_digits():
  with jax.enable_x64(True):
    digits = problems.DigitsProblem(rescale=True)
    tx = optax.adam(1e-3)
    params, opt_state = digits.state_at(tx, 10)
    batch = digits.batch()
    exact_step = air.make_train_step(digits.loss_fn, tx)
    fast_step = air.make_train_step(digits.loss_fn, tx, sketch_rank=16)

    _, _, exact = exact_step(params, opt_state, batch, digits.val_batch)
    _, _, fast = fast_step(params, opt_state, batch, digits.val_batch)

  assert np.corrcoef(exact, fast)[0, 1] >= 0.98
