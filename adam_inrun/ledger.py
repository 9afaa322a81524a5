"""Run-level accumulation of per-example data values.

A training step returns `values`, one Shapley value per example of its batch.
The run-level value of an example is the sum of its values over every step in
which it was in the batch (`estimators` defines the step's game). The ledger
keeps that sum for every example of the dataset, in memory linear in its size,
together with what is needed to read it: how often the example was seen, a
scale-free sum, and how often its value was negative.

The core is functional and can be called inside or beside `jax.jit`::

  state = ledger.init(num_examples)
  for step, batch in enumerate(loader, start=1):
    params, opt_state, values = train_step(params, opt_state, batch, val_batch)
    state = ledger.record(state, step, batch['index'], values)
    if step % 100 == 0:
      ledger.save(state, 'ledger.npz')

A step is added in full or not at all. `record` refuses a step, leaving every
total unchanged, when

* its number is not larger than the last step handled (a stale step, as when
  a resumed run feeds again the steps recorded before its last save), or
* an index lies outside `[0, num_examples)`, or
* a value is NaN or infinite.

Each refusal has its own counter, so a refused step is never silent. A fresh
step (one numbered after the last step handled) advances `last_step` whether
it is recorded or refused, so that every counter, and not only the totals, of
a run resumed from a save ends equal to those of an uninterrupted run; the
exception is `num_refused_stale`, which counts the replayed steps.

Totals are summed in the ledger's dtype. Over a very long run a float32 sum
keeps about seven significant digits; use float64 (with `jax_enable_x64`) when
the sums must be finer than that.
"""

import contextlib
import operator
import os
import tempfile
import zipfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


# Bumped whenever the fields saved by `save` change meaning.
_FORMAT_VERSION = 1


class LedgerState(NamedTuple):
  """Per-example totals of a run's data values and the run's step counters.

  Attributes:
    value_sum: Sum of the example's values over the steps recorded: its
      Shapley value in the game whose utility is the run's total
      validation-loss decrease.
    step_count: How many times the example appeared in a recorded batch. An
      index repeated within one batch counts once per appearance.
    normalised_sum: Sum of the example's values, each divided by the mean
      absolute value of its step's batch, so that every step weighs the same
      whatever the loss scale at that point of training.
    negative_count: How many of the example's recorded values were negative.
    num_recorded: Steps added to the totals.
    num_refused_nonfinite: Fresh steps refused because a value was NaN or
      infinite.
    num_refused_out_of_range: Fresh steps refused because an index was outside
      `[0, num_examples)`. Only possible under `jax.jit`: outside it, `record`
      raises instead.
    num_refused_stale: Steps refused because their number was not larger than
      `last_step`.
    last_step: The number of the last fresh step, recorded or refused; -1
      before the first.
  """

  value_sum: jax.Array  # shape=(num_examples,), dtype=the ledger's dtype.
  step_count: jax.Array  # shape=(num_examples,), dtype=int32.
  normalised_sum: jax.Array  # shape=(num_examples,), dtype=the ledger's dtype.
  negative_count: jax.Array  # shape=(num_examples,), dtype=int32.
  num_recorded: jax.Array  # shape=(), dtype=int32.
  num_refused_nonfinite: jax.Array  # shape=(), dtype=int32.
  num_refused_out_of_range: jax.Array  # shape=(), dtype=int32.
  num_refused_stale: jax.Array  # shape=(), dtype=int32.
  last_step: jax.Array  # shape=(), dtype=int32.


_PER_EXAMPLE_FLOAT = ('value_sum', 'normalised_sum')
_PER_EXAMPLE_INT = ('step_count', 'negative_count')
_COUNTERS = ('num_recorded', 'num_refused_nonfinite',
             'num_refused_out_of_range', 'num_refused_stale', 'last_step')


