"""Tests that `ghost_dots` equals dots with per-example gradients.

The reference is `jax.vmap(jax.grad)` of each example's loss run as a batch of
one (`models.per_example_grads`), dotted with the direction in NumPy. It
shares nothing with the ghost kernel but the model.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adam_inrun as air
import models


# Tests compile many small programs and run each once or twice: XLA's
# cheapest optimisation level halves compile time and changes no result
# beyond rounding.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}

# Every model is built on a batch of this many examples; smaller batches are
# its first examples, whose per-example gradients do not depend on the rest.
_N = 4


@pytest.fixture
def x64():
  """Enables float64 for one test only, so other modules keep float32."""
  with jax.enable_x64(True):
    yield


@functools.cache
def _problem(name: str, dtype: str = 'float32') -> models.Problem:
  with jax.enable_x64(dtype == 'float64'):
    return models.PROBLEMS[name](0, _N, np.dtype(dtype))


@functools.cache
def _per_example_grads(name: str, dtype: str = 'float32') -> tuple:
  """Per-example gradient leaves of `_problem(...)` as NumPy arrays."""
  problem = _problem(name, dtype)
  with jax.enable_x64(dtype == 'float64'):
    per_example_grads = jax.jit(models.per_example_grads, static_argnums=0,
                                compiler_options=_FAST_COMPILE)
    grads = per_example_grads(*problem)
    return tuple(np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(grads))


def _first(problem: models.Problem, n: int) -> models.Problem:
  return problem._replace(batch=jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x)[:n]), problem.batch))


def _numpy_dots(grads, direction, n: int = _N) -> np.ndarray:
  """Reference dots for the first n examples, in float64 NumPy."""
  return sum(
      np.tensordot(g[:n].astype(np.float64), np.asarray(d, np.float64), d.ndim)
      for g, d in zip(grads, jax.tree_util.tree_leaves(direction)))


def _jitted_ghost_dots(loss_fn):
  return jax.jit(functools.partial(air.ghost_dots, loss_fn),
                 compiler_options=_FAST_COMPILE)


def _error(got, want, scale: float) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / scale)


def _relative_error(got, want) -> float:
  return _error(got, want, np.max(np.abs(want)))


def _kernels(sites: tuple[str, ...]) -> list[str]:
  """Kernel names of `coverage` entries, such as 'Dense' or 'Embed.attend'."""
  return sorted(site.split(' at ')[0] for site in sites)


# Agreement with vmap(grad) on every model.


@pytest.mark.parametrize('n', [1, _N])
@pytest.mark.parametrize('name', sorted(models.PROBLEMS))
def test_jitted_ghost_dots_match_vmap_grad_in_float32(name, n):
  problem = _first(_problem(name), n)
  direction = models.random_direction(7, problem.params)

  dots = _jitted_ghost_dots(problem.loss_fn)(
      problem.params, problem.batch, direction)

  want = _numpy_dots(_per_example_grads(name), direction, n)
  assert dots.shape == (n,) and dots.dtype == jnp.float32
  assert np.max(np.abs(want)) > 1e-3
  assert _relative_error(dots, want) <= 1e-4


@pytest.mark.parametrize('name', sorted(models.PROBLEMS))
def test_every_parameter_leaf_matches_vmap_grad_in_float64(name, x64):
  # One leaf at a time, so an error in one kernel cannot hide in the sum.
  problem = _problem(name, 'float64')
  grads = _per_example_grads(name, 'float64')
  direction = models.random_direction(8, problem.params)
  leaves, tree = jax.tree_util.tree_flatten(direction)
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_leaves_with_path(problem.params)]
  ghost_dots = _jitted_ghost_dots(problem.loss_fn)

  dots = ghost_dots(problem.params, problem.batch, direction)
  want = _numpy_dots(grads, direction)
  # Some leaves have no gradient at all (a key bias under softmax): measure
  # every leaf's error against the whole direction's dots as well.
  scale = np.max(np.abs(want))
  errors = {'all leaves': _error(dots, want, scale)}
  for k, path in enumerate(paths):
    only_k = jax.tree_util.tree_unflatten(tree, [
        leaf if i == k else np.zeros(leaf.shape, leaf.dtype)
        for i, leaf in enumerate(leaves)
    ])
    dots = ghost_dots(problem.params, problem.batch, only_k)
    want = _numpy_dots(grads, only_k)
    errors[path] = _error(dots, want, max(np.max(np.abs(want)), 1e-3 * scale))

  assert dots.dtype == jnp.float64
  assert max(errors.values()) <= 1e-10, errors


def test_ghost_dots_without_jit_match_vmap_grad():
  problem = _problem('mlp')
  direction = models.random_direction(9, problem.params)

  dots = air.ghost_dots(*problem, direction)

  want = _numpy_dots(_per_example_grads('mlp'), direction)
  assert _relative_error(dots, want) <= 1e-4


def test_dense_without_bias_matches_vmap_grad():
  problem = models.mlp_problem(3, _N, use_bias=False)
  direction = models.random_direction(4, problem.params)
  coverage = air.coverage(*problem)
  assert coverage and not any('bias' in path for path in coverage)

  dots = _jitted_ghost_dots(problem.loss_fn)(
      problem.params, problem.batch, direction)

  want = models.reference_dots(*problem, direction)
  assert _relative_error(dots, want) <= 1e-4
  assert all(sites != ('jvp',) for sites in coverage.values())


def test_multi_axis_dense_general_is_covered_by_its_kernel():
  # Matching vmap(grad) is tested with the other models; this checks that
  # the model really contracts and produces several axes through the kernel.
  problem = _problem('dense_general')
  kernels = problem.params['params']
  assert kernels['DenseGeneral_0']['kernel'].shape == (4, 5, 2, 3)
  assert kernels['DenseGeneral_1']['kernel'].shape == (3, 2, 3, 4)

  coverage = air.coverage(*problem)

  assert {path: _kernels(sites) for path, sites in coverage.items()} == {
      "['params']['DenseGeneral_0']['bias']": ['DenseGeneral'],
      "['params']['DenseGeneral_0']['kernel']": ['DenseGeneral'],
      "['params']['DenseGeneral_1']['kernel']": ['DenseGeneral'],
  }


# Coverage.


def test_coverage_leaves_only_the_position_table_to_jvp():
  problem = _problem('lm')

  coverage = air.coverage(*problem)

  attention = "['params']['MultiHeadDotProductAttention_0']"
  want = {
      "['params']['position']": ['jvp'],
      "['params']['Embed_0']['embedding']": ['Embed', 'Embed.attend'],
      "['params']['RMSNorm_0']['scale']": ['RMSNorm'],
  }
  for layer in ('LayerNorm_0', 'LayerNorm_1'):
    for leaf in ('scale', 'bias'):
      want[f"['params']['{layer}']['{leaf}']"] = ['LayerNorm']
  for layer in ('Dense_0', 'Dense_1'):
    for leaf in ('kernel', 'bias'):
      want[f"['params']['{layer}']['{leaf}']"] = ['Dense']
  for layer in ('query', 'key', 'value', 'out'):
    for leaf in ('kernel', 'bias'):
      want[f"{attention}['{layer}']['{leaf}']"] = ['DenseGeneral']
  assert {path: _kernels(sites) for path, sites in coverage.items()} == want


def test_coverage_names_both_sites_of_the_tied_embedding():
  coverage = air.coverage(*_problem('lm'))

  sites = coverage["['params']['Embed_0']['embedding']"]

  assert len(sites) == 2
  assert all('Embed_0' in site for site in sites)


def test_coverage_names_both_calls_of_a_shared_dense():
  coverage = air.coverage(*_problem('shared_dense'))

  for leaf in ('kernel', 'bias'):
    sites = coverage[f"['params']['Dense_0']['{leaf}']"]
    assert _kernels(sites) == ['Dense', 'Dense'] and len(set(sites)) == 2
  assert len(coverage["['params']['Dense_1']['kernel']"]) == 1


@pytest.mark.parametrize('name', ['mlp', 'cnn', 'shared_dense'])
def test_coverage_puts_every_parameter_of_plain_layers_in_a_kernel(name):
  coverage = air.coverage(*_problem(name))

  assert coverage and all(sites != ('jvp',) for sites in coverage.values())


# Parameters also used away from the example axis, and layers called inside
# JAX transformations within loss_fn. The kernel cannot see those uses, so
# the parameters must go to the exact fallback, not lose a contribution.


class _FlatTiedLM(nn.Module):
  """Tied embedding whose `attend` sees (n * length, width), not (n, ...)."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(7, 6)
    x = jnp.tanh(nn.Dense(6)(embed(tokens)))
    logits = embed.attend(x.reshape(-1, x.shape[-1]))
    return logits.reshape(x.shape[:-1] + (7,))


