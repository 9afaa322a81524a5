"""Argument checks shared by the public entry points.

Every check runs on shapes and dtypes only, so it works on concrete arrays and
on tracers alike and raises when the mistake is made, not inside XLA.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp


def batch_size(batch: Any, argname: str = 'batch') -> int:
  """Returns the example count of `batch`, checking every leaf agrees."""
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError(f'{argname} has no array leaves; expected a pytree of '
                     'arrays whose leading axis is the example axis.')
  sizes = {}
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
          f'{argname}{jax.tree_util.keystr(path)} is a scalar; every leaf of '
          f'{argname} needs a leading example axis.')
    sizes.setdefault(shape[0], []).append(jax.tree_util.keystr(path))
  if len(sizes) > 1:
    described = ', '.join(f'{argname}{paths[0]} has {size}'
                          for size, paths in sizes.items())
    raise ValueError(
        f'The leaves of {argname} disagree on the number of examples '
        f'(leading axis): {described}. Every leaf needs the same leading '
        'size.')
  (n,) = sizes
  if n < 1:
    raise ValueError(f'{argname} has no examples (leading axis size 0).')
  return n


def per_example_losses(loss_fn: Callable[..., Any], params: Any, batch: Any,
                       n: int, argname: str = 'batch') -> jax.ShapeDtypeStruct:
  """Checks that `loss_fn(params, batch)` returns one floating loss per example."""
  out = jax.eval_shape(loss_fn, params, batch)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(
        'loss_fn must return a single array of per-example losses, shape '
        f'({n},); got a {type(out).__name__}.')
  if out.shape != (n,):
    hint = (' It returned a scalar: return the per-example losses, not their'
            ' mean.' if out.shape == () else '')
    raise ValueError(
        f'loss_fn(params, {argname}) must return per-example losses of shape '
        f'({n},) for a {argname} of {n} examples; got shape {out.shape}.'
        + hint)
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
        f'loss_fn must return floating losses; got dtype {out.dtype}.')
  return out


def direction_like(direction: Any, params: Any) -> None:
  """Checks that `direction` has the tree structure and shapes of `params`."""
  params_tree = jax.tree_util.tree_structure(params)
  direction_tree = jax.tree_util.tree_structure(direction)
  if params_tree != direction_tree:
    raise ValueError(
        'direction must have the tree structure of params; got '
        f'{direction_tree}, expected {params_tree}.')
  pairs = zip(jax.tree_util.tree_leaves_with_path(params),
              jax.tree_util.tree_leaves(direction))
  for (path, param), leaf in pairs:
    name = jax.tree_util.keystr(path)
    if jnp.shape(param) != jnp.shape(leaf):
      raise ValueError(
          f'direction{name} has shape {jnp.shape(leaf)}; the parameter has '
          f'shape {jnp.shape(param)}.')
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f'direction{name} has dtype {dtype}; a direction must be floating.')
    if (jnp.issubdtype(dtype, jnp.complexfloating)
        != jnp.issubdtype(jnp.result_type(param), jnp.complexfloating)):
      raise TypeError(
          f'direction{name} has dtype {dtype}, which cannot be combined with '
          f'the parameter dtype {jnp.result_type(param)}.')
