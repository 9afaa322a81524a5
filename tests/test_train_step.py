"""The attributed train step against plain optax and closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_inrun as air
import problems


@pytest.fixture(autouse=True, scope='module')
def float64():
  with jax.enable_x64(True):
    yield


OPTIMIZERS = {
    'adam': lambda: optax.adam(1e-3),
    'adamw': lambda: optax.adamw(1e-3, weight_decay=1e-2),
    'clipped_adamw_schedule': lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.cosine_decay_schedule(3e-3, 1000))),
    'inject_hyperparameters': lambda: optax.inject_hyperparams(
        optax.adam)(learning_rate=1e-3),
    'sgd_momentum': lambda: optax.sgd(1e-2, momentum=0.9),
}


@pytest.fixture(scope='module')
def digits():
  return problems.DigitsProblem()


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_step_params_and_state_equal_plain_optax(digits, name):
  tx = OPTIMIZERS[name]()
  params, opt_state = digits.state_at(tx, 3)
  batch = digits.batch()
  step = air.make_train_step(digits.loss_fn, tx, air.path_shapley(2))

  new_params, new_state, values = step(params, opt_state, batch,
                                       digits.val_batch)
  ref_params, ref_state = digits.plain_step(tx)(params, opt_state, batch)

  chex_tol = dict(rtol=1e-12, atol=1e-15)
  for got, want in zip(jax.tree.leaves((new_params, new_state)),
                       jax.tree.leaves((ref_params, ref_state))):
    np.testing.assert_allclose(got, want, **chex_tol)
  assert values.shape == (64,) and bool(jnp.all(jnp.isfinite(values)))


def _val_grad(digits, params):
  return jax.grad(lambda p: jnp.mean(digits.loss_fn(p, digits.val_batch)))(
      params)


def test_sgd_proxy_equals_closed_form(digits):
  tx = optax.adam(1e-3)
  params, opt_state = digits.state_at(tx, 5)
  batch = digits.batch()
  step = air.make_train_step(digits.loss_fn, tx, air.sgd_proxy(0.05))

  _, _, values = step(params, opt_state, batch, digits.val_batch)

  direction = optax.tree.scale(0.05, _val_grad(digits, params))
  want = problems.reference_dots(digits.loss_fn, params, batch, direction) / 64
  np.testing.assert_allclose(values, want, rtol=1e-6,
                             atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize('at_midpoint', [False, True])
def test_adam_fixed_state_equals_closed_form(digits, at_midpoint):
  b1, b2, eps = 0.8, 0.99, 1e-7
  schedule = optax.linear_schedule(2e-3, 1e-3, 10)
  tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  params, opt_state = digits.state_at(tx, 4)
  batch = digits.batch()
  step = air.make_train_step(
      digits.loss_fn, tx,
      air.adam_fixed_state(schedule, b1, b2, eps, at_midpoint=at_midpoint))

  _, _, values = step(params, opt_state, batch, digits.val_batch)

  # Written out by hand from the per-example gradients: step t = 4.
  grads = problems.per_example_grads(digits.loss_fn, params, batch)
  mean_grad = jax.tree.map(lambda g: g.mean(0), grads)
  nu_before = optax.tree.get(opt_state, 'nu')
  nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g**2, nu_before,
                    mean_grad)
  t = 4
  scale = schedule(t - 1) * (1 - b1) / (1 - b1**t)
  where = params
  if at_midpoint:
    half = jax.tree.map(lambda g: g / 2, mean_grad)
    where = optax.apply_updates(params, tx.update(half, opt_state, params)[0])
  direction = jax.tree.map(
      lambda g, v: scale * g / (jnp.sqrt(v / (1 - b2**t)) + eps),
      _val_grad(digits, where), nu)
  want = problems.reference_dots(digits.loss_fn, params, batch, direction) / 64
  np.testing.assert_allclose(values, want, rtol=1e-6,
                             atol=1e-6 * np.abs(want).max())


def _pearson(a, b):
  return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


FIDELITY_CASES = {
    'digits_adam': (False, lambda: optax.adam(1e-3)),
    'rescaled_adam': (True, lambda: optax.adam(1e-3)),
    'digits_clipped_adamw': (False, lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3))),
}


@pytest.mark.parametrize('case', sorted(FIDELITY_CASES))
def test_path_shapley_matches_permutation_shapley_at_step_10(case):
  rescale, make_tx = FIDELITY_CASES[case]
  digits = problems.DigitsProblem(rescale=rescale)
  tx = make_tx()
  params, opt_state = digits.state_at(tx, 10)
  batch = digits.batch()
  step = air.make_train_step(digits.loss_fn, tx,
                             air.path_shapley(3, power=2.0),
                             with_diagnostics=True)

  _, _, values, diagnostics = step(params, opt_state, batch, digits.val_batch)
  truth = air.groundtruth.shapley(digits.loss_fn, tx, params, opt_state,
                                  batch, digits.val_batch,
                                  num_permutations=40,
                                  key=jax.random.key(1))

  assert _pearson(values, truth) >= 0.99
  assert float(diagnostics.efficiency_residual) <= 0.05
  np.testing.assert_allclose(diagnostics.total_utility, truth.sum(),
                             rtol=1e-8)


def test_sgd_proxy_ranks_worse_than_path_shapley_on_rescaled_features():
  digits = problems.DigitsProblem(rescale=True)
  tx = optax.adam(1e-3)
  params, opt_state = digits.state_at(tx, 10)
  batch = digits.batch()
  truth = air.groundtruth.shapley(digits.loss_fn, tx, params, opt_state,
                                  batch, digits.val_batch,
                                  num_permutations=20,
                                  key=jax.random.key(2))
  r = {}
  for name, fn in (('sgd', air.sgd_proxy(1e-3)),
                   ('path', air.path_shapley(3, power=2.0))):
    _, _, values = air.make_train_step(digits.loss_fn, tx, fn)(
        params, opt_state, batch, digits.val_batch)
    r[name] = _pearson(values, truth)
  assert r['path'] >= 0.99 and r['sgd'] < r['path'] - 0.02, r


def test_diagnostics_total_utility_equals_the_real_game(digits):
  tx = optax.adam(1e-3)
  params, opt_state = digits.state_at(tx, 3)
  batch = digits.batch()
  step = air.make_train_step(digits.loss_fn, tx, with_diagnostics=True)

  _, _, values, diagnostics = step(params, opt_state, batch, digits.val_batch)

  full, empty = air.groundtruth.utility(
      digits.loss_fn, tx, params, opt_state, batch, digits.val_batch,
      jnp.stack([jnp.ones(64), jnp.zeros(64)]))
  np.testing.assert_allclose(diagnostics.total_utility, full - empty,
                             rtol=1e-9)
  np.testing.assert_allclose(diagnostics.values_sum, values.sum(), rtol=1e-12)
  assert bool(diagnostics.finite)


class _DeadUnitMLP(nn.Module):
  """A hidden layer whose second unit never activates."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(3)(x))
    return nn.Dense(2)(h)


