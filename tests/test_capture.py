"""Which call sites the capture keeps, and what it leaves to the fallback."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import adam_inrun as air
import problems


class _SharedTable(nn.Module):
  """One Dense layer applied to the batch and to a learned shared table."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4)
    table = self.param('table', nn.initializers.normal(1.0), (3, 4))
    return dense(x) + dense(table).sum(0)


def test_layer_also_applied_outside_the_batch_falls_back_for_all_uses():
  model = _SharedTable()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = model.init(jax.random.key(1), x)
  loss_fn = lambda p, b: jnp.sum(model.apply(p, b) ** 2, axis=1)
  direction = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(2), p.shape), params)

  got = air.ghost_dots(loss_fn, params, x, direction)

  want = problems.reference_dots(loss_fn, params, x, direction)
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  assert set(air.coverage(loss_fn, params, x).values()) == {('jvp',)}


class _PerExampleVmap(nn.Module):
  """A model the user maps over examples with `jax.vmap` themselves."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def test_layers_inside_a_user_vmap_are_left_to_the_exact_fallback():
  model = _PerExampleVmap()
  x = jax.random.normal(jax.random.key(0), (6, 4))
  params = model.init(jax.random.key(1), x[0])
  loss_fn = lambda p, b: jax.vmap(
      lambda e: jnp.sum(model.apply(p, e) ** 2))(b)
  direction = jax.tree.map(jnp.ones_like, params)

  got = air.ghost_dots(loss_fn, params, x, direction)

  want = problems.reference_dots(loss_fn, params, x, direction)
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
