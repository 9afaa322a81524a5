"""Tests for adam_inrun.ledger against a plain NumPy loop over the steps."""

import io
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adam_inrun import ledger


_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Most tests share these sizes, so that the ledger's step is compiled for few
# shapes: random runs use batches of 12 over 23 examples, hand-written steps
# batches of 4 over 4 examples.
_NUM_EXAMPLES = 23
_BATCH_SIZE = 12


def _reference(num_examples, steps):
  """The ledger's fields, computed step by step in float64 with NumPy.

  `steps` is a list of `(step, indices, values)`. Written from the rules in
  the module docstring, independently of the JAX implementation.
  """
  ref = {
      'value_sum': np.zeros(num_examples),
      'step_count': np.zeros(num_examples, np.int64),
      'normalised_sum': np.zeros(num_examples),
      'negative_count': np.zeros(num_examples, np.int64),
      'num_recorded': 0,
      'num_refused_nonfinite': 0,
      'num_refused_out_of_range': 0,
      'num_refused_stale': 0,
      'last_step': -1,
  }
  for step, indices, values in steps:
    values = np.asarray(values, np.float64)
    if step <= ref['last_step']:
      ref['num_refused_stale'] += 1
      continue
    ref['last_step'] = step
    if any(i < 0 or i >= num_examples for i in indices):
      ref['num_refused_out_of_range'] += 1
      continue
    if not np.all(np.isfinite(values)):
      ref['num_refused_nonfinite'] += 1
      continue
    ref['num_recorded'] += 1
    scale = np.mean(np.abs(values))
    for i, value in zip(indices, values):
      ref['value_sum'][i] += value
      ref['step_count'][i] += 1
      ref['normalised_sum'][i] += value / scale if scale > 0 else value
      ref['negative_count'][i] += value < 0
  return ref


def _assert_matches_reference(state, ref):
  for name in ('value_sum', 'normalised_sum'):
    np.testing.assert_allclose(
        np.asarray(getattr(state, name)), ref[name], rtol=2e-5, atol=1e-6,
        err_msg=name)
  for name in ('step_count', 'negative_count'):
    np.testing.assert_array_equal(
        np.asarray(getattr(state, name)), ref[name], err_msg=name)
  for name in ('num_recorded', 'num_refused_nonfinite',
               'num_refused_out_of_range', 'num_refused_stale', 'last_step'):
    assert int(getattr(state, name)) == ref[name], name


def _assert_bitwise_equal(state, expected, skip=()):
  for name in ledger.LedgerState._fields:
    if name in skip:
      continue
    actual_array = np.asarray(getattr(state, name))
    expected_array = np.asarray(getattr(expected, name))
    assert actual_array.dtype == expected_array.dtype, name
    assert actual_array.tobytes() == expected_array.tobytes(), name


def _random_steps(rng, num_examples, num_steps, batch_size):
  """Batches sampled with replacement, each at its own loss scale."""
  steps = []
  for step in range(1, num_steps + 1):
    indices = rng.integers(0, num_examples, batch_size).astype(np.int32)
    scale = 10.0 ** rng.uniform(-4, 3)
    values = (scale * rng.standard_normal(batch_size)).astype(np.float32)
    steps.append((step, indices, values))
  return steps