def test_dead_units_never_produce_nan():
  model = _DeadUnitMLP()
  x = jnp.abs(jax.random.normal(jax.random.key(0), (8, 4))) + 0.1
  params = model.init(jax.random.key(1), x)
  dense = params['params']['Dense_0']
  dense['kernel'] = dense['kernel'].at[:, 1].set(-1.0)
  dense['bias'] = dense['bias'].at[1].set(-1.0)
  loss_fn = lambda p, b: jnp.sum((model.apply(p, b) - 1.0) ** 2, axis=1)
  tx = optax.adam(1e-2)
  step = air.make_train_step(loss_fn, tx, air.path_shapley(3),
                             with_diagnostics=True)

  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state, values, diagnostics = step(params, opt_state, x, x)
    assert bool(jnp.all(jnp.isfinite(values))), values
    assert bool(diagnostics.finite)
  assert float(jnp.abs(values).max()) > 0.0


def test_sign_based_optimizer_gives_finite_zero_values(digits):
  # The direction is a compile-time constant zero here. XLA on CPU (jaxlib
  # 0.10) miscompiled the kernel's matmul fused with a row sum for such an
  # operand and returned garbage; the kernel now sums rows by a matvec.
  tx = optax.lion(1e-4)
  params, opt_state = digits.state_at(tx, 3)
  step = air.make_train_step(digits.loss_fn, tx, air.path_shapley(2))

  _, _, values = step(params, opt_state, digits.batch(), digits.val_batch)

  assert bool(jnp.all(jnp.isfinite(values)))
  np.testing.assert_array_equal(values, 0.0)


def test_non_finite_step_returns_nan_values_and_says_so(digits):
  tx = optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=5)
  params, opt_state = digits.state_at(tx, 2)
  batch = digits.batch()
  batch['x'] = batch['x'].at[3, 0].set(jnp.inf)
  step = air.make_train_step(digits.loss_fn, tx, with_diagnostics=True)

  new_params, _, values, diagnostics = step(params, opt_state, batch,
                                            digits.val_batch)

  assert not bool(diagnostics.finite)
  assert bool(jnp.all(jnp.isnan(values)))
  for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_step_traces_once_per_mode_for_many_batches(digits):
  # `loss_fn` runs in Python only while a program is being traced.
  traces = []

  def loss_fn(params, batch):
    traces.append(None)
    return digits.loss_fn(params, batch)

  tx = optax.adam(1e-3)
  params, opt_state = digits.init_params, tx.init(digits.init_params)
  step = air.make_train_step(loss_fn, tx)
  params, opt_state, _ = step(params, opt_state, digits.batch(),
                              digits.val_batch)
  first = len(traces)
  assert first > 0
  for attribute in (True, np.True_, True):
    params, opt_state, _ = step(params, opt_state, digits.batch(),
                                digits.val_batch, attribute=attribute)
  assert len(traces) == first
  # Attributing every other step adds one program, the plain step.
  step(params, opt_state, digits.batch(), digits.val_batch, attribute=False)
  second = len(traces)
  assert second > first
  for t in range(4):
    params, opt_state, _ = step(params, opt_state, digits.batch(),
                                digits.val_batch, attribute=t % 2 == 0)
  assert len(traces) == second