def _check_against_reference(loss_fn, params, batch):
  direction = models.random_direction(5, params)
  dots = _jitted_ghost_dots(loss_fn)(params, batch, direction)
  want = models.reference_dots(loss_fn, params, batch, direction)
  assert _relative_error(dots, want) <= 1e-4


def test_embedding_also_attended_on_a_flattened_batch_matches_vmap_grad():
  model = _FlatTiedLM()
  tokens = models.lm_tokens(0, 4, 5, vocab_size=7)
  params = models.random_params(model, tokens, 1)

  def loss_fn(params, batch):
    logits = model.apply(params, batch['tokens'][:, :-1])
    return models.cross_entropy(logits, batch['tokens'][:, 1:]).mean(axis=1)

  _check_against_reference(loss_fn, params, {'tokens': tokens})


def _dense_problem():
  dense = nn.Dense(5)
  x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
  return dense, models.random_params(dense, x, 1), {'x': x}


def test_dense_also_applied_inside_lax_scan_matches_vmap_grad():
  dense, params, batch = _dense_problem()

  def loss_fn(params, batch):
    h = jnp.tanh(dense.apply(params, batch['x']))
    step = lambda h, _: (jnp.tanh(dense.apply(params, h)), None)
    h, _ = jax.lax.scan(step, h, None, length=2)
    return jnp.sum(h**2, axis=1)

  _check_against_reference(loss_fn, params, batch)


