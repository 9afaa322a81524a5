r"""Capturing the inputs and output cotangents of Flax linen call sites.

A *call site* is one call of a supported layer inside the user's `loss_fn`:
its module path, the method called (`__call__` or `attend`) and the call
count, so a module applied twice gives two sites. Every supported layer is
affine in its own parameters for a fixed input,

.. math::

  y = f(x; \theta) = A_x \theta,

so the contribution of a parameter direction :math:`D` to example :math:`i`
is the module's own forward pass with :math:`D` as its parameters, dotted with
the output cotangent :math:`\delta_i = \partial \bar\ell / \partial y_i` of the
mean loss :math:`\bar\ell = \frac1n \sum_j \ell_j` (see `ghost.py`).

Capture needs no change to the user's model. An interceptor
(`flax.linen.intercept_methods`) entered inside the traced function records
each site's arguments and adds a zero tensor, supplied by the interceptor, to
its output. Differentiating the summed loss with respect to those zeros gives
every site's output cotangent in the same backward pass that gives the
parameter gradient. Differentiating the mean, as a plain training step does,
gives the plain step's gradient (equal up to rounding: the added zeros may
change XLA's order of operations) and puts the step's :math:`1/n` into the
cotangents. The zeros' shapes are found once with `jax.eval_shape`.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np


# Layers whose output is affine in their own parameters for a fixed input,
# keyed by exact type: a subclass may override the method with anything.
KERNELS = {
    (nn.Dense, '__call__'): 'Dense',
    (nn.DenseGeneral, '__call__'): 'DenseGeneral',
    (nn.Conv, '__call__'): 'Conv',
    (nn.Embed, '__call__'): 'Embed',
    (nn.Embed, 'attend'): 'Embed.attend',
    (nn.LayerNorm, '__call__'): 'LayerNorm',
    (nn.RMSNorm, '__call__'): 'RMSNorm',
}

SiteKey = tuple[tuple[str, ...], str, int]


@dataclasses.dataclass(frozen=True)
class _Rebuild:
  """Puts captured array arguments back between a call's static arguments."""

  tree: Any
  static: tuple[Any, ...]

  def __call__(self, arrays: list[jax.Array]) -> tuple[tuple, dict]:
    arrays = iter(arrays)
    leaves = [next(arrays) if s is None else s for s in self.static]
    return jax.tree_util.tree_unflatten(self.tree, leaves)


@dataclasses.dataclass(frozen=True)
class Site:
  """What is known about one call site before any value is computed.

  Attributes:
    key: module path, method name and call count within one `loss_fn` call.
    kernel: the kernel's name, a value of `KERNELS`.
    module: an unbound copy of the module, replayed with the direction as its
      parameters.
    param_tree: tree structure of the module's own `params` collection.
    param_shapes: shape and dtype of each of the module's parameters.
    param_index: for each of the module's parameters, the index of the same
      array among the leaves of the user's `params`, or None when the module
      received an array that is not one of them (then it is not covered here).
    output: shape and dtype of the site's output.
    call: rebuilds the call's `(args, kwargs)` from its array arguments.
    nested: whether the call ran inside a JAX transformation within
      `loss_fn` (`lax.scan`, `lax.cond`, `jax.checkpoint`, `jax.vmap`, ...),
      whose values cannot be used outside it.
  """

  key: SiteKey
  kernel: str
  module: nn.Module
  param_tree: Any
  param_shapes: tuple[jax.ShapeDtypeStruct, ...]
  param_index: tuple[int | None, ...]
  output: jax.ShapeDtypeStruct
  call: _Rebuild
  nested: bool

  @property
  def name(self) -> str:
    path, method, count = self.key
    where = '/'.join(path) or '<root>'
    suffix = '' if method == '__call__' else f'.{method}'
    return f'{self.kernel} at {where}{suffix} (call {count})'


class Captured(NamedTuple):
  """Results of one backward pass with capture.

  Attributes:
    losses: per-example losses, shape (n,).
    grads: gradient of the mean loss, shaped like params.
    arguments: per site key, the array arguments of the call.
    cotangents: per site key, the cotangent of the mean loss at the site's
      output, shaped like the output.
  """

  losses: jax.Array
  grads: Any
  arguments: dict[SiteKey, list[jax.Array]]
  cotangents: dict[SiteKey, jax.Array]


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray))


def _trace_state() -> Any:
  """The current JAX trace; it changes inside `lax.scan`, `jax.vmap`, ..."""
  return jax.extend.core.get_opaque_trace_state(convention='flax')


def _kernel_of(context: Any) -> str | None:
  return KERNELS.get((type(context.module), context.method_name))


class _SiteCounter:
  """Gives each call of a supported layer its site key, in call order."""

  def __init__(self):
    self._counts = {}

  def key(self, context: Any) -> SiteKey:
    base = (tuple(context.module.path), context.method_name)
    count = self._counts.get(base, 0)
    self._counts[base] = count + 1
    return base + (count,)