def test_attribute_must_be_a_python_bool(digits):
  tx = optax.adam(1e-3)
  step = air.make_train_step(digits.loss_fn, tx)
  with pytest.raises(TypeError, match='attribute must be a Python bool'):
    step(digits.init_params, tx.init(digits.init_params), digits.batch(),
         digits.val_batch, attribute=jnp.asarray(True))


def test_step_rejects_bad_arguments(digits):
  with pytest.raises(TypeError, match='tx must be an optax'):
    air.make_train_step(digits.loss_fn, optax.adam)
  with pytest.raises(TypeError, match='attribution_fn must be callable'):
    air.make_train_step(digits.loss_fn, optax.adam(1e-3), 'path')
  with pytest.raises(ValueError, match='num_nodes must be a positive int'):
    air.path_shapley(0)
  with pytest.raises(ValueError, match='learning_rate must be a positive'):
    air.sgd_proxy(-1.0)
  with pytest.raises(ValueError, match='b2 must lie in'):
    air.adam_fixed_state(1e-3, b2=1.0)

  tx = optax.adam(1e-3)
  step = air.make_train_step(digits.loss_fn, tx)
  params, opt_state = digits.init_params, tx.init(digits.init_params)
  bad_val = {'x': digits.val_batch['x'], 'y': digits.val_batch['y'][:5]}
  with pytest.raises(ValueError, match='val_batch disagree'):
    step(params, opt_state, digits.batch(), bad_val)

  mean_loss = lambda p, b: jnp.mean(digits.loss_fn(p, b))
  step = air.make_train_step(mean_loss, tx)
  with pytest.raises(ValueError, match='returned a scalar'):
    step(params, opt_state, digits.batch(), digits.val_batch)


def test_adam_fixed_state_needs_adam_state(digits):
  tx = optax.sgd(1e-2)
  step = air.make_train_step(digits.loss_fn, tx, air.adam_fixed_state(1e-2))
  with pytest.raises(ValueError, match='ScaleByAdamState'):
    step(digits.init_params, tx.init(digits.init_params), digits.batch(),
         digits.val_batch)


class _DirectRead(nn.Module):
  """Feeds a Dense layer's kernel to a matmul of its own as well."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4)
    h = dense(x)
    return h + x @ dense.variables['params']['kernel']


def test_kernel_residual_flags_a_parameter_read_outside_its_module():
  x = jax.random.normal(jax.random.key(0), (8, 4))
  tx = optax.adam(1e-2)
  residuals = {}
  for name, model in (('dense', nn.Dense(4)), ('direct', _DirectRead())):
    params = model.init(jax.random.key(1), x)
    loss_fn = lambda p, b, model=model: jnp.sum(
        (model.apply(p, b) - 1.0) ** 2, axis=1)
    step = air.make_train_step(loss_fn, tx, air.sgd_proxy(0.1),
                               with_diagnostics=True)
    *_, diagnostics = step(params, tx.init(params), x, x)
    residuals[name] = float(diagnostics.kernel_residual)
  assert residuals['dense'] < 1e-6  # float32 parameters: rounding only
  assert residuals['direct'] > 1e-2


def test_custom_attribution_fn_from_the_readme(digits):
  def steepest_descent(inputs):
    grads = jax.grad(inputs.val_loss)(inputs.params)
    return optax.tree.scale(optax.tree.norm(inputs.updates), grads)

  tx = optax.adamw(1e-3)
  params, opt_state = digits.state_at(tx, 2)
  batch = digits.batch()
  step = air.make_train_step(digits.loss_fn, tx, steepest_descent)

  _, _, values = step(params, opt_state, batch, digits.val_batch)

  new_params, _ = digits.plain_step(tx)(params, opt_state, batch)
  size = optax.tree.norm(optax.tree.sub(new_params, params))
  direction = optax.tree.scale(size, _val_grad(digits, params))
  want = problems.reference_dots(digits.loss_fn, params, batch, direction) / 64
  np.testing.assert_allclose(values, want, rtol=1e-6,
                             atol=1e-6 * np.abs(want).max())
