r"""Attribution functions: from one training step to one direction.

The game of a training step with parameters :math:`w`, optimizer state
:math:`s` and batch :math:`B` of :math:`n` examples gives a coalition
:math:`S \subseteq B` the utility

.. math::

  U(S) = L_V(w) - L_V\big(w + u(g(S))\big), \qquad
  g(S) = \tfrac{1}{n} \textstyle\sum_{i \in S} \nabla \ell(w, z_i),

where :math:`u` is the real optax update. Every estimator here reduces to one
direction :math:`d` shaped like the parameters, with

.. math::

  \phi_i \approx \langle d, \nabla \ell(w, z_i) \rangle / n,

which the ghost kernel evaluates for the whole batch at once.

An attribution function is any pure callable `attribution_fn(inputs) ->
direction` taking an `AttributionInputs` and returning a pytree shaped like
the parameters. It runs inside the jit-compiled step, so it must be
traceable. A positive value means the example lowered the validation loss.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class AttributionInputs(NamedTuple):
  """What an attribution function sees of one training step.

  Attributes:
    params: the parameters before the step, :math:`w`.
    opt_state: the optimizer state before the step, :math:`s`.
    grads: the batch gradient :math:`\\bar g = g(B)`, the mean over examples.
    updates: the real update :math:`u(\\bar g)` that the step applies.
    new_opt_state: the optimizer state after the step.
    update_fn: `update_fn(g) -> u(g)`, the optax update of a gradient `g`
      from the same state and parameters: differentiable with `jax.vjp`.
    val_loss: `val_loss(params) -> scalar`, the mean validation loss.
  """

  params: Any
  opt_state: Any
  grads: Any
  updates: Any
  new_opt_state: Any
  update_fn: Callable[[Any], Any]
  val_loss: Callable[[Any], jax.Array]


Schedule = float | Callable[[jax.Array], jax.Array]


def _check_learning_rate(learning_rate: Schedule) -> None:
  if callable(learning_rate):
    return
  if not isinstance(learning_rate, (int, float)) or isinstance(
      learning_rate, bool) or not np.isfinite(learning_rate) or (
          learning_rate <= 0):
    raise ValueError(
        'learning_rate must be a positive finite float or an optax schedule '
        f'(a callable of the step count); got {learning_rate=}.')


def _rate_at(learning_rate: Schedule, count: jax.Array) -> jax.Array:
  return learning_rate(count) if callable(learning_rate) else learning_rate


def _step_count(opt_state: Any) -> jax.Array:
  """Steps taken before this one, read from the optimizer state."""
  found = optax.tree.get_all_with_path(opt_state, 'count')
  if not found:
    raise ValueError(
        'A learning-rate schedule needs the step count, but the optimizer '
        "state has no 'count' field; pass a float learning_rate instead.")
  return found[0][1]


def _adam_state(opt_state: Any) -> Any:
  state = optax.tree.get(opt_state, 'ScaleByAdamState')
  if state is None:
    raise ValueError(
        'adam_fixed_state reads the Adam moments from the optimizer state, '
        'but it holds no optax ScaleByAdamState; use it with optax.adam, '
        'optax.adamw or a chain containing optax.scale_by_adam.')
  return state


def _path_point(inputs: AttributionInputs, scale: float) -> Any:
  """Parameters after the update of `scale` times the batch gradient."""
  updates = inputs.update_fn(optax.tree.scale(scale, inputs.grads))
  return optax.apply_updates(inputs.params, updates)


def sgd_proxy(learning_rate: Schedule) -> Callable[[AttributionInputs], Any]:
  r"""First-order In-Run Data Shapley, as for plain SGD.

  .. math::

    d = \eta_t \nabla L_V(w).

  It is exact for SGD without momentum to first order and serves as the
  baseline: under Adam it ignores the per-parameter scaling and ranks
  examples worse.

  Args:
    learning_rate: a float, or an optax schedule evaluated at the step count
      read from the optimizer state.

  Returns:
    An attribution function.

  Raises:
    ValueError: for a learning rate that is not positive and finite.

  Examples:
    >>> import optax, adam_inrun as air
    >>> step = air.make_train_step(
    ...     lambda p, b: (b * p['w']) ** 2, optax.sgd(0.1),
    ...     attribution_fn=air.sgd_proxy(0.1))
  """
  _check_learning_rate(learning_rate)

  def attribution_fn(inputs: AttributionInputs) -> Any:
    rate = learning_rate
    if callable(learning_rate):
      rate = _rate_at(learning_rate, _step_count(inputs.opt_state))
    return optax.tree.scale(rate, jax.grad(inputs.val_loss)(inputs.params))

  return attribution_fn


def adam_fixed_state(learning_rate: Schedule, b1: float = 0.9,
                     b2: float = 0.999, eps: float = 1e-8, *,
                     at_midpoint: bool = False
                     ) -> Callable[[AttributionInputs], Any]:
  r"""Adam with its second moment frozen: the closed-form estimator.

  .. math::

    d = \eta_t \frac{1 - \beta_1}{1 - \beta_1^t}
        \frac{\nabla L_V(w)}{\sqrt{\hat v_t} + \epsilon},

  with :math:`\hat v_t` the bias-corrected second moment after this step's
  own update and :math:`t` counting from 1. The moments are read from the
  optimizer state's `ScaleByAdamState`; `b1`, `b2` and `eps` must be those
  the optimizer uses. With `at_midpoint`, the validation gradient is taken
  at :math:`w + u(\bar g / 2)` instead of :math:`w`, which corrects much of
  its error where the update moves the validation gradient.

  Args:
    learning_rate: a float, or an optax schedule evaluated at :math:`t - 1`,
      the count the step's update uses.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    at_midpoint: evaluate the validation gradient at the path midpoint.

  Returns:
    An attribution function.

  Raises:
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import optax, adam_inrun as air
    >>> step = air.make_train_step(
    ...     lambda p, b: (b * p['w']) ** 2, optax.adam(1e-3),
    ...     attribution_fn=air.adam_fixed_state(1e-3))
  """
  _check_learning_rate(learning_rate)
  for name, value in (('b1', b1), ('b2', b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f'{name} must lie in [0, 1); got {name}={value}.')
  if not eps >= 0.0:
    raise ValueError(f'eps must be non-negative; got {eps=}.')

  def attribution_fn(inputs: AttributionInputs) -> Any:
    state = _adam_state(inputs.new_opt_state)
    t = state.count
    rate = _rate_at(learning_rate, t - 1)
    scale = rate * (1.0 - b1) / (1.0 - b1 ** t)
    where = _path_point(inputs, 0.5) if at_midpoint else inputs.params
    val_grads = jax.grad(inputs.val_loss)(where)
    return jax.tree.map(
        lambda g, nu: scale * g / (jnp.sqrt(nu / (1.0 - b2 ** t)) + eps),
        val_grads, state.nu)

  return attribution_fn


def _quadrature(num_nodes: int, power: float) -> tuple[np.ndarray, np.ndarray]:
  """Gauss-Legendre on [0, 1] after the substitution s = r ** power."""
  r, w = np.polynomial.legendre.leggauss(num_nodes)
  r, w = (r + 1.0) / 2.0, w / 2.0
  return r ** power, w * power * r ** (power - 1.0)


def path_shapley(num_nodes: int = 1, *, power: float = 1.0
                 ) -> Callable[[AttributionInputs], Any]:
  r"""Aumann-Shapley values along the real optax update.

  Integrates the marginal utility along the diagonal path
  :math:`g = s \bar g`, :math:`s \in [0, 1]`:

  .. math::

    d = -\sum_k \omega_k J_k^\top \nabla L_V\big(w + u(s_k \bar g)\big),
    \qquad J_k = \partial u / \partial g \,\big|_{s_k \bar g},

  with Gauss-Legendre nodes on :math:`[0, 1]` after the substitution
  :math:`s = r^{p}` (`power`), which packs nodes near :math:`s = 0` where
  Adam's update bends sharply. :math:`J_k^\top` is applied by `jax.vjp` of
  the optimizer's own update, so any optax chain works: Adam, AdamW,
  clipping, schedules, `inject_hyperparameters`. The values sum to
  :math:`U(B) - U(\emptyset)` up to quadrature error; the step's
  diagnostics report the residual.

  Where a second-moment entry is exactly zero (a dead unit) the vjp meets
  :math:`0 \cdot \infty`; such entries carry no gradient and their direction
  is set to zero, so no NaN leaves the step.

  Weak spots: in Adam's first steps the update is close to sign descent, so
  :math:`J` nearly vanishes along the path and the values under-count (watch
  the efficiency residual there). For a sign-based optimizer such as
  `optax.lion` the update has zero derivative almost everywhere, so every
  value is zero: finite but uninformative.

  Args:
    num_nodes: quadrature nodes; each costs one validation forward and
      backward pass.
    power: the exponent :math:`p \ge 1` of the node substitution; 1 is plain
      Gauss-Legendre.

  Returns:
    An attribution function.

  Raises:
    ValueError: for a `num_nodes` that is not a positive int or a `power`
      below 1.

  Examples:
    >>> import optax, adam_inrun as air
    >>> step = air.make_train_step(
    ...     lambda p, b: (b * p['w']) ** 2, optax.adam(1e-3),
    ...     attribution_fn=air.path_shapley(num_nodes=3, power=2.0))
  """
  if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or (
      num_nodes < 1):
    raise ValueError(
        f'num_nodes must be a positive int; got {num_nodes=}.')
  if not power >= 1.0:
    raise ValueError(f'power must be at least 1; got {power=}.')
  nodes, weights = _quadrature(num_nodes, power)

  def attribution_fn(inputs: AttributionInputs) -> Any:
    direction = optax.tree.zeros_like(inputs.grads)
    for node, weight in zip(nodes, weights):
      # Rematerialised: the pullback recomputes the update's intermediates
      # from the gradient rather than holding them through the validation
      # pass, which would cost several parameter-sized buffers.
      updates, pull_back = jax.vjp(jax.checkpoint(inputs.update_fn),
                                   optax.tree.scale(node, inputs.grads))
      val_grads = jax.grad(inputs.val_loss)(
          optax.apply_updates(inputs.params, updates))
      # apply_updates keeps the parameters' dtype, which may be narrower
      # than the update's.
      (marginal,) = pull_back(optax.tree.cast_like(val_grads, updates))
      direction = jax.tree.map(
          lambda d, m: d - weight * jnp.where(jnp.isfinite(m), m, 0.0),
          direction, marginal)
    return direction

  return attribution_fn