def _epoch_steps(rng, num_examples, num_epochs, batch_size):
  """Batches that cover a fresh permutation of the dataset every epoch."""
  steps = []
  for _ in range(num_epochs):
    order = rng.permutation(num_examples).astype(np.int32)
    for indices in np.split(order, num_examples // batch_size):
      scale = 10.0 ** rng.uniform(-3, 3)
      values = (scale * rng.standard_normal(batch_size)).astype(np.float32)
      steps.append((len(steps) + 1, indices, values))
  return steps


def _run(state, steps, record=ledger.record):
  for step, indices, values in steps:
    state = record(state, step, indices, values)
  return state


def test_init_is_empty():
  state = ledger.init(4)

  np.testing.assert_array_equal(state.value_sum, np.zeros(4, np.float32))
  assert state.value_sum.dtype == jnp.float32
  assert state.step_count.dtype == jnp.int32
  assert int(state.last_step) == -1
  _assert_matches_reference(state, _reference(4, []))


def test_record_matches_numpy_loop_over_epochs_with_repeated_indices():
  rng = np.random.default_rng(0)
  # Several epochs' worth of batches drawn with replacement: indices repeat
  # across steps and within a step.
  steps = _random_steps(rng, _NUM_EXAMPLES, 18, _BATCH_SIZE)
  steps[4] = (5, steps[4][1], np.zeros(_BATCH_SIZE, np.float32))
  steps[7][2][:3] = 0.0
  assert any(len(set(indices)) < len(indices) for _, indices, _ in steps)

  state = _run(ledger.init(_NUM_EXAMPLES), steps)

  ref = _reference(_NUM_EXAMPLES, steps)
  _assert_matches_reference(state, ref)
  assert ref['negative_count'].sum() > 0
  assert ref['step_count'].max() > 3


def test_normalised_sum_weighs_every_step_the_same():
  # The same values at loss scales 1e-4 and 1e4 add the same normalised sum.
  indices = np.array([0, 1, 2, 1], np.int32)
  values = np.array([1.0, -3.0, 0.5, 2.0], np.float32)
  state = ledger.init(4)

  state = ledger.record(state, 1, indices, 1e-4 * values)
  state = ledger.record(state, 2, indices, 1e4 * values)

  per_step = np.zeros(4)
  np.add.at(per_step, indices, values / np.mean(np.abs(values)))
  np.testing.assert_allclose(state.normalised_sum, 2 * per_step, rtol=1e-6)


def test_record_under_jit_matches_eager_bitwise():
  rng = np.random.default_rng(1)
  steps = _random_steps(rng, _NUM_EXAMPLES, 6, _BATCH_SIZE)
  steps[3][2][0] = np.nan

  eager = _run(ledger.init(_NUM_EXAMPLES), steps)
  jitted = _run(ledger.init(_NUM_EXAMPLES), steps,
                record=jax.jit(ledger.record))

  _assert_bitwise_equal(jitted, eager)


def test_record_inside_scan_matches_numpy_loop():
  rng = np.random.default_rng(2)
  steps = _random_steps(rng, _NUM_EXAMPLES, 5, _BATCH_SIZE)
  steps[2][2][1] = np.inf
  numbers = jnp.array([step for step, _, _ in steps])
  indices = jnp.stack([indices for _, indices, _ in steps])
  values = jnp.stack([values for _, _, values in steps])

  def body(state, step_inputs):
    return ledger.record(state, *step_inputs), None

  state, _ = jax.lax.scan(
      body, ledger.init(_NUM_EXAMPLES), (numbers, indices, values))

  _assert_matches_reference(state, _reference(_NUM_EXAMPLES, steps))


@pytest.mark.parametrize('bad_value', [np.nan, np.inf, -np.inf])
def test_nonfinite_step_is_refused_and_counted(bad_value):
  indices = np.array([0, 1, 2, 3], np.int32)
  before = ledger.record(ledger.init(4), 1, indices,
                         np.array([0.5, 1.5, -2.5, 0.25], np.float32))

  after = ledger.record(before, 2, indices,
                        np.array([1.0, -2.0, bad_value, 4.0], np.float32))

  _assert_bitwise_equal(
      after, before, skip=('num_refused_nonfinite', 'last_step'))
  assert int(after.num_refused_nonfinite) == 1
  assert int(after.last_step) == 2
  # The next finite step is recorded as usual.
  later = ledger.record(after, 3, indices,
                        np.array([3.0, 3.0, 3.0, -3.0], np.float32))
  np.testing.assert_array_equal(later.value_sum, [3.5, 4.5, 0.5, -2.75])
  assert int(later.num_recorded) == 2


@pytest.mark.parametrize('step', [3, 2, 0])
def test_stale_step_is_refused_and_counted(step):
  indices = np.array([0, 1, 3, 1], np.int32)
  before = ledger.record(ledger.init(4), 3, indices,
                         np.array([1.0, -1.0, 2.0, 0.5], np.float32))

  after = ledger.record(before, step, indices,
                        np.array([5.0, 5.0, 5.0, 5.0], np.float32))

  _assert_bitwise_equal(after, before, skip=('num_refused_stale',))
  assert int(after.num_refused_stale) == 1
  assert int(after.last_step) == 3


@pytest.mark.parametrize('bad_index', [4, 1000, -1])
def test_out_of_range_index_under_jit_refuses_whole_step(bad_index):
  record = jax.jit(ledger.record)
  before = record(ledger.init(4), 1, jnp.array([0, 3, 1, 2], jnp.int32),
                  jnp.array([1.0, 2.0, -0.5, 0.0]))

  after = record(before, 2, jnp.array([1, bad_index, 2, 0], jnp.int32),
                 jnp.array([1.0, 1.0, 1.0, 1.0]))

  # Nothing is added, not even to valid indices, and -1 does not wrap around
  # to the last example.
  _assert_bitwise_equal(
      after, before, skip=('num_refused_out_of_range', 'last_step'))
  assert int(after.num_refused_out_of_range) == 1
  assert int(after.last_step) == 2


@pytest.mark.parametrize(
    'step, indices, values, error, match',
    [
        (1, np.array([0, 1]), np.array([1.0]), ValueError, 'shape of indices'),
        (1, np.array([[0, 1]]), np.array([[1.0, 2.0]]), ValueError,
         'one-dimensional'),
        (1, np.array([0.0, 1.0]), np.array([1.0, 2.0]), TypeError,
         'indices must be integer'),
        (1, np.array([0, 1]), np.array([1, 2]), TypeError,
         'values must be floating'),
        (1, np.array([0, 4]), np.array([1.0, 2.0]), ValueError,
         r'indices\[1\]=4'),
        (1, np.array([-1, 0]), np.array([1.0, 2.0]), ValueError,
         r'indices\[0\]=-1'),
        (1, np.array([0, 2**40]), np.array([1.0, 2.0]), ValueError,
         r'indices\[1\]=1099511627776'),
        (1.0, np.array([0]), np.array([1.0]), TypeError, 'step must be an'),
        (np.array([1, 2]), np.array([0]), np.array([1.0]), ValueError,
         'step must be a scalar'),
        (-1, np.array([0]), np.array([1.0]), ValueError, 'step=-1'),
    ],
)
def test_record_rejects_bad_arguments(step, indices, values, error, match):
  with pytest.raises(error, match=match):
    ledger.record(ledger.init(4), step, indices, values)


def test_record_accepts_lists_and_numpy_scalars_like_arrays():
  from_arrays = ledger.record(ledger.init(4), 3, jnp.array([3, 0, 3, 2]),
                              jnp.array([0.5, -1.0, 2.0, 0.0]))

  from_lists = ledger.record(ledger.init(4), np.int64(3), [3, 0, 3, 2],
                             [0.5, -1.0, 2.0, 0.0])

  _assert_bitwise_equal(from_lists, from_arrays)
  np.testing.assert_array_equal(from_lists.value_sum, [-1.0, 0.0, 0.0, 2.5])


def test_record_checks_shapes_under_jit_too():
  with pytest.raises(ValueError, match='shape of indices'):
    jax.jit(ledger.record)(ledger.init(4), 1, jnp.array([0, 1]),
                           jnp.array([1.0]))


def test_record_rejects_a_state_that_is_not_a_ledger():
  with pytest.raises(TypeError, match='LedgerState'):
    ledger.record({'value_sum': jnp.zeros(3)}, 1, np.array([0]),
                  np.array([1.0]))


@pytest.mark.parametrize(
    'num_examples, dtype, error, match',
    [
        (0, jnp.float32, ValueError, 'num_examples=0'),
        (2.5, jnp.float32, TypeError, 'num_examples=2.5'),
        (3, jnp.int32, TypeError, 'dtype=int32'),
        (3, jnp.float16, TypeError, 'dtype=float16'),
        (3, jnp.float64, ValueError, 'jax_enable_x64'),
    ],
)
def test_init_rejects_bad_arguments(num_examples, dtype, error, match):
  with pytest.raises(error, match=match):
    ledger.init(num_examples, dtype)


def test_resume_from_last_save_matches_uninterrupted_run_bitwise(tmp_path):
  rng = np.random.default_rng(4)
  # 3 epochs of 10 steps over 40 examples, steps numbered 1 to 30.
  steps = _epoch_steps(rng, num_examples=40, num_epochs=3, batch_size=4)
  steps[11][2][2] = np.nan  # Step 12: refused, before the crash.
  steps[21][2][0] = np.inf  # Step 22: refused, after the resume.
  save_every, crash_after, epoch_length = 7, 17, 10

  def train(state, steps, path):
    for step, indices, values in steps:
      state = ledger.record(state, step, indices, values)
      if step % save_every == 0:
        ledger.save(state, path)
    return state

  uninterrupted = train(ledger.init(40), steps, tmp_path / 'whole.npz')

  # The crashed run's state after step 17 is lost; its last save is step 14.
  train(ledger.init(40), steps[:crash_after], tmp_path / 'resumed.npz')
  saved = ledger.load(tmp_path / 'resumed.npz')
  assert int(saved.last_step) == 14
  # The data loader restarts at the epoch holding step 15, so steps 11 to 14
  # are fed again and must be refused.
  replay_from = (14 // epoch_length) * epoch_length
  resumed = train(saved, steps[replay_from:], tmp_path / 'resumed.npz')

  _assert_bitwise_equal(resumed, uninterrupted, skip=('num_refused_stale',))
  assert int(resumed.num_refused_stale) == 4
  assert int(uninterrupted.num_refused_stale) == 0
  _assert_bitwise_equal(ledger.load(tmp_path / 'resumed.npz'),
                        ledger.load(tmp_path / 'whole.npz'),
                        skip=('num_refused_stale',))
  _assert_matches_reference(uninterrupted, _reference(40, steps))
  assert int(uninterrupted.num_refused_nonfinite) == 2


def test_save_load_round_trips_bitwise(tmp_path):
  rng = np.random.default_rng(5)
  steps = _random_steps(rng, _NUM_EXAMPLES, 4, _BATCH_SIZE)
  steps[1][2][0] = np.nan
  state = _run(ledger.init(_NUM_EXAMPLES), steps)
  path = tmp_path / 'ledger.npz'

  ledger.save(state, path)
  loaded = ledger.load(str(path))

  assert isinstance(loaded, ledger.LedgerState)
  _assert_bitwise_equal(loaded, state)
  assert sorted(os.listdir(tmp_path)) == ['ledger.npz']


def _fail_while_writing(file, **arrays):
  del arrays
  file.write(b'PK\x03\x04 half an archive')
  raise OSError('disk full')


def _fail_to_sync(descriptor):
  del descriptor
  raise OSError('input/output error')


def _interrupt_before_rename(source, destination):
  del source, destination
  raise KeyboardInterrupt


@pytest.mark.parametrize(
    'module, name, replacement',
    [
        (np, 'savez', _fail_while_writing),
        (os, 'fsync', _fail_to_sync),
        (os, 'replace', _interrupt_before_rename),
    ],
    ids=['write', 'fsync', 'rename'],
)
def test_failed_save_leaves_previous_file_intact(
    tmp_path, monkeypatch, module, name, replacement):
  path = tmp_path / 'ledger.npz'
  indices = np.array([0, 2, 2, 3], np.int32)
  previous = ledger.record(ledger.init(4), 1, indices,
                           np.array([1.5, -0.25, 1.0, 2.0], np.float32))
  ledger.save(previous, path)
  newer = ledger.record(previous, 2, indices,
                        np.array([7.0, 1.0, 1.0, 1.0], np.float32))
  monkeypatch.setattr(module, name, replacement)

  with pytest.raises((OSError, KeyboardInterrupt)):
    ledger.save(newer, path)

  monkeypatch.undo()
  _assert_bitwise_equal(ledger.load(path), previous)
  assert sorted(os.listdir(tmp_path)) == ['ledger.npz']


def test_load_missing_file_raises_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.npz'):
    ledger.load(tmp_path / 'absent.npz')


def _garbage(data):
  del data
  return b'this is not a ledger'


def _truncated(data):
  return data[:len(data) // 2]


def _flipped_byte_in_an_entry(data):
  # Flips the last byte of the value_sum entry, inside its float data, which
  # leaves a well-formed archive whose entry fails its CRC check.
  with zipfile.ZipFile(_as_file(data)) as archive:
    info = archive.getinfo('value_sum.npy')
  local_header = data[info.header_offset:info.header_offset + 30]
  name_length, extra_length = struct.unpack('<HH', local_header[26:30])
  position = (info.header_offset + 30 + name_length + extra_length
              + info.compress_size - 1)
  corrupt = bytearray(data)
  corrupt[position] ^= 0xFF
  return bytes(corrupt)


def _as_file(data):
  return io.BytesIO(data)


def _not_an_array(data):
  del data
  buffer = _as_file(b'')
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('notes.txt', 'not an array')
  return buffer.getvalue()


def _single_array(data):
  del data
  buffer = _as_file(b'')
  np.save(buffer, np.zeros(3))
  return buffer.getvalue()


def _without_an_entry(data):
  with np.load(_as_file(data)) as archive:
    arrays = {name: archive[name] for name in archive.files}
  del arrays['negative_count']
  buffer = _as_file(b'')
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _with_mismatched_lengths(data):
  with np.load(_as_file(data)) as archive:
    arrays = {name: archive[name] for name in archive.files}
  arrays['step_count'] = arrays['step_count'][:-1]
  buffer = _as_file(b'')
  np.savez(buffer, **arrays)
  return buffer.getvalue()


@pytest.mark.parametrize(
    'corrupt, match',
    [
        (_garbage, 'not a readable .npz'),
        (_truncated, 'not a readable .npz'),
        (_flipped_byte_in_an_entry, 'corrupt'),
        (_single_array, 'single array'),
        (_not_an_array, 'notes.txt'),
        (_without_an_entry, 'negative_count'),
        (_with_mismatched_lengths, 'step_count has shape'),
    ],
)
def test_load_corrupt_file_raises_value_error_naming_it(
    tmp_path, corrupt, match):
  path = tmp_path / 'ledger.npz'
  state = ledger.record(
      ledger.init(_NUM_EXAMPLES), 1, np.arange(_BATCH_SIZE, dtype=np.int32),
      np.linspace(-1, 1, _BATCH_SIZE, dtype=np.float32))
  ledger.save(state, path)
  path.write_bytes(corrupt(path.read_bytes()))

  with pytest.raises(ValueError, match=match) as raised:
    ledger.load(path)
  assert str(path) in str(raised.value)


def _expected_table(ref, num_examples):
  steps = ref['step_count']
  with np.errstate(divide='ignore', invalid='ignore'):
    return {
        'index': np.arange(num_examples),
        'value': ref['value_sum'],
        'steps': steps,
        'mean_value': np.where(steps > 0, ref['value_sum'] / steps, np.nan),
        'normalised_value': ref['normalised_sum'],
        'negative_count': ref['negative_count'],
        'negative_fraction': np.where(
            steps > 0, ref['negative_count'] / steps, np.nan),
    }


def _assert_table_matches(frame, expected):
  assert list(frame.columns) == list(expected)
  assert len(frame) == len(expected['index'])
  for name, column in expected.items():
    if name in ('index', 'steps', 'negative_count'):
      np.testing.assert_array_equal(frame[name].to_numpy(), column, name)
    else:
      np.testing.assert_allclose(frame[name].to_numpy(), column, rtol=2e-5,
                                 atol=1e-6, err_msg=name)


def _table_steps():
  rng = np.random.default_rng(6)
  # Few batches drawn with replacement: some examples are never seen.
  steps = _random_steps(rng, _NUM_EXAMPLES, 4, _BATCH_SIZE)
  steps[2][2][0] = np.nan
  return steps


def test_to_dataframe_matches_numpy_loop():
  steps = _table_steps()
  ref = _reference(_NUM_EXAMPLES, steps)
  assert (ref['step_count'] == 0).any()

  frame = ledger.to_dataframe(_run(ledger.init(_NUM_EXAMPLES), steps))

  _assert_table_matches(frame, _expected_table(ref, _NUM_EXAMPLES))


def test_to_csv_reads_back_as_the_table(tmp_path):
  pandas = pytest.importorskip('pandas')
  steps = _table_steps()
  state = _run(ledger.init(_NUM_EXAMPLES), steps)
  path = tmp_path / 'values.csv'

  ledger.to_csv(state, path)

  read_back = pandas.read_csv(path)
  _assert_table_matches(
      read_back, _expected_table(_reference(_NUM_EXAMPLES, steps),
                                 _NUM_EXAMPLES))
  # Floats are written with enough digits to come back exactly.
  np.testing.assert_array_equal(
      read_back['value'].to_numpy(np.float32), np.asarray(state.value_sum))
  assert sorted(os.listdir(tmp_path)) == ['values.csv']


def test_to_dataframe_without_pandas_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pandas', None)

  with pytest.raises(ImportError, match='pip install pandas'):
    ledger.to_dataframe(ledger.init(2))


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from adam_inrun import ledger

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharding = NamedSharding(mesh, PartitionSpec('data'))
    data = np.load(sys.argv[1])
    record = jax.jit(ledger.record)

    # The ledger is replicated over the mesh, as a training loop would hold
    # it; placing it up front also saves a second compilation.
    replicated = NamedSharding(mesh, PartitionSpec())
    device = jax.devices()[0]
    sharded_jit = jax.device_put(ledger.init(50), replicated)
    sharded_eager = jax.device_put(ledger.init(50), replicated)
    single_device = jax.device_put(ledger.init(50), device)
    for step in range(len(data['steps'])):
      number = int(data['steps'][step])
      indices = jax.device_put(data['indices'][step], sharding)
      values = jax.device_put(data['values'][step], sharding)
      assert len(values.sharding.device_set) == 8
      assert not values.sharding.is_fully_replicated
      sharded_jit = record(sharded_jit, number, indices, values)
      if data['indices'][step].max() < 50:
        sharded_eager = ledger.record(sharded_eager, number, indices, values)
      single_device = record(
          single_device, number,
          jax.device_put(data['indices'][step], device),
          jax.device_put(data['values'][step], device))

    ledger.save(sharded_jit, sys.argv[2] + '/sharded_jit.npz')
    ledger.save(sharded_eager, sys.argv[2] + '/sharded_eager.npz')
    ledger.save(single_device, sys.argv[2] + '/single_device.npz')
""")


def test_sharded_values_on_8_host_devices_match_single_device(tmp_path):
  rng = np.random.default_rng(7)
  steps = _random_steps(rng, 50, num_steps=6, batch_size=64)
  steps[2][2][5] = np.nan
  steps[4][1][9] = 50  # Out of range: refused under jit, skipped eagerly.
  np.savez(tmp_path / 'steps.npz',
           steps=np.array([step for step, _, _ in steps]),
           indices=np.stack([indices for _, indices, _ in steps]),
           values=np.stack([values for _, _, values in steps]))
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')

  subprocess.run(
      [sys.executable, '-c', _SHARDED_SCRIPT, str(tmp_path / 'steps.npz'),
       str(tmp_path)],
      cwd=_REPO_ROOT, env=env, check=True, timeout=120)

  single_device = ledger.load(tmp_path / 'single_device.npz')
  sharded_jit = ledger.load(tmp_path / 'sharded_jit.npz')
  sharded_eager = ledger.load(tmp_path / 'sharded_eager.npz')
  ref = _reference(50, steps)
  _assert_matches_reference(single_device, ref)
  _assert_matches_reference(sharded_jit, ref)
  assert int(sharded_jit.num_refused_out_of_range) == 1
  for sharded in (sharded_jit, sharded_eager):
    for name in ('value_sum', 'normalised_sum'):
      np.testing.assert_allclose(
          getattr(sharded, name), getattr(single_device, name), rtol=1e-6,
          atol=1e-7, err_msg=name)
    for name in ('step_count', 'negative_count', 'num_recorded'):
      np.testing.assert_array_equal(
          getattr(sharded, name), getattr(single_device, name), name)
