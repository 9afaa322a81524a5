"""Small real training problems shared by the estimator and step tests.

The digits problem is the one of the fidelity benchmark, cut down: an MLP
64-128-128-10 on scikit-learn's digits, batches of 64, a clean validation
split, optionally with input features rescaled by exp(N(0, 2)) so that Adam's
per-parameter scaling matters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

# The tests' per-example references, shared with the ghost-kernel tests.
from models import per_example_grads  # pylint: disable=unused-import
from models import reference_dots  # pylint: disable=unused-import


class MLP(nn.Module):
  """A ReLU multilayer perceptron with `widths` hidden units."""

  widths: tuple[int, ...] = (128, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def cross_entropy_loss_fn(model: nn.Module):
  """Per-example cross-entropy of `model` on batches `{'x', 'y'}`."""

  def loss_fn(params, batch):
    log_probs = jax.nn.log_softmax(model.apply(params, batch['x']))
    return -jnp.take_along_axis(log_probs, batch['y'][:, None], axis=1)[:, 0]

  return loss_fn


class DigitsProblem:
  """Digits data, a model, a loss and a way to train it with plain optax."""

  def __init__(self, *, rescale: bool = False, seed: int = 0,
               dtype=jnp.float64):
    x, y = datasets.load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(seed)
    if rescale:
      x = x * np.exp(rng.normal(0.0, 2.0, size=x.shape[1]))
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    self.dtype = dtype
    self.train_x, self.train_y = x[:1500], y[:1500]
    self.val_batch = {'x': jnp.asarray(x[1500:1628], dtype),
                      'y': jnp.asarray(y[1500:1628])}
    self.model = MLP()
    self.loss_fn = cross_entropy_loss_fn(self.model)
    self._rng = rng
    params = self.model.init(jax.random.key(seed), jnp.zeros((1, 64)))
    self.init_params = jax.tree.map(lambda p: p.astype(dtype), params)

  def batch(self, n: int = 64):
    index = self._rng.choice(len(self.train_x), n, replace=False)
    return {'x': jnp.asarray(self.train_x[index], self.dtype),
            'y': jnp.asarray(self.train_y[index])}

  def plain_step(self, tx: optax.GradientTransformation):
    """The reference training step: the mean loss's gradient, then optax."""

    @jax.jit
    def step(params, opt_state, batch):
      grads = jax.grad(lambda p: jnp.mean(self.loss_fn(p, batch)))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def state_at(self, tx: optax.GradientTransformation, step: int):
    """Parameters and optimizer state before training step `step` (from 1)."""
    params, opt_state = self.init_params, tx.init(self.init_params)
    plain = self.plain_step(tx)
    for _ in range(step - 1):
      params, opt_state = plain(params, opt_state, self.batch())
    return params, opt_state
