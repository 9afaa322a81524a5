r"""Data-parallel attribution over a device mesh, through JAX's own sharding.

Nothing here distributes work itself: the step of `make_train_step` is one
jit-compiled function, and XLA's SPMD partitioner splits it once the batch
is laid out over a `jax.sharding.Mesh`. Every quantity of the step is either
a sum over examples or per example:

* the batch gradient and the validation gradients are sums over examples,
  which XLA reduces with an all-reduce of parameter size;
* each call site's inputs and output cotangents, the exact jvp fallback and
  the values are per example, so they stay on the device that holds the
  example.

So `make_train_step`'s own step, given a batch and a validation batch split
along a 'data' axis and replicated parameters and optimizer state, returns
values split like the batch, and the compiled program's only collectives
are all-reduces of parameter-sized trees and of scalars (the batch
gradient, each validation gradient, the finiteness flag): no activation or
cotangent leaves its device. Nothing in this module is needed for that.
`data_parallel_step` fixes the layout at the function's boundary, so host
arrays are placed on the mesh as they enter and the values leave split
along the batch axes even on a mesh of one device.

Fully sharded data parallel (parameters and optimizer state split along a
second mesh axis, examples split along both axes) works too, with the same
numbers, but needs the hint that `data_parallel_step` adds. The parameters
at the path points, :math:`w + u(s \bar g)`, are computed inside the step,
so nothing pins their layout, and with few validation examples per device
XLA may split the validation passes along features, like the parameters,
rather than along examples, moving activation-sized arrays between devices.
`data_parallel_step` constrains the parameters that the validation loss sees,
and the direction, to be replicated, which is what fully sharded data
parallel does anyway: gather the weights where they are used, keep every
activation with its examples. It does not constrain `loss_fn`'s parameters
on the training batch: the call sites are found by the identity of the
parameter arrays, which a constraint would replace (see `capture`), and
in the models tested XLA gathers the weights there by itself. The gathered weights are whole-model
sized and XLA decides how long they live, so a step's peak memory can hold
a full copy of the parameters; nothing here schedules layer-by-layer
gathers.

Split the examples along every axis that splits the parameters. With the
parameters split along 'model' and the examples along 'data' only, XLA runs
the model tensor-parallel along 'model' and moves activations, in the plain
optax step as much as in the attributed one; `data_parallel_step` does not
build tensor parallelism. A grouped `nn.Conv` whose kernel is split makes
XLA gather the whole batch, again in the plain optax step too.

Two things to know about meshes. `jax.make_mesh` makes `Explicit` axes by
default, under which sharding is part of every array's type: parameters must
then be placed on the mesh before the first call (with
`jax.device_put(params, NamedSharding(mesh, PartitionSpec()))`, as plain
single-device arrays are ambiguous there), and some Flax layers fail to
trace at all (`nn.Embed` indexing a replicated table by split tokens, in a
plain training step too). Meshes with `Auto` axes have neither problem:
`jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * ndim)` or
`jax.sharding.Mesh`. And the example counts of `batch` and `val_batch` must
be divisible by the number of devices along the batch axes.

On several hosts, call `jax.distributed.initialize()` first, build the mesh
over `jax.devices()` (every host's devices), and have each host pass its own
examples to `global_batch`, which assembles global arrays with
`jax.make_array_from_process_local_data`. The values come back split over
hosts: each host reads its examples' values from
`values.addressable_shards`.
"""

from typing import Any, Callable, Sequence

import jax
from jax import sharding as jax_sharding
import optax

from adam_inrun import estimators
from adam_inrun import train_step

Axes = str | Sequence[str]


def _axes(mesh: jax_sharding.Mesh, axis: Axes) -> tuple[str, ...]:
  """Checks `mesh` and returns `axis` as a tuple of its axis names."""
  if not isinstance(mesh, jax_sharding.Mesh):
    raise TypeError(
        'mesh must be a jax.sharding.Mesh, such as jax.make_mesh((8,), '
        f"('data',)); got {type(mesh).__name__}.")
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  unknown = [name for name in axes if name not in mesh.axis_names]
  if not axes or unknown or len(set(axes)) != len(axes):
    raise ValueError(
        'axis must name one or more distinct axes of the mesh, whose axes are '
        f'{mesh.axis_names}; got {axis=}.')
  return axes


def batch_sharding(mesh: jax_sharding.Mesh,
                   axis: Axes = 'data') -> jax_sharding.NamedSharding:
  """The sharding that splits the example axis over the mesh axes `axis`.

  Args:
    mesh: the device mesh.
    axis: a mesh axis name, or several (their devices together split the
      examples, as in fully sharded data parallel).

  Returns:
    A `NamedSharding` splitting the leading axis along `axis` and
    replicating every other axis.

  Raises:
    TypeError: if `mesh` is not a `jax.sharding.Mesh`.
    ValueError: if `axis` names no axis of `mesh`.

  Examples:
    >>> import jax
    >>> from adam_inrun import sharding
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> sharding.batch_sharding(mesh).spec
    P('data',)
  """
  axes = _axes(mesh, axis)
  return jax_sharding.NamedSharding(
      mesh, jax_sharding.PartitionSpec(axes if len(axes) > 1 else axes[0]))