def test_dense_inside_jax_checkpoint_matches_vmap_grad():
  dense, params, batch = _dense_problem()

  def loss_fn(params, batch):
    block = jax.checkpoint(lambda x: jnp.tanh(dense.apply(params, x)))
    return jnp.sum(block(batch['x'])**2, axis=1)

  _check_against_reference(loss_fn, params, batch)


# Errors a user can make, each named in the message.


@pytest.fixture
def mlp():
  problem = _problem('mlp')
  direction = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), problem.params)
  return problem, direction


def test_scalar_loss_is_rejected_as_not_per_example(mlp):
  (loss_fn, params, batch), direction = mlp
  mean_loss = lambda params, batch: loss_fn(params, batch).mean()

  with pytest.raises(ValueError, match=r'shape \(4,\).*scalar'):
    air.ghost_dots(mean_loss, params, batch, direction)


def test_loss_of_the_wrong_shape_is_rejected_with_its_shape(mlp):
  (loss_fn, params, batch), direction = mlp
  paired = lambda params, batch: jnp.stack([loss_fn(params, batch)] * 2, 1)

  with pytest.raises(ValueError, match=r'shape \(4,\).*got shape \(4, 2\)'):
    air.ghost_dots(paired, params, batch, direction)


def test_batch_leaves_of_different_sizes_are_rejected(mlp):
  (loss_fn, params, batch), direction = mlp
  ragged = {'x': batch['x'], 'y': batch['y'][:3]}

  with pytest.raises(ValueError, match=r"number of examples.*\['y'\] has 3"):
    air.ghost_dots(loss_fn, params, ragged, direction)


def test_direction_with_another_tree_structure_is_rejected(mlp):
  (loss_fn, params, batch), direction = mlp
  layers = dict(direction['params'])
  del layers['Dense_2']

  with pytest.raises(ValueError, match='tree structure of params'):
    air.ghost_dots(loss_fn, params, batch, {'params': layers})


def test_direction_leaf_of_the_wrong_shape_is_rejected_by_path(mlp):
  (loss_fn, params, batch), direction = mlp
  kernel = direction['params']['Dense_1']['kernel']
  direction['params']['Dense_1']['kernel'] = kernel.T
  path = "direction['params']['Dense_1']['kernel']"

  with pytest.raises(ValueError,
                     match=re.escape(path) + r' has shape \(12, 16\)'):
    air.ghost_dots(loss_fn, params, batch, direction)


def test_integer_direction_is_rejected_as_not_floating(mlp):
  (loss_fn, params, batch), direction = mlp
  bias = direction['params']['Dense_0']['bias']
  direction['params']['Dense_0']['bias'] = bias.astype(jnp.int32)
  path = "direction['params']['Dense_0']['bias']"

  with pytest.raises(TypeError, match=re.escape(path) + '.*must be floating'):
    air.ghost_dots(loss_fn, params, batch, direction)
