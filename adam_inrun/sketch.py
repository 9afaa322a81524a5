r"""A fast, approximate kernel for dense layers: a low-rank sketch of `D`.

The exact kernel replays a dense layer on the direction, :math:`x D`, which
costs one forward matmul of the layer. Replacing the layer's direction
:math:`D` (inputs by outputs) with a rank-:math:`r` approximation
:math:`Q B`, :math:`Q` orthonormal, found by a randomized range finder with
one power iteration,

.. math::

  Y = D D^\top D \Omega, \quad Q = \mathrm{qr}(Y), \quad B = Q^\top D,

turns each example's dot into

.. math::

  \sum_t x_{i,t} D \delta_{i,t}^\top \approx
  \sum_t (x_{i,t} Q) \cdot (\delta_{i,t} B^\top),

at a cost of about :math:`4 r\,\mathrm{in}\,\mathrm{out}` for the sketch (shared
by the batch) plus :math:`r (\mathrm{in} + \mathrm{out})` per row, instead of
:math:`\mathrm{in}\,\mathrm{out}` per row. The bias term stays exact. The
approximation error is that of the best rank-:math:`r` approximation of `D`,
nearly; `benchmarks/fidelity.py` and `benchmarks/throughput.py` report the
resulting correlation with the exact values beside the speed.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def contracted_axes(module: nn.Module, ndim: int) -> tuple[int, ...] | None:
  """Input axes a `Dense` or `DenseGeneral` contracts, or None if unsupported."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return None
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  else:
    axis = (-1,)
  return tuple(sorted(a % ndim for a in axis))


def dense_dots(x: jax.Array, cotangent: jax.Array, direction: dict[str, Any],
               axes: tuple[int, ...], rank: int, key: jax.Array,
               dtype: Any) -> jax.Array:
  """Per-example dots of a dense layer's gradient with a sketched direction.

  Args:
    x: the layer's input; axis 0 is the example axis.
    cotangent: the cotangent of the layer's output.
    direction: the layer's direction, `{'kernel': ..., 'bias': ...}` (no bias
      when the layer has none).
    axes: the input axes the layer contracts.
    rank: the sketch's rank.
    key: PRNG key of the random test matrix.
    dtype: the dtype to accumulate in.

  Returns:
    An array of shape (n,).
  """
  n = x.shape[0]
  kept = [a for a in range(x.ndim) if a not in axes]
  num_inputs = 1
  for a in axes:
    num_inputs *= x.shape[a]
  rows = jnp.transpose(x, kept + list(axes)).reshape(n, -1, num_inputs)
  kernel = direction['kernel'].reshape(num_inputs, -1).astype(dtype)
  num_outputs = kernel.shape[1]
  grads_out = cotangent.reshape(n, -1, num_outputs).astype(dtype)

  test = jax.random.normal(key, (num_outputs, rank), dtype)
  range_ = kernel @ test
  range_ = kernel @ (kernel.T @ range_)
  basis, _ = jnp.linalg.qr(range_)
  coefficients = basis.T @ kernel
  dots = jnp.einsum('ntr,ntr->n', rows.astype(dtype) @ basis,
                    grads_out @ coefficients.T)

  if 'bias' in direction:
    bias = direction['bias'].reshape(-1).astype(dtype)
    dots += jnp.einsum('nto,o->n', grads_out, bias)
  return dots
