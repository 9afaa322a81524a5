"""A jit-compiled optax training step that also values its examples."""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_inrun import _checks
from adam_inrun import capture
from adam_inrun import estimators
from adam_inrun import ghost


class StepDiagnostics(NamedTuple):
  """The step's own fidelity check (all scalars).

  Attributes:
    total_utility: :math:`U(B) - U(\\emptyset) = L_V(w + u(0)) -
      L_V(w + u(\\bar g))`, what the values should sum to (efficiency).
    values_sum: the sum of the step's values.
    efficiency_residual: `|values_sum - total_utility| / |total_utility|`.
    val_loss: the validation loss before the step, :math:`L_V(w)`.
    kernel_residual: `|values_sum - <d, g>| / |<d, g>|` for the direction
      `d` and batch gradient `g`. The values must sum to that inner product
      whatever the estimator, so a residual above rounding means a kernel
      missed a use of some parameter (for instance an array read directly
      outside its module's methods while also feeding a covered layer), or
      the sketch kernel's approximation error when `sketch_rank` is set.
    finite: whether the losses and the gradient were all finite. When it is
      False the step's values are NaN.
  """

  total_utility: jax.Array
  values_sum: jax.Array
  efficiency_residual: jax.Array
  val_loss: jax.Array
  kernel_residual: jax.Array
  finite: jax.Array


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _materialised(direction: Any) -> Any:
  """The direction with finite entries unchanged and the others NaN.

  XLA on CPU fuses elementwise producers of a matmul operand (such as a
  learning-rate scale) into the matmul and recomputes them for every tile,
  which made the kernel's replay matmuls two to three times slower than the
  forward's. A select is not fused that way, so the direction reaches the
  kernel as a plain array; an optimization barrier does not survive to
  fusion on CPU.
  """
  return jax.tree.map(lambda d: jnp.where(jnp.isfinite(d), d, jnp.nan),
                      direction)


def _relative_gap(value: jax.Array, reference: jax.Array) -> jax.Array:
  return jnp.abs(value - reference) / jnp.maximum(
      jnp.abs(reference), jnp.finfo(reference.dtype).tiny)


def _diagnostics(inputs: estimators.AttributionInputs, new_params: Any,
                 direction: Any, values: jax.Array,
                 finite: jax.Array) -> StepDiagnostics:
  empty = optax.apply_updates(
      inputs.params, inputs.update_fn(optax.tree.zeros_like(inputs.grads)))
  total = inputs.val_loss(empty) - inputs.val_loss(new_params)
  values_sum = jnp.sum(values)
  return StepDiagnostics(
      total_utility=total,
      values_sum=values_sum,
      efficiency_residual=_relative_gap(values_sum, total),
      val_loss=inputs.val_loss(inputs.params),
      kernel_residual=_relative_gap(
          values_sum, optax.tree.vdot(direction, inputs.grads)),
      finite=finite,
  )