def _discover(loss_fn, params, batch) -> dict[SiteKey, Site]:
  """Finds the supported call sites of `loss_fn` on abstract values."""
  sites = {}

  def traced(params, batch):
    leaf_index = {id(leaf): i for i, leaf in
                  enumerate(jax.tree_util.tree_leaves(params))}
    counter = _SiteCounter()
    top = _trace_state()

    def interceptor(next_fun, args, kwargs, context):
      kernel = _kernel_of(context)
      out = next_fun(*args, **kwargs)
      if kernel is None or not _is_array(out):
        return out
      module_params = context.module.variables.get('params', {})
      leaves, tree = jax.tree_util.tree_flatten(module_params)
      key = counter.key(context)
      call_leaves, call_tree = jax.tree_util.tree_flatten((args, kwargs))
      sites[key] = Site(
          key=key,
          kernel=kernel,
          module=context.module.clone(parent=None),
          param_tree=tree,
          param_shapes=tuple(
              jax.ShapeDtypeStruct(l.shape, l.dtype) for l in leaves),
          param_index=tuple(leaf_index.get(id(l)) for l in leaves),
          output=jax.ShapeDtypeStruct(out.shape, out.dtype),
          call=_Rebuild(call_tree, tuple(
              None if _is_array(l) else l for l in call_leaves)),
          nested=_trace_state() != top,
      )
      return out

    with nn.intercept_methods(interceptor):
      return loss_fn(params, batch)

  jax.eval_shape(traced, params, batch)
  return sites


def _resized(batch: Any, n: int) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((n,) + jnp.shape(x)[1:],
                                     jnp.result_type(x)), batch)


def find_sites(loss_fn: Callable[..., Any], params: Any, batch: Any,
               n: int) -> tuple[dict[SiteKey, Site], list[str]]:
  """Returns the call sites whose first output axis is the example axis.

  A site is kept only when its output's leading size follows the batch size:
  it is `n` for this batch and `n + 1` for a batch one example larger (both
  traced abstractly), and the call does not run inside a JAX transformation
  of `loss_fn` (`lax.scan`, `jax.checkpoint`, the user's own `vmap`, ...).
  Layers applied to something other than a batch of examples (a shared
  table, a flattened batch) fail that test, and their parameters are left
  to the exact fallback for all their uses. So is everything when `loss_fn`
  cannot be traced at `n + 1`.

  Returns:
    The kept sites by key, and a description of each site that was dropped.
  """
  sites = _discover(loss_fn, params, batch)
  try:
    grown = _discover(loss_fn, params, _resized(batch, n + 1))
  except Exception:  # pylint: disable=broad-except
    # A loss_fn that only traces at this batch size cannot show which
    # leading axes are example axes: leave everything to the fallback.
    return {}, [site.name for site in sites.values()]
  kept, dropped = {}, []
  for key, site in sites.items():
    follows = (not site.nested and bool(site.output.shape)
               and site.output.shape[0] == n)
    other = grown.get(key)
    follows = follows and other is not None and (
        other.output.shape[:1] == (n + 1,))
    if follows and any(i is not None for i in site.param_index):
      kept[key] = site
    else:
      dropped.append(site)

  # A parameter that also feeds a dropped site is left to the fallback for
  # all of its uses, or the dropped use would be silently missed.
  uncovered = {i for site in dropped for i in site.param_index}
  kept = {
      key: dataclasses.replace(site, param_index=tuple(
          None if i in uncovered else i for i in site.param_index))
      for key, site in kept.items()
  }
  dropped += [site for site in kept.values()
              if all(i is None for i in site.param_index)]
  kept = {key: site for key, site in kept.items()
          if any(i is not None for i in site.param_index)}
  return kept, [site.name for site in dropped]


def backward(loss_fn: Callable[..., Any], params: Any, batch: Any,
             sites: dict[SiteKey, Site]) -> Captured:
  """One forward and backward pass of `loss_fn` that also captures `sites`."""

  def perturbed(params, zeros):
    arguments = {}
    counter = _SiteCounter()

    def interceptor(next_fun, args, kwargs, context):
      if _kernel_of(context) is None:
        return next_fun(*args, **kwargs)
      key = counter.key(context)
      if key not in sites:
        return next_fun(*args, **kwargs)
      arguments[key] = [
          leaf for leaf in jax.tree_util.tree_leaves((args, kwargs))
          if _is_array(leaf)
      ]
      return next_fun(*args, **kwargs) + zeros[key]

    with nn.intercept_methods(interceptor):
      losses = loss_fn(params, batch)
    return jnp.mean(losses), (losses, arguments)

  zeros = {key: jnp.zeros(site.output.shape, site.output.dtype)
           for key, site in sites.items()}
  grad_fn = jax.grad(perturbed, argnums=(0, 1), has_aux=True)
  (grads, cotangents), (losses, arguments) = grad_fn(params, zeros)
  return Captured(losses, grads, arguments, cotangents)
