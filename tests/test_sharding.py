"""The attributed step split over a mesh of eight host devices.

The multi-device checks run in one subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, so that this process
and the rest of the suite keep a single CPU device: the subprocess is this
file run as a script, which prints `PASS name` or `FAIL name: why` for each
check, and each test below asserts on its own line.

The reference is the same step run on one device in float64. A split step
sums gradients in a different order, so the two agree to rounding, not
bitwise. Comparisons start from a warmed-up optimizer state: at Adam's first
step the update's Jacobian is a near-cancellation (Adam's sign-like start) that
amplifies rounding, which is not what these tests are about.

Whether activations move between devices is read from the compiled HLO: a
collective whose shape has a dimension equal to a batch size, or to a
batch size divided by the devices splitting it, is taken to carry
activations or cotangents. The batch sizes are chosen to share no factor
with any parameter dimension, and a self-check shows the detector fires on
a step whose values are deliberately gathered.
"""

import functools
import os
import re
import socket
import subprocess
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_inrun as air
from adam_inrun import sharding

NUM_DEVICES = 8
# No quotient of a batch size by 1, 2, 4 or 8 devices, {72, 36, 18, 9} and
# {24, 12, 6, 3}, is a dimension of a parameter below or of its half (7, 16,
# 10, 5, 13, 8, 2, 32; 4, 1), so a collective of such a size is taken to
# carry examples. The validation batch is small, 3 examples per device, on
# purpose: with so few, XLA left alone splits the fully sharded validation
# passes along features instead of examples, which the helper prevents.
BATCH = 72
VAL_BATCH = 24
RTOL = 1e-9


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x))
    x = jnp.tanh(nn.Dense(10)(x))
    return nn.Dense(5)(x)


class _TinyLM(nn.Module):
  """One pre-norm attention block, a position table and tied logits."""

  vocab_size: int = 13
  width: int = 16

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab_size, self.width)
    # Read outside any layer, so the exact jvp fallback runs split too.
    position = self.param('position', nn.initializers.normal(0.1),
                          (8, self.width))
    x = embed(tokens) + position[:tokens.shape[1]]
    attention = nn.MultiHeadDotProductAttention(num_heads=2,
                                                deterministic=True)
    x = x + attention(nn.LayerNorm()(x), mask=nn.make_causal_mask(tokens))
    x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(x)))
    return embed.attend(nn.LayerNorm()(x))


def _cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _init(model: nn.Module, example: np.ndarray) -> Any:
  # Compiled, since eager Flax init runs op by op; float64 throughout,
  # since Flax creates float32 parameters whatever the input dtype.
  init = lambda x: jax.tree.map(lambda p: p.astype(jnp.float64),
                                model.init(jax.random.key(0), x))
  return jax.jit(init)(example)


def _mlp_problem():
  """An `_MLP`, a batch and a validation batch of Gaussian features."""
  model = _MLP()
  rng = np.random.default_rng(0)
  batch, val_batch = ({'x': rng.normal(size=(n, 7)),
                       'y': rng.integers(0, 5, size=n)}
                      for n in (BATCH, VAL_BATCH))

  def loss_fn(params, batch):
    return _cross_entropy(model.apply(params, batch['x']), batch['y'])

  return loss_fn, _init(model, batch['x'][:1]), batch, val_batch


def _lm_problem():
  """A `_TinyLM`, a batch and a validation batch of random sequences."""
  model = _TinyLM()
  rng = np.random.default_rng(1)
  batch, val_batch = ({'tokens': rng.integers(0, 13, size=(n, 8))}
                      for n in (BATCH, VAL_BATCH))

  def loss_fn(params, batch):
    tokens = batch['tokens']
    logits = model.apply(params, tokens[:, :-1])
    return jnp.mean(_cross_entropy(logits, tokens[:, 1:]), axis=1)

  return loss_fn, _init(model, batch['tokens'][:1, :-1]), batch, val_batch


_PROBLEMS = {'mlp': _mlp_problem, 'lm': _lm_problem}