def global_batch(local_batch: Any, mesh: jax_sharding.Mesh,
                 axis: Axes = 'data') -> Any:
  """Assembles a batch split along `axis` from each process's own examples.

  Each process passes the contiguous block of the global batch that its
  devices hold: block `jax.process_index()` of `jax.process_count()` equal
  blocks for a mesh from `jax.make_mesh`, which keeps each process's devices
  together. The result is one global array per leaf, whose leading size is
  the sum over processes. With one process it is the whole batch, placed on
  the mesh. It is `jax.make_array_from_process_local_data` on every leaf.

  Args:
    local_batch: a pytree of host or device arrays, this process's examples
      on the leading axis.
    mesh: the device mesh, over the devices of every process.
    axis: the mesh axis or axes that split the examples.

  Returns:
    The global batch: a pytree of `jax.Array` sharded by
    `batch_sharding(mesh, axis)`.

  Raises:
    TypeError: if `mesh` is not a `jax.sharding.Mesh`.
    ValueError: if `axis` names no axis of `mesh`.

  Examples:
    >>> import jax, numpy as np
    >>> from adam_inrun import sharding
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> local = {'x': np.ones((8 * jax.local_device_count(), 3))}
    >>> batch = sharding.global_batch(local, mesh)
    >>> batch['x'].shape[0] == 8 * jax.device_count()
    True
  """
  placement = batch_sharding(mesh, axis)
  return jax.tree.map(
      lambda leaf: jax.make_array_from_process_local_data(placement, leaf),
      local_batch)


def data_parallel_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    attribution_fn: Callable[[estimators.AttributionInputs], Any] | None = None,
    *,
    mesh: jax_sharding.Mesh,
    axis: Axes = 'data',
    with_diagnostics: bool = False,
    sketch_rank: int | None = None,
) -> Callable[..., tuple]:
  """`make_train_step` with the batch split over a device mesh.

  The step takes and returns what `make_train_step`'s step does. `batch`
  and `val_batch` are split along `axis` (host arrays are placed so; device
  arrays must already be, for instance by `global_batch`), and the values
  come back split the same way. Parameters and optimizer state keep the
  layout they arrive with: replicated for data parallelism, or split along
  another mesh axis for fully sharded data parallelism, in which case the
  validation passes see them gathered (see the module docstring for why).
  Values and updated parameters equal those of the single-device step up to
  the order of floating-point sums.

  Args:
    loss_fn: `loss_fn(params, batch)` returning per-example losses, shape
      (n,).
    tx: any optax transformation or chain.
    attribution_fn: as for `make_train_step`; default `path_shapley()`.
    mesh: the device mesh (see the module docstring on `Explicit` axes).
    axis: the mesh axis or axes that split the examples.
    with_diagnostics: as for `make_train_step`.
    sketch_rank: as for `make_train_step`.

  Returns:
    A jit-compiled `step(params, opt_state, batch, val_batch,
    attribute=True)`, called and returning as `make_train_step`'s.

  Raises:
    TypeError: if `mesh` is not a `jax.sharding.Mesh`, or as for
      `make_train_step`.
    ValueError: if `axis` names no axis of `mesh`, or as for
      `make_train_step`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from adam_inrun import sharding
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> def loss_fn(params, batch):
    ...   return (batch['x'] @ params['w'] - batch['y']) ** 2
    >>> tx = optax.adamw(1e-2)
    >>> params = {'w': jnp.zeros(3)}
    >>> opt_state = tx.init(params)
    >>> n = 4 * jax.device_count()
    >>> batch = sharding.global_batch(
    ...     {'x': jnp.ones((n, 3)), 'y': jnp.ones(n)}, mesh)
    >>> step = sharding.data_parallel_step(loss_fn, tx, mesh=mesh)
    >>> params, opt_state, values = step(params, opt_state, batch, batch)
    >>> values.shape == (n,), values.sharding.spec
    (True, P('data',))
  """
  examples = batch_sharding(mesh, axis)
  replicated = jax_sharding.NamedSharding(mesh, jax_sharding.PartitionSpec())
  if attribution_fn is None:
    attribution_fn = estimators.path_shapley()
  if not callable(attribution_fn):
    raise TypeError(
        'attribution_fn must be callable, such as air.path_shapley(); got '
        f'{type(attribution_fn).__name__}.')

  def gathered_attribution_fn(inputs):
    # Not loss_fn itself: capture finds each layer's parameters by identity
    # among the leaves of `params`, which a constraint would replace.
    gathered_val_loss = lambda params: inputs.val_loss(
        jax.lax.with_sharding_constraint(params, replicated))
    direction = attribution_fn(inputs._replace(val_loss=gathered_val_loss))
    return jax.lax.with_sharding_constraint(direction, replicated)

  step = train_step.make_train_step(
      loss_fn, tx, gathered_attribution_fn, with_diagnostics=with_diagnostics,
      sketch_rank=sketch_rank, jit=False)

  # None leaves the parameters and optimizer state in the layout they come
  # with; XLA keeps it for the updated ones, as the tests check.
  out_shardings = (None, None, examples) + ((None,) if with_diagnostics else ())
  return train_step.jit_step(
      step, in_shardings=(None, None, examples, examples),
      out_shardings=out_shardings)