def init(
    num_examples: int,
    dtype: jax.typing.DTypeLike = jnp.float32,
) -> LedgerState:
  """Returns an empty ledger for a dataset of `num_examples` examples.

  Args:
    num_examples: The size of the dataset; every index passed to `record` must
      lie in `[0, num_examples)`.
    dtype: The dtype in which values are summed, float32 or float64. float64
      needs `jax.config.update('jax_enable_x64', True)`.

  Returns:
    A `LedgerState` with every total and counter at zero and `last_step` at -1.

  Raises:
    TypeError: If `num_examples` is not an integer, or `dtype` is neither
      float32 nor float64.
    ValueError: If `num_examples` is not positive, or `dtype` is float64 while
      `jax_enable_x64` is off.

  Examples:
    >>> from adam_inrun import ledger
    >>> state = ledger.init(4)
    >>> state.value_sum
    Array([0., 0., 0., 0.], dtype=float32)
    >>> int(state.last_step)
    -1
  """
  try:
    num_examples = operator.index(num_examples)
  except TypeError:
    raise TypeError(
        f'num_examples must be an integer; got {num_examples=}.') from None
  if num_examples < 1:
    raise ValueError(f'num_examples must be positive; got {num_examples=}.')
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float64):
    # A 16-bit sum stops growing once it is about a thousand times the values
    # added to it, which a long run soon reaches.
    raise TypeError(f'dtype must be float32 or float64; got {dtype=!s}.')
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(
        f'{dtype=!s} is not available while jax_enable_x64 is off; call '
        "jax.config.update('jax_enable_x64', True) first, or use float32.")

  per_example = jnp.zeros((num_examples,), dtype)
  per_example_count = jnp.zeros((num_examples,), jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  return LedgerState(
      value_sum=per_example,
      step_count=per_example_count,
      normalised_sum=per_example,
      negative_count=per_example_count,
      num_recorded=zero,
      num_refused_nonfinite=zero,
      num_refused_out_of_range=zero,
      num_refused_stale=zero,
      last_step=jnp.full((), -1, jnp.int32),
  )


def record(
    state: LedgerState,
    step: jax.typing.ArrayLike,
    indices: jax.typing.ArrayLike,
    values: jax.typing.ArrayLike,
) -> LedgerState:
  """Adds one training step's values to the ledger, or refuses the step.

  The step is refused, and only the matching counter changes, when `step` is
  not larger than `state.last_step`, when an index is out of range, or when a
  value is not finite (see the module docstring). Otherwise every example
  `indices[j]` receives `values[j]`.

  Shapes and dtypes are checked on every call. Index ranges are checked when
  `indices` is concrete, raising at the call (this reads the indices back to
  the host). Under `jax.jit` they cannot be, so a step with an index outside
  `[0, num_examples)` is refused as a whole and counted in
  `num_refused_out_of_range`. A negative index is never taken to count from
  the end.

  `indices` and `values` may be sharded across devices, for instance along the
  data axis of a `jax.sharding.Mesh`. The result is that of the unsharded
  arrays up to float rounding: the partitioned sums run in another order, so
  a run is bitwise reproducible only under the same sharding.

  Args:
    state: The ledger so far.
    step: The step's number, an integer scalar. Numbers must increase over the
      run; gaps are allowed.
    indices: The dataset index of each example of the batch, integer, shape
      `(n,)`.
    values: The step's value of each example, floating, shape `(n,)`; cast to
      the ledger's dtype.

  Returns:
    The updated ledger.

  Raises:
    TypeError: If `state` is not a `LedgerState`, `step` or `indices` is not
      integer, or `values` is not floating.
    ValueError: If `step` is not a scalar, `indices` is not one-dimensional,
      `values` does not have the shape of `indices`, or, when concrete,
      `step` is negative or an index is out of range.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adam_inrun import ledger
    >>> state = ledger.init(3)
    >>> state = ledger.record(state, 1, jnp.array([0, 2]), jnp.array([1., -2.]))
    >>> state = ledger.record(state, 2, jnp.array([2, 1]), jnp.array([4., 0.]))
    >>> state.value_sum
    Array([1., 0., 2.], dtype=float32)
    >>> state.step_count
    Array([1, 1, 2], dtype=int32)
    >>> state = ledger.record(state, 2, jnp.array([0]), jnp.array([9.]))
    >>> int(state.num_refused_stale), float(state.value_sum[0])
    (1, 1.0)
  """
  if not isinstance(state, LedgerState):
    raise TypeError(
        f'state must be a LedgerState; got {type(state).__name__}.')
  num_examples = state.value_sum.shape[0]
  step, indices, values = map(_as_array, (step, indices, values))

  if jnp.shape(step) != ():
    raise ValueError(
        f'step must be a scalar; got an array of shape {jnp.shape(step)}.')
  step_dtype = jnp.result_type(step)
  if not jnp.issubdtype(step_dtype, jnp.integer):
    raise TypeError(f'step must be an integer; got dtype {step_dtype}.')
  if not isinstance(step, jax.core.Tracer) and int(step) < 0:
    raise ValueError(f'step must not be negative; got step={int(step)}.')

  index_dtype = jnp.result_type(indices)
  if not jnp.issubdtype(index_dtype, jnp.integer):
    raise TypeError(
        f'indices must be integer dataset indices; got dtype {index_dtype}.')
  if jnp.ndim(indices) != 1:
    raise ValueError(
        'indices must be one-dimensional, one index per example; got shape '
        f'{jnp.shape(indices)}.')
  value_dtype = jnp.result_type(values)
  if not jnp.issubdtype(value_dtype, jnp.floating):
    raise TypeError(f'values must be floating; got dtype {value_dtype}.')
  if jnp.shape(values) != jnp.shape(indices):
    raise ValueError(
        'values must have the shape of indices, one value per example; got '
        f'values of shape {jnp.shape(values)} and indices of shape '
        f'{jnp.shape(indices)}.')

  if not isinstance(indices, jax.core.Tracer):
    # Checked before any conversion to int32, which could wrap a large index
    # back into range.
    concrete = np.asarray(indices)
    bad = (concrete < 0) | (concrete >= num_examples)
    if bad.any():
      position = int(np.argmax(bad))
      raise ValueError(
          f'indices must lie in [0, {num_examples}) for a ledger of '
          f'{num_examples} examples; got indices[{position}]='
          f'{concrete[position]}.')

  return _record(state, step, indices, values)


@jax.jit
def _record(
    state: LedgerState,
    step: jax.Array,
    indices: jax.Array,
    values: jax.Array,
) -> LedgerState:
  """The traced part of `record`, after its arguments have been checked."""
  num_examples = state.value_sum.shape[0]
  step = jnp.asarray(step).astype(jnp.int32)
  values = jnp.asarray(values).astype(state.value_sum.dtype)

  fresh = step > state.last_step
  in_range = jnp.all((indices >= 0) & (indices < num_examples))
  finite = jnp.all(jnp.isfinite(values))
  accepted = fresh & in_range & finite

  scale = jnp.mean(jnp.abs(values))
  normalised = values / jnp.where(scale > 0, scale, 1)

  # A refused step sends every update past the end of the arrays, where
  # mode='drop' discards it: the totals stay bitwise what they were, and a
  # negative index can never wrap around to the last examples.
  targets = jnp.where(accepted, indices, num_examples)

  def add(total, update):
    return total.at[targets].add(update.astype(total.dtype), mode='drop')

  def count(condition):
    return condition.astype(jnp.int32)

  return LedgerState(
      value_sum=add(state.value_sum, values),
      step_count=add(state.step_count, jnp.ones_like(values, jnp.int32)),
      normalised_sum=add(state.normalised_sum, normalised),
      negative_count=add(state.negative_count, count(values < 0)),
      num_recorded=state.num_recorded + count(accepted),
      num_refused_nonfinite=(
          state.num_refused_nonfinite + count(fresh & in_range & ~finite)),
      num_refused_out_of_range=(
          state.num_refused_out_of_range + count(fresh & ~in_range)),
      num_refused_stale=state.num_refused_stale + count(~fresh),
      last_step=jnp.where(fresh, step, state.last_step),
  )


def save(state: LedgerState, path: str | os.PathLike[str]) -> None:
  """Writes the ledger to `path` as an .npz archive, atomically.

  The archive is written to a temporary file in the directory of `path`,
  flushed to disk, then renamed over `path`. A crash or error at any point
  leaves either the previous file or the new one at `path`, never a mix. The
  file is written at `path` exactly; no suffix is added.

  The arrays must be addressable from this process; in a multi-process run,
  save from one process after gathering the state to it.

  Args:
    state: The ledger to write.
    path: Where to write it.

  Raises:
    TypeError: If `state` is not a `LedgerState`.
    OSError: If the file cannot be written; `path` is then left as it was.

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from adam_inrun import ledger
    >>> state = ledger.init(2)
    >>> state = ledger.record(state, 1, jnp.array([1]), jnp.array([.5]))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ledger.npz')
    >>> ledger.save(state, path)
    >>> ledger.load(path).value_sum
    Array([0. , 0.5], dtype=float32)
  """
  if not isinstance(state, LedgerState):
    raise TypeError(
        f'state must be a LedgerState; got {type(state).__name__}.')
  arrays = {
      name: np.asarray(jax.device_get(array))
      for name, array in state._asdict().items()
  }
  arrays['format_version'] = np.asarray(_FORMAT_VERSION)
  _write_atomically(path, lambda file: np.savez(file, **arrays))


def load(path: str | os.PathLike[str]) -> LedgerState:
  """Reads a ledger written by `save`.

  Args:
    path: The file `save` wrote.

  Returns:
    The saved `LedgerState`, bitwise as it was saved.

  Raises:
    FileNotFoundError: If there is no file at `path`.
    ValueError: If the file is not a ledger archive (truncated, corrupt, or
      written by something else), or holds float64 totals while
      `jax_enable_x64` is off.

  Examples:
    >>> import os, tempfile
    >>> from adam_inrun import ledger
    >>> path = os.path.join(tempfile.mkdtemp(), 'ledger.npz')
    >>> ledger.save(ledger.init(3), path)
    >>> ledger.load(path).step_count
    Array([0, 0, 0], dtype=int32)
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No ledger file at {path=}.')

  unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile)
  try:
    archive = np.load(path, allow_pickle=False)
  except unreadable as error:
    raise ValueError(
        f'The ledger file at {path=} is not a readable .npz archive; it may '
        f'be truncated or corrupt: {error}') from error
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(
        f'The file at {path=} holds a single array, not a ledger archive '
        'written by adam_inrun.ledger.save.')
  try:
    with archive:
      arrays = {name: archive[name] for name in archive.files}
  except unreadable as error:
    raise ValueError(
        f'The ledger file at {path=} is corrupt; an entry could not be '
        f'read: {error}') from error

  _check_archive(arrays, path)
  return LedgerState(
      **{name: jnp.asarray(arrays[name]) for name in LedgerState._fields})


def to_dataframe(state: LedgerState) -> Any:
  """Returns one row per example of the dataset, as a pandas DataFrame.

  The columns are:

  * `index`: the example's dataset index.
  * `value`: the sum of its values, `state.value_sum`.
  * `steps`: how many times it was recorded, `state.step_count`.
  * `mean_value`: `value / steps`.
  * `normalised_value`: the scale-free sum, `state.normalised_sum`.
  * `negative_count`: how many of its values were negative.
  * `negative_fraction`: `negative_count / steps`.

  An example never recorded has `steps == 0` and NaN in the two ratio columns.
  Run-level counters are not in the table; read them from `state`.

  pandas is an optional dependency, imported only here and in `to_csv`.

  Args:
    state: The ledger to tabulate.

  Returns:
    A `pandas.DataFrame` with `num_examples` rows.

  Raises:
    ImportError: If pandas is not installed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adam_inrun import ledger
    >>> state = ledger.init(3)
    >>> state = ledger.record(state, 1, jnp.array([0, 1]), jnp.array([2., -1.]))
    >>> state = ledger.record(state, 2, jnp.array([0, 1]), jnp.array([4., 1.]))
    >>> ledger.to_dataframe(state)[['index', 'value', 'steps', 'mean_value']]
       index  value  steps  mean_value
    0      0    6.0      2         3.0
    1      1    0.0      2         0.0
    2      2    0.0      0         NaN
  """
  pandas = _import_pandas()
  value = np.asarray(jax.device_get(state.value_sum))
  steps = np.asarray(jax.device_get(state.step_count))
  negative = np.asarray(jax.device_get(state.negative_count))
  seen = steps > 0
  # Ratios are taken in float64; the divisor is clamped so that unseen
  # examples give NaN without a division by zero.
  divisor = np.maximum(steps, 1).astype(np.float64)
  return pandas.DataFrame({
      'index': np.arange(value.shape[0]),
      'value': value,
      'steps': steps,
      'mean_value': np.where(seen, value / divisor, np.nan),
      'normalised_value': np.asarray(jax.device_get(state.normalised_sum)),
      'negative_count': negative,
      'negative_fraction': np.where(seen, negative / divisor, np.nan),
  })


def to_csv(state: LedgerState, path: str | os.PathLike[str]) -> None:
  """Writes `to_dataframe(state)` to `path` as CSV, atomically.

  Floats are written with enough digits to read back exactly; the file is
  replaced as in `save`.

  Args:
    state: The ledger to write.
    path: Where to write the CSV file.

  Raises:
    ImportError: If pandas is not installed.
    OSError: If the file cannot be written; `path` is then left as it was.

  Examples:
    >>> import os, tempfile
    >>> from adam_inrun import ledger
    >>> path = os.path.join(tempfile.mkdtemp(), 'values.csv')
    >>> ledger.to_csv(ledger.init(2), path)
    >>> open(path).readline().split(',')[:4]
    ['index', 'value', 'steps', 'mean_value']
  """
  text = to_dataframe(state).to_csv(index=False)
  _write_atomically(path, lambda file: file.write(text.encode('utf-8')))


def _as_array(x: jax.typing.ArrayLike) -> jax.Array | np.ndarray:
  """Returns `x` if it is a JAX array or tracer, else `x` as a NumPy array."""
  return x if isinstance(x, jax.Array) else np.asarray(x)


def _check_archive(arrays: dict[str, np.ndarray], path: str) -> None:
  """Checks that `arrays`, read from `path`, make a `LedgerState`."""
  def invalid(reason):
    return ValueError(
        f'The file at {path=} is not a valid ledger archive: {reason}.')

  not_arrays = [
      name for name, array in arrays.items()
      if not isinstance(array, np.ndarray)
  ]
  if not_arrays:
    raise invalid(f'the entries {not_arrays} are not arrays')
  version = arrays.get('format_version')
  if version is None or version.shape != () or version != _FORMAT_VERSION:
    raise invalid(
        f'format_version is {version}, expected {_FORMAT_VERSION}')
  missing = [name for name in LedgerState._fields if name not in arrays]
  if missing:
    raise invalid(f'it lacks the entries {missing}')

  num_examples = arrays['value_sum'].shape[:1]
  for name in _PER_EXAMPLE_FLOAT + _PER_EXAMPLE_INT:
    if arrays[name].ndim != 1 or arrays[name].shape != num_examples:
      raise invalid(
          f'{name} has shape {arrays[name].shape}, expected one entry per '
          f'example, {num_examples}')
  for name in _COUNTERS:
    if arrays[name].shape != ():
      raise invalid(f'{name} has shape {arrays[name].shape}, expected ()')
  for name in _PER_EXAMPLE_INT + _COUNTERS:
    if arrays[name].dtype != np.int32:
      raise invalid(f'{name} has dtype {arrays[name].dtype}, expected int32')
  dtype = arrays['value_sum'].dtype
  if dtype not in (np.float32, np.float64):
    raise invalid(f'value_sum has dtype {dtype}, expected float32 or float64')
  if arrays['normalised_sum'].dtype != dtype:
    raise invalid(
        f'normalised_sum has dtype {arrays["normalised_sum"].dtype}, '
        f'value_sum has {dtype}')
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(
        f'The ledger at {path=} sums in {dtype}, which needs jax_enable_x64; '
        "call jax.config.update('jax_enable_x64', True) before loading it.")


def _write_atomically(
    path: str | os.PathLike[str],
    write: Callable[[Any], Any],
) -> None:
  """Calls `write` on a binary file that then replaces `path` in one step."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  descriptor, temporary = tempfile.mkstemp(
      dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(descriptor, 'wb') as file:
      write(file)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise

  # Makes the rename itself durable. Some platforms cannot open a directory;
  # the file is in place either way.
  with contextlib.suppress(OSError):
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(directory_descriptor)
    finally:
      os.close(directory_descriptor)


def _import_pandas() -> Any:
  """Imports pandas, which only the table exports need."""
  try:
    import pandas  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        'adam_inrun.ledger.to_dataframe and to_csv need pandas, an optional '
        'dependency; install it with `pip install pandas`.') from error
  return pandas