# ---------------------------------------------------------------------------
# The checks, run in the eight-device subprocess.


def _warm_adam_state(opt_state: Any) -> Any:
  """Adam moments as after a few steps: count 3, random mu, positive nu."""
  rng = np.random.default_rng(2)
  mu = optax.tree.get(opt_state, 'mu')
  return optax.tree.set(
      opt_state, count=np.asarray(3, np.int32),
      mu=jax.tree.map(lambda m: 1e-2 * rng.normal(size=m.shape), mu),
      nu=jax.tree.map(lambda m: 1e-4 * (rng.normal(size=m.shape) ** 2 + 0.1),
                      mu))


@functools.cache
def _setup(name: str) -> '_Setup':
  return _Setup(name)


class _Setup:
  """A problem, a warm optimizer state and the single-device reference.

  Attributes:
    loss_fn: per-example losses.
    params: float64 parameters, on one device.
    batch: NumPy arrays, `BATCH` examples.
    val_batch: NumPy arrays, `VAL_BATCH` examples.
    tx: the optimizer, AdamW.
    opt_state: a warm AdamW state.
    step: the single-device attributed step, `path_shapley()`.
    reference: what `run` returns for `step` on one device.
  """

  def __init__(self, name: str):
    self.loss_fn, self.params, self.batch, self.val_batch = (
        _PROBLEMS[name]())
    self.tx = optax.adamw(3e-2)
    self.opt_state = _warm_adam_state(self.tx.init(self.params))
    self.step = air.make_train_step(self.loss_fn, self.tx, air.path_shapley())
    self.reference = self.run(self.step, self.params, self.opt_state,
                              self.batch, self.val_batch)

  def run(self, step, params, opt_state, batch, val_batch):
    """Two attributed steps: the second takes the first one's outputs."""
    params, opt_state, first = step(params, opt_state, batch, val_batch)
    params, opt_state, second = step(params, opt_state, batch, val_batch)
    return params, opt_state, (first, second)


def _relative_error(actual: Any, expected: Any) -> float:
  """Largest difference over a tree, relative to its largest entry.

  Relative to the whole tree, not leaf by leaf: a leaf whose gradient is
  zero in exact arithmetic (the key bias of attention, to which softmax is
  blind) holds only rounding, which no two summation orders share.
  """
  pairs = [(np.asarray(a), np.asarray(e)) for a, e in
           zip(jax.tree.leaves(actual), jax.tree.leaves(expected))
           if np.issubdtype(np.asarray(e).dtype, np.floating)]
  scale = max(float(np.max(np.abs(e))) for _, e in pairs)
  return max(float(np.max(np.abs(a - e))) for a, e in pairs) / scale


def _expect_equal(outputs, reference) -> None:
  for part, actual, expected in zip(('params', 'opt_state', 'values'),
                                    outputs, reference):
    error = _relative_error(actual, expected)
    assert error <= RTOL, f'{part} differ by {error:.2e} relative'


