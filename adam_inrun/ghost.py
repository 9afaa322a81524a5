r"""Per-example gradient inner products without per-example gradients.

For a direction :math:`D` shaped like the parameters, `ghost_dots` returns

.. math::

  \mathrm{dots}_i = \langle D, \nabla_\theta \ell(\theta, z_i) \rangle

for every example of a batch. A supported layer is affine in its own
parameters, :math:`y = A_x \theta`, so at one call site

.. math::

  \langle D, A_{x_i}^\top \delta_i \rangle = \langle A_{x_i} D, \delta_i \rangle,

which is the layer's own forward pass with :math:`D` as its parameters (one
extra forward matmul for a dense layer), dotted with the output cotangent
over every axis but the example axis. Sequence positions, convolution windows
and repeated uses of a parameter (tied embeddings, a module applied twice)
are summed by that dot and by summing over sites.

Parameters no kernel covers are handled exactly by one forward-mode
`jax.jvp` of the per-example losses along the direction restricted to them.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from adam_inrun import _checks
from adam_inrun import capture
from adam_inrun import sketch


def _module_direction(site: capture.Site, direction_leaves: list[jax.Array]
                      ) -> Any:
  """The direction restricted to one site's module, as its `params`."""
  return jax.tree_util.tree_unflatten(site.param_tree, [
      jnp.zeros(spec.shape, spec.dtype) if index is None
      else direction_leaves[index]
      for spec, index in zip(site.param_shapes, site.param_index)
  ])


def _site_dots(site: capture.Site, arguments: list[jax.Array],
               cotangent: jax.Array, module_direction: Any,
               dtype: Any) -> jax.Array:
  """Contribution of one call site: the layer replayed on `D`, dot `delta`."""
  _, method, _ = site.key
  args, kwargs = site.call(arguments)
  replayed = site.module.apply({'params': module_direction}, *args,
                               method=method, **kwargs)
  n = cotangent.shape[0]
  products = (replayed.reshape(n, -1).astype(dtype)
              * cotangent.reshape(n, -1).astype(dtype))
  # Summed by a matrix-vector product: XLA on CPU runs a row sum fused
  # after the replay's matmul markedly slower (about 0.7 ms of 5 for a
  # 256 x 1024 x 1024 layer).
  return products @ jnp.ones(products.shape[1], dtype)


def _sketch_axes(site: capture.Site, arguments: list[jax.Array],
                 module_direction: Any, rank: int | None
                 ) -> tuple[int, ...] | None:
  """The contracted axes when `site` is worth sketching at `rank`, else None."""
  if rank is None or site.kernel not in ('Dense', 'DenseGeneral'):
    return None
  (x, *_), _ = site.call(arguments)
  axes = sketch.contracted_axes(site.module, x.ndim)
  if axes is None:
    return None
  num_inputs = math.prod(x.shape[a] for a in axes)
  num_outputs = module_direction['kernel'].size // num_inputs
  return axes if rank < min(num_inputs, num_outputs) else None


def covered_leaves(sites: dict[capture.SiteKey, capture.Site]) -> set[int]:
  """Indices of the parameter leaves that some site's kernel covers."""
  return {i for site in sites.values() for i in site.param_index
          if i is not None}


def contract(loss_fn: Callable[..., Any], params: Any, batch: Any,
             sites: dict[capture.SiteKey, capture.Site],
             captured: capture.Captured, direction: Any, *,
             sketch_rank: int | None = None,
             sketch_key: jax.Array | None = None) -> jax.Array:
  """Per-example dots from a captured backward pass and a direction.

  Args:
    loss_fn: the user's per-example loss function.
    params: the parameters `captured` was computed at.
    batch: the batch `captured` was computed on.
    sites: the call sites, from `capture.find_sites`.
    captured: the result of `capture.backward` on the same inputs.
    direction: a pytree shaped like `params`.
    sketch_rank: when set, dense layers wider than this use the approximate
      low-rank kernel of `sketch.py` instead of the exact replay.
    sketch_key: PRNG key of the sketch's test matrices.

  Returns:
    An array of shape (n,), `<direction, grad loss_fn(params, batch)[i]> / n`:
    the dots of the mean loss's terms, as the cotangents carry its `1/n`.
  """
  direction_leaves = jax.tree_util.tree_leaves(direction)
  dtype = jnp.result_type(captured.losses.dtype, *direction_leaves,
                          jnp.float32)
  dots = jnp.zeros(captured.losses.shape, dtype)
  if sketch_key is None:
    sketch_key = jax.random.key(0)

  for number, (key, site) in enumerate(sites.items()):
    arguments = captured.arguments[key]
    cotangent = captured.cotangents[key]
    module_direction = _module_direction(site, direction_leaves)
    axes = _sketch_axes(site, arguments, module_direction, sketch_rank)
    if axes is None:
      dots += _site_dots(site, arguments, cotangent, module_direction, dtype)
    else:
      (x, *_), _ = site.call(arguments)
      dots += sketch.dense_dots(x, cotangent, module_direction, axes,
                                sketch_rank,
                                jax.random.fold_in(sketch_key, number), dtype)

  covered = covered_leaves(sites)
  if len(covered) < len(direction_leaves):
    fallback = _fallback_dots(loss_fn, params, batch, direction, covered)
    dots += fallback / fallback.shape[0]
  return dots


