"""The attributed step on 1, 2, 4 and 8 host devices, same global batch.

Each device count runs in its own subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=D`: the batch and the
validation batch are split along a 'data' mesh axis, parameters and
optimizer state are replicated, and both the attributed step
(`adam_inrun.sharding.data_parallel_step`, `path_shapley(1)`) and a plain
`optax.adamw` step jit-compiled with the same layout are timed, interleaved,
after two warm-up calls. Compile time is excluded from the step times and
reported on its own. Columns:

- `plain ms`, `attributed ms`: median wall time of one step;
- `ratio`: plain / attributed, the attributed step's throughput relative to
  plain training on the same devices;
- `vs 1 device`: attributed time over its time on one device;
- `compile s`: compiling the attributed step.

Host devices are not cores: XLA's CPU devices all share the machine's cores,
so on a machine with fewer cores than devices the table shows the overhead
of splitting the step (collectives, smaller per-device matmuls), not a
speed-up. Real accelerators give each device its own compute.

Run: python benchmarks/scaling.py [--repeats 10] [--models mlp,lm]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_inrun as air
from adam_inrun import sharding

from _models import LM, MLP

DEVICE_COUNTS = (1, 2, 4, 8)


def classification(n, n_val):
  model = MLP(widths=(512, 512))

  def loss_fn(params, batch):
    log_probs = jax.nn.log_softmax(model.apply(params, batch['x']))
    return -jnp.take_along_axis(log_probs, batch['y'][:, None], 1)[:, 0]

  rng = np.random.default_rng(0)
  make = lambda m: {'x': rng.normal(size=(m, 784)).astype(np.float32),
                    'y': rng.integers(0, 10, size=m)}
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 784)))
  return loss_fn, params, make(n), make(n_val)


def language_model(n, n_val, length=64):
  model = LM(width=128)

  def loss_fn(params, batch):
    tokens = batch['tokens']
    log_probs = jax.nn.log_softmax(model.apply(params, tokens[:, :-1]))
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], 2)[..., 0]
    return nll.mean(axis=1)

  rng = np.random.default_rng(0)
  make = lambda m: {'tokens': rng.integers(0, 256, size=(m, length + 1))}
  params = jax.jit(model.init)(jax.random.key(0),
                               np.zeros((1, length), np.int32))
  return loss_fn, params, make(n), make(n_val)


# name: (title, build, global batch, global validation batch)
MODELS = {
    'mlp': ('MLP 784-512-512-10', classification, 256, 64),
    'lm': ('LM d=128, 2 layers, 64 tokens', language_model, 32, 16),
}


def plain_step_fn(loss_fn, tx, examples):
  def step(params, opt_state, batch, val_batch):
    del val_batch
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, in_shardings=(None, None, examples, examples))


def measure(name, repeats):
  """Times one model on this process's devices; returns a dict of results."""
  _, build, n, n_val = MODELS[name]
  loss_fn, params, batch, val_batch = build(n, n_val)
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx = optax.adamw(1e-3)
  params = jax.device_put(params, replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  batch = sharding.global_batch(batch, mesh)
  val_batch = sharding.global_batch(val_batch, mesh)
  args = (params, opt_state, batch, val_batch)

  attributed = sharding.data_parallel_step(loss_fn, tx, air.path_shapley(),
                                           mesh=mesh)
  start = time.perf_counter()
  attributed = attributed.lower(*args).compile()
  compile_s = time.perf_counter() - start
  plain = plain_step_fn(loss_fn, tx, sharding.batch_sharding(mesh))
  plain = plain.lower(*args).compile()

  steps = {'plain': plain, 'attributed': attributed}
  for step in steps.values():
    for _ in range(2):
      jax.block_until_ready(step(*args))
  times = {k: [] for k in steps}
  for _ in range(repeats):
    for k, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[k].append(time.perf_counter() - start)
  return {
      'plain_ms': statistics.median(times['plain']) * 1e3,
      'attributed_ms': statistics.median(times['attributed']) * 1e3,
      'compile_s': compile_s,
  }


def worker(models, repeats):
  for name in models:
    result = measure(name, repeats)
    print('RESULT ' + json.dumps({'model': name, **result}), flush=True)


def run_device_count(devices, models, repeats):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(filter(None, (
      env.get('XLA_FLAGS'),
      f'--xla_force_host_platform_device_count={devices}')))
  env['JAX_PLATFORMS'] = 'cpu'
  command = [sys.executable, __file__, '--worker', '--repeats', str(repeats),
             '--models', ','.join(models)]
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise RuntimeError(f'{devices} devices failed:\n{result.stderr[-3000:]}')
  return {line['model']: line for line in (
      json.loads(text.removeprefix('RESULT '))
      for text in result.stdout.splitlines() if text.startswith('RESULT '))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--models', default='mlp,lm')
  parser.add_argument('--worker', action='store_true',
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  models = args.models.split(',')
  if args.worker:
    worker(models, args.repeats)
    return

  cores = os.cpu_count()
  print(f'JAX {jax.__version__}, XLA host (CPU) devices on {cores} cores, '
        'float32, path_shapley(1), optax.adamw, same global batch.')
  if cores < max(DEVICE_COUNTS):
    print(f'\nThis machine has {cores} cores for up to {max(DEVICE_COUNTS)} '
          'devices: the devices share the cores, so the times show the '
          'overhead of splitting the step, not a speed-up.')
  results = {d: run_device_count(d, models, args.repeats)
             for d in DEVICE_COUNTS}
  for name in models:
    title, _, n, n_val = MODELS[name]
    print(f'\n### {title}, n = {n}, {n_val} validation examples\n')
    print('| devices | examples / device | plain ms | attributed ms | ratio '
          '| vs 1 device | compile s |')
    print('|---|---|---|---|---|---|---|')
    single = results[DEVICE_COUNTS[0]][name]['attributed_ms']
    for devices in DEVICE_COUNTS:
      row = results[devices][name]
      print(f'| {devices} | {n // devices} | {row["plain_ms"]:.1f} | '
            f'{row["attributed_ms"]:.1f} | '
            f'{row["plain_ms"] / row["attributed_ms"]:.2f} | '
            f'{row["attributed_ms"] / single:.2f} | '
            f'{row["compile_s"]:.1f} |')
  sys.stdout.flush()


if __name__ == '__main__':
  main()