def _expect_split(values: jax.Array, spec: Any, devices: int) -> None:
  assert values.sharding.spec == spec, f'values sharded {values.sharding.spec}'
  shapes = {shard.data.shape for shard in values.addressable_shards}
  assert shapes == {(BATCH // devices,)}, f'value shards {shapes}'


def _activation_collectives(compiled_text: str,
                            allowed: tuple[str, ...]) -> list[str]:
  """Collectives of another kind than `allowed` or of a batch-sized shape."""
  sizes = {size // parts for size in (BATCH, VAL_BATCH)
           for parts in (1, 2, 4, 8)}
  found = []
  pattern = re.compile(r'= (.*?) ([a-z-]+)(?:-start)?\(')
  kinds = ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute',
           'reduce-scatter', 'collective-broadcast')
  for line in compiled_text.splitlines():
    match = pattern.search(line)
    if match is None or match.group(2) not in kinds:
      continue
    dims = {int(d) for shape in re.findall(r'\[([\d,]*)\]', match.group(1))
            for d in shape.split(',') if d}
    if match.group(2) not in allowed or dims & sizes:
      found.append(f'{match.group(2)} {match.group(1)[:80]}')
  return found


def _mesh(shape, names):
  return jax.make_mesh(shape, names,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _put(tree, placement):
  return jax.tree.map(lambda leaf: jax.device_put(leaf, placement), tree)


def _data_parallel_inputs(setup: _Setup, mesh):
  examples = sharding.batch_sharding(mesh, 'data')
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (_put(setup.params, replicated), _put(setup.opt_state, replicated),
          _put(setup.batch, examples), _put(setup.val_batch, examples))


def check_plain_step_matches_single_device(name: str) -> None:
  """`make_train_step` alone, fed arrays split along 'data'."""
  setup = _setup(name)
  mesh = _mesh((NUM_DEVICES,), ('data',))
  outputs = setup.run(setup.step, *_data_parallel_inputs(setup, mesh))
  _expect_equal(outputs, setup.reference)
  for values in outputs[2]:
    _expect_split(values, jax.sharding.PartitionSpec('data'), NUM_DEVICES)


def check_plain_step_moves_only_parameter_sums(name: str) -> None:
  """Its compiled program's only collectives are parameter-sized sums."""
  setup = _setup(name)
  mesh = _mesh((NUM_DEVICES,), ('data',))
  compiled = setup.step.lower(*_data_parallel_inputs(setup, mesh)).compile()
  found = _activation_collectives(compiled.as_text(), allowed=('all-reduce',))
  assert not found, f'activation-sized collectives: {found}'
  assert 'all-reduce' in compiled.as_text(), 'no all-reduce: is it split?'


def check_detector_flags_gathered_values() -> None:
  """The collective check fires when the values are gathered on purpose."""
  setup = _setup('mlp')
  mesh = _mesh((NUM_DEVICES,), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
      air.make_train_step(setup.loss_fn, setup.tx, jit=False),
      out_shardings=(None, None, replicated))
  text = step.lower(*_data_parallel_inputs(setup, mesh)).compile().as_text()
  found = _activation_collectives(text, allowed=('all-reduce',))
  assert found, 'gathering the values went unnoticed'


def check_helper_places_host_arrays(name: str) -> None:
  """`data_parallel_step` on NumPy batches, with diagnostics."""
  setup = _setup(name)
  mesh = _mesh((NUM_DEVICES,), ('data',))
  step = sharding.data_parallel_step(setup.loss_fn, setup.tx, mesh=mesh,
                                     with_diagnostics=True)
  params, opt_state, values, diagnostics = step(
      setup.params, setup.opt_state, setup.batch, setup.val_batch)
  reference_step = air.make_train_step(setup.loss_fn, setup.tx,
                                       with_diagnostics=True)
  expected = reference_step(setup.params, setup.opt_state, setup.batch,
                            setup.val_batch)
  _expect_equal((params, opt_state, values), expected[:3])
  assert _relative_error(diagnostics.total_utility,
                         expected[3].total_utility) <= RTOL
  _expect_split(values, jax.sharding.PartitionSpec('data'), NUM_DEVICES)
  # A plain step (every-k attribution) through the same sharded helper.
  plain = step(setup.params, setup.opt_state, setup.batch, setup.val_batch,
               attribute=False)
  assert plain[2] is None and plain[3] is None
  _expect_equal(plain[:2], expected[:2])


def _fsdp_spec(leaf, axis: str, size: int):
  """Splits the last axis divisible by `size` along `axis`, if any."""
  for dim in reversed(range(np.ndim(leaf))):
    if np.shape(leaf)[dim] % size == 0:
      spec = [None] * np.ndim(leaf)
      spec[dim] = axis
      return jax.sharding.PartitionSpec(*spec)
  return jax.sharding.PartitionSpec()


def check_fully_sharded_matches_and_keeps_layout(name: str) -> None:
  """Parameters split along 'model', examples along ('data', 'model')."""
  setup = _setup(name)
  mesh = _mesh((NUM_DEVICES // 2, 2), ('data', 'model'))
  layout = lambda leaf: jax.sharding.NamedSharding(
      mesh, _fsdp_spec(leaf, 'model', 2))
  params = jax.tree.map(lambda p: jax.device_put(p, layout(p)), setup.params)
  opt_state = jax.tree.map(lambda s: jax.device_put(s, layout(s)),
                           setup.opt_state)
  axes = ('data', 'model')
  batch = sharding.global_batch(setup.batch, mesh, axes)
  val_batch = sharding.global_batch(setup.val_batch, mesh, axes)
  step = sharding.data_parallel_step(setup.loss_fn, setup.tx, mesh=mesh,
                                     axis=axes)

  outputs = setup.run(step, params, opt_state, batch, val_batch)
  _expect_equal(outputs, setup.reference)
  for values in outputs[2]:
    _expect_split(values, jax.sharding.PartitionSpec(axes), NUM_DEVICES)
  for before, after in zip(jax.tree.leaves((params, opt_state)),
                           jax.tree.leaves(outputs[:2])):
    assert after.sharding.is_equivalent_to(before.sharding, before.ndim), (
        f'layout changed from {before.sharding.spec} to {after.sharding.spec}')
  assert any(l.sharding.spec != jax.sharding.PartitionSpec()
             for l in jax.tree.leaves(params)), 'nothing was split'

  text = step.lower(params, opt_state, batch, val_batch).compile().as_text()
  found = _activation_collectives(
      text, allowed=('all-reduce', 'all-gather', 'reduce-scatter'))
  assert not found, f'activation-sized collectives: {found}'


_CHECKS: dict[str, Callable[[], None]] = {
    'plain_step_matches_single_device[mlp]':
        lambda: check_plain_step_matches_single_device('mlp'),
    'plain_step_matches_single_device[lm]':
        lambda: check_plain_step_matches_single_device('lm'),
    'plain_step_moves_only_parameter_sums[mlp]':
        lambda: check_plain_step_moves_only_parameter_sums('mlp'),
    'plain_step_moves_only_parameter_sums[lm]':
        lambda: check_plain_step_moves_only_parameter_sums('lm'),
    'detector_flags_gathered_values': check_detector_flags_gathered_values,
    'helper_places_host_arrays[mlp]':
        lambda: check_helper_places_host_arrays('mlp'),
    'fully_sharded_matches_and_keeps_layout[mlp]':
        lambda: check_fully_sharded_matches_and_keeps_layout('mlp'),
    'fully_sharded_matches_and_keeps_layout[lm]':
        lambda: check_fully_sharded_matches_and_keeps_layout('lm'),
}


def _run_checks() -> None:
  jax.config.update('jax_enable_x64', True)
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  for name, check in _CHECKS.items():
    try:
      check()
    except Exception as error:  # pylint: disable=broad-except
      message = str(error).replace('\n', ' ')[:2000]
      print(f'FAIL {name}: {type(error).__name__}: {message}', flush=True)
    else:
      print(f'PASS {name}', flush=True)


def _local_rows(values: jax.Array) -> tuple[int, np.ndarray]:
  """This process's contiguous block of a split vector: (start, rows)."""
  shards = sorted(values.addressable_shards, key=lambda s: s.index[0].start)
  return shards[0].index[0].start, np.concatenate(
      [np.asarray(shard.data) for shard in shards])


def _run_process(process_id: int, port: int) -> None:
  """One of two processes of a two-host run on localhost.

  Each process feeds only its own half of the batches through
  `global_batch`, and checks its own examples' values and the replicated
  parameters against the single-device step it computes itself.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_enable_x64', True)
  jax.distributed.initialize(f'localhost:{port}', num_processes=2,
                             process_id=process_id)
  name = 'two_processes_match_single_device'
  try:
    setup = _setup('mlp')
    mesh = _mesh((jax.device_count(),), ('data',))
    own = lambda tree, size: jax.tree.map(
        lambda x: x[process_id * size:(process_id + 1) * size], tree)
    batch = sharding.global_batch(own(setup.batch, BATCH // 2), mesh)
    val_batch = sharding.global_batch(own(setup.val_batch, VAL_BATCH // 2),
                                      mesh)
    step = sharding.data_parallel_step(setup.loss_fn, setup.tx, mesh=mesh)
    params, opt_state, values = setup.run(step, setup.params, setup.opt_state,
                                          batch, val_batch)

    reference_params, reference_state, reference_values = setup.reference
    for split, expected in zip(values, reference_values):
      start, rows = _local_rows(split)
      assert (start, rows.shape) == (process_id * BATCH // 2, (BATCH // 2,))
      error = _relative_error(rows, expected[start:start + rows.shape[0]])
      assert error <= RTOL, f'values differ by {error:.2e} relative'
    _expect_equal((params, opt_state),
                  (reference_params, reference_state))
  except Exception as error:  # pylint: disable=broad-except
    message = str(error).replace('\n', ' ')[:2000]
    print(f'FAIL {name}: {type(error).__name__}: {message}', flush=True)
  else:
    print(f'PASS {name}', flush=True)


# ---------------------------------------------------------------------------
# The tests.


def _environment(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(filter(None, (
      env.get('XLA_FLAGS'),
      f'--xla_force_host_platform_device_count={devices}',
      # Cheaper CPU code generation: compiling is most of this test's time,
      # and partitioning and collectives are decided before code generation.
      '--xla_cpu_use_fusion_emitters=false',
      '--xla_backend_optimization_level=0',
      '--xla_llvm_disable_expensive_passes=true')))
  env['JAX_PLATFORMS'] = 'cpu'
  return env


@pytest.fixture(scope='module')
def check_report() -> dict[str, str]:
  """Runs every check in one eight-device subprocess; maps name to line."""
  result = subprocess.run([sys.executable, __file__],
                          env=_environment(NUM_DEVICES), capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  report = {}
  for line in result.stdout.splitlines():
    status, _, rest = line.partition(' ')
    name = rest.split(':', 1)[0]
    if status in ('PASS', 'FAIL'):
      report[name] = line
  return report


@pytest.mark.parametrize('name', sorted(_CHECKS))
def test_on_eight_devices(check_report, name):
  assert name in check_report, f'check {name} did not report'
  assert check_report[name] == f'PASS {name}', check_report[name]


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def test_two_processes_match_single_device():
  """`jax.distributed` on localhost: two processes of four devices each."""
  port = str(_free_port())
  env = _environment(NUM_DEVICES // 2)
  processes = [
      subprocess.Popen([sys.executable, __file__, 'process', str(i), port],
                       env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  try:
    outputs = [process.communicate(timeout=300) for process in processes]
  finally:
    for process in processes:
      process.kill()
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-4000:]
    assert 'PASS two_processes_match_single_device' in stdout, (
        stdout[-2000:] + stderr[-2000:])


def test_batch_sharding_splits_the_leading_axis():
  mesh = jax.make_mesh((1, 1), ('data', 'model'))
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(
      'data')
  both = sharding.batch_sharding(mesh, ('data', 'model'))
  assert both.spec == jax.sharding.PartitionSpec(('data', 'model'))


@pytest.mark.parametrize('axis', ['batch', ('data', 'data'), ()])
def test_batch_sharding_rejects_bad_axis(axis):
  mesh = jax.make_mesh((1,), ('data',))
  with pytest.raises(ValueError, match='axis must name'):
    sharding.batch_sharding(mesh, axis)


def test_data_parallel_step_rejects_non_mesh():
  with pytest.raises(TypeError, match='jax.sharding.Mesh'):
    sharding.data_parallel_step(lambda p, b: b, optax.sgd(0.1),
                                mesh=jax.devices())


if __name__ == '__main__':
  if sys.argv[1:2] == ['process']:
    _run_process(int(sys.argv[2]), int(sys.argv[3]))
  else:
    _run_checks()