def _fallback_dots(loss_fn, params, batch, direction, covered) -> jax.Array:
  """Exact dots for the uncovered leaves: one jvp of the per-example losses."""
  param_leaves, tree = jax.tree_util.tree_flatten(params)
  tangent = jax.tree_util.tree_unflatten(tree, [
      jnp.zeros_like(param) if i in covered
      else jnp.asarray(leaf, jnp.result_type(param))
      for i, (param, leaf) in enumerate(
          zip(param_leaves, jax.tree_util.tree_leaves(direction)))
  ])
  _, dots = jax.jvp(lambda p: loss_fn(p, batch), (params,), (tangent,))
  return dots


def ghost_dots(loss_fn: Callable[..., Any], params: Any, batch: Any,
               direction: Any) -> jax.Array:
  r"""Inner products of a direction with every example's loss gradient.

  Computes, without forming any per-example gradient,

  .. math::

    \mathrm{dots}_i = \langle d, \nabla_\theta\, \mathrm{loss\_fn}
      (\theta, \mathrm{batch})_i \rangle.

  The user's Flax linen model is used unmodified: `nn.Dense`,
  `nn.DenseGeneral` (as in `nn.MultiHeadDotProductAttention`), `nn.Conv`,
  `nn.Embed` (lookup and `attend`), `nn.LayerNorm` and `nn.RMSNorm` are
  covered by kernels that cost about one forward pass of the layer; every
  other parameter is handled exactly by one `jax.jvp` of the losses. Use
  `coverage` to see which parameter goes where. The function traces and can
  be called under `jax.jit`.

  The layers must see examples independently (no batch statistics across
  examples, as in `nn.BatchNorm` in training mode) with the example axis
  leading. A parameter read directly, outside its module's methods, while
  the same array also feeds a covered layer, is not seen by the kernel.

  Args:
    loss_fn: `loss_fn(params, batch)` returning per-example losses of shape
      (n,).
    params: the parameters, any pytree.
    batch: a pytree of arrays whose leading axis is the example axis.
    direction: a pytree with the structure and shapes of `params`.

  Returns:
    A floating array of shape (n,).

  Raises:
    ValueError: if batch leaves disagree on the example count, `loss_fn`
      does not return shape (n,), or `direction` does not match `params`.
    TypeError: for non-floating losses or directions.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import adam_inrun as air
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((4, 2)), jnp.arange(4) % 3
    >>> params = model.init(jax.random.key(0), x)
    >>> def loss_fn(params, batch):
    ...   logits = model.apply(params, batch['x'])
    ...   return -jnp.take_along_axis(jax.nn.log_softmax(logits),
    ...                               batch['y'][:, None], axis=1)[:, 0]
    >>> batch = {'x': x, 'y': y}
    >>> direction = jax.tree.map(jnp.ones_like, params)
    >>> air.ghost_dots(loss_fn, params, batch, direction).shape
    (4,)
  """
  n = _checks.batch_size(batch)
  _checks.per_example_losses(loss_fn, params, batch, n)
  _checks.direction_like(direction, params)
  sites, _ = capture.find_sites(loss_fn, params, batch, n)
  captured = capture.backward(loss_fn, params, batch, sites)
  return n * contract(loss_fn, params, batch, sites, captured, direction)


def coverage(loss_fn: Callable[..., Any], params: Any,
             batch: Any) -> dict[str, tuple[str, ...]]:
  """Says which kernel computes the dots of each parameter.

  Args:
    loss_fn: `loss_fn(params, batch)` returning per-example losses.
    params: the parameters.
    batch: an example batch (only its shapes and dtypes are used).

  Returns:
    A dict from each parameter's path (`jax.tree_util.keystr`) to the call
    sites that cover it, such as `('Dense at Dense_0 (call 0)',)`, or
    `('jvp',)` for a parameter left to the exact forward-mode fallback.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import adam_inrun as air
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> loss_fn = lambda p, b: model.apply(p, b).sum(axis=1)
    >>> air.coverage(loss_fn, params, jnp.ones((4, 2)))["['params']['kernel']"]
    ('Dense at <root> (call 0)',)
  """
  n = _checks.batch_size(batch)
  _checks.per_example_losses(loss_fn, params, batch, n)
  sites, _ = capture.find_sites(loss_fn, params, batch, n)
  names = {}
  for site in sites.values():
    for index in site.param_index:
      if index is not None:
        names.setdefault(index, []).append(site.name)
  return {
      jax.tree_util.keystr(path): tuple(names.get(i, ['jvp']))
      for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
  }