def make_train_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    attribution_fn: Callable[[estimators.AttributionInputs], Any] | None = None,
    *,
    with_diagnostics: bool = False,
    sketch_rank: int | None = None,
    jit: bool = True,
) -> Callable[..., tuple]:
  r"""Builds a training step that returns each example's Shapley value.

  The step computes the mean loss gradient, applies the real optax update,
  and values every example of the batch in the step's game (the utility of
  a coalition is the drop in validation loss its update causes, see
  `estimators`),
  using one backward pass with capture plus what `attribution_fn` needs,
  typically one validation forward and backward pass. Training is not
  changed: the returned parameters and optimizer state are those of the
  plain optax step.

  A step whose losses or gradient are not finite still returns (with what
  optax makes of it; wrap `tx` in `optax.apply_if_finite` to skip such
  updates), and its values are NaN so that they cannot be mistaken for real
  ones; a `ledger` refuses and counts them.

  Args:
    loss_fn: `loss_fn(params, batch)` returning per-example losses, shape
      (n,). The validation loss is its mean over `val_batch`.
    tx: any optax transformation or chain.
    attribution_fn: maps `AttributionInputs` to a direction shaped like the
      parameters (see `estimators`); default `path_shapley()`.
    with_diagnostics: also return a `StepDiagnostics`, at the cost of two
      validation forward passes.
    sketch_rank: when set, dense layers use the fast approximate kernel of
      `adam_inrun.sketch`, a rank-`sketch_rank` sketch of the direction,
      instead of the exact replay; 16 is a reasonable start. The values are
      then approximate; compare with the exact ones on a few steps.
    jit: compile the step with `jax.jit`; False returns the plain function,
      for use inside a larger jitted or sharded function.

  Returns:
    `step(params, opt_state, batch, val_batch, attribute=True)` returning
    `(params, opt_state, values)`, or `(params, opt_state, values,
    diagnostics)` with `with_diagnostics`. `values` has shape (n,), in
    validation-loss units: positive values helped. With `attribute=False`
    (a Python bool: the step compiles one program for each setting) the
    step is the plain optax step and `values` and `diagnostics` are None.
    The jitted step also has `step.lower(...)`, as a `jax.jit` function
    does.

    Attributing only every k-th step (`attribute=(t % k == 0)`) cuts the
    cost by about k. The run-level sum then covers 1/k of the steps: when
    which steps are attributed does not depend on which examples they
    hold (batches shuffled each epoch), k times it is an unbiased estimate
    of the full run's sum, with more variance.

  Raises:
    TypeError: if `tx` is not an optax transformation or `attribution_fn`
      is not callable; at a call, if `attribute` is not a bool.
    ValueError: at the first call, for batches or losses of the wrong shape.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, adam_inrun as air
    >>> def loss_fn(params, batch):
    ...   return (batch['x'] @ params['w'] - batch['y']) ** 2
    >>> tx = optax.adam(1e-2)
    >>> params = {'w': jnp.zeros(3)}
    >>> opt_state = tx.init(params)
    >>> batch = {'x': jnp.ones((8, 3)), 'y': jnp.ones(8)}
    >>> step = air.make_train_step(loss_fn, tx)
    >>> params, opt_state, values = step(params, opt_state, batch, batch)
    >>> values.shape
    (8,)
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
        'tx must be an optax GradientTransformation (such as optax.adam(1e-3)'
        f' or an optax.chain); got {type(tx).__name__}.')
  if attribution_fn is None:
    attribution_fn = estimators.path_shapley()
  if not callable(attribution_fn):
    raise TypeError(
        'attribution_fn must be callable, such as air.path_shapley(); got '
        f'{type(attribution_fn).__name__}.')

  if sketch_rank is not None and (
      not isinstance(sketch_rank, int) or sketch_rank < 1):
    raise ValueError(
        f'sketch_rank must be None or a positive int; got {sketch_rank=}.')

  def plain_step(params, opt_state, batch):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if with_diagnostics:
      return new_params, new_opt_state, None, None
    return new_params, new_opt_state, None

  def step(params, opt_state, batch, val_batch, attribute=True):
    if not attribute:
      return plain_step(params, opt_state, batch)
    n = _checks.batch_size(batch, 'batch')
    _checks.per_example_losses(loss_fn, params, batch, n, 'batch')
    n_val = _checks.batch_size(val_batch, 'val_batch')
    _checks.per_example_losses(loss_fn, params, val_batch, n_val, 'val_batch')
    sites, _ = capture.find_sites(loss_fn, params, batch, n)

    captured = capture.backward(loss_fn, params, batch, sites)
    updates, new_opt_state = tx.update(captured.grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    inputs = estimators.AttributionInputs(
        params=params,
        opt_state=opt_state,
        grads=captured.grads,
        updates=updates,
        new_opt_state=new_opt_state,
        update_fn=lambda g: tx.update(g, opt_state, params)[0],
        val_loss=lambda p: jnp.mean(loss_fn(p, val_batch)),
    )
    direction = attribution_fn(inputs)
    _checks.direction_like(direction, params)
    direction = _materialised(direction)
    values = ghost.contract(loss_fn, params, batch, sites, captured,
                            direction, sketch_rank=sketch_rank)

    finite = _all_finite((captured.losses, captured.grads))
    values = jnp.where(finite, values, jnp.nan)
    if not with_diagnostics:
      return new_params, new_opt_state, values
    diagnostics = _diagnostics(inputs, new_params, direction, values, finite)
    return new_params, new_opt_state, values, diagnostics

  return jit_step(step) if jit else step


def jit_step(step: Callable[..., Any],
             **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit` of `step(params, opt_state, batch, val_batch, attribute)`.

  `attribute` is static, and always passed on positionally as a Python
  bool: jit keys its cache on how static arguments are given, so
  `step(...)`, `step(..., attribute=True)` and `attribute=np.True_` would
  otherwise compile three programs, and jit refuses keyword arguments when
  `in_shardings` is given. The result also has `lower`, as a jitted
  function does.

  Args:
    step: the step function.
    **jit_kwargs: more arguments for `jax.jit`, such as shardings.

  Returns:
    The jitted step.
  """
  compiled = jax.jit(step, static_argnums=4, **jit_kwargs)

  @functools.wraps(step)
  def jitted_step(params, opt_state, batch, val_batch, attribute=True):
    return compiled(params, opt_state, batch, val_batch, _flag(attribute))

  def lower(params, opt_state, batch, val_batch, attribute=True):
    return compiled.lower(params, opt_state, batch, val_batch,
                          _flag(attribute))

  jitted_step.lower = lower
  return jitted_step


def _flag(attribute: Any) -> bool:
  if isinstance(attribute, (bool, np.bool_)):
    return bool(attribute)
  raise TypeError(
      'attribute must be a Python bool, such as `t % k == 0`: it chooses '
      'which compiled program runs, so it cannot be an array; got '
      f'{type(attribute).__name__}.')
