"""Throughput and memory of attributed steps against plain optax training.

For each model, plain `optax.adamw` training and the attributed step of each
estimator run on the same parameters and batches, interleaved in one process
so that machine noise hits all of them alike. Compile time is excluded.
Columns:

- `ms`: median wall time of one step (and the spread, 25th-75th percentile);
- `ratio`: plain time / step time, the throughput relative to plain
  training: the median over rounds of the ratio within each round, since a
  round runs every step back to back and so meets the same machine load;
- `flop ratio`: plain FLOPs / step FLOPs from XLA's cost analysis of the two
  compiled executables: what counting FLOPs predicts the ratio to be;
- `of bound`: ratio / flop ratio;
- `peak MiB`: arguments + outputs + temporaries of the compiled executable;
- `mem ×`: that, over the plain step's.

`path_shapley(1), every 4` attributes one step in four (`attribute=False`
on the others) and reports the amortised cost of four steps. `bound:
direction only, no kernel` is plain training plus `path_shapley(1)`'s
direction (the validation pass at the path point and the optimizer's
pullback) with no per-example kernel at all: what any kernel, however fast,
costs at least when it takes a fresh validation gradient every step.

Run: python benchmarks/throughput.py [--repeats 15] [--models mlp,cnn,lm]
"""

import argparse
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_inrun as air

from _models import LM, MLP


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, padding='SAME')(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, padding='SAME')(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def classification(model, x_shape, n, n_val):
  def loss_fn(params, batch):
    log_probs = jax.nn.log_softmax(model.apply(params, batch['x']))
    return -jnp.take_along_axis(log_probs, batch['y'][:, None], 1)[:, 0]

  key = jax.random.key(0)
  params = model.init(key, jnp.zeros((1,) + x_shape))
  make = lambda k, m: {'x': jax.random.normal(k, (m,) + x_shape),
                       'y': jax.random.randint(k, (m,), 0, 10)}
  return loss_fn, params, make(jax.random.key(1), n), make(
      jax.random.key(2), n_val)


def language_model(n, n_val, length=128):
  model = LM()

  def loss_fn(params, tokens):
    log_probs = jax.nn.log_softmax(model.apply(params, tokens[:, :-1]))
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], 2)[..., 0]
    return nll.mean(axis=1)

  tokens = lambda k, m: jax.random.randint(k, (m, length + 1), 0, 256)
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
  return loss_fn, params, tokens(jax.random.key(1), n), tokens(
      jax.random.key(2), n_val)


MODELS = {
    'mlp': ('MLP 784-1024-1024-10', lambda: classification(
        MLP(widths=(1024, 1024)), (784,), 256, 32), 256, 32),
    'cnn': ('CNN 2 conv + dense, 28x28', lambda: classification(
        CNN(), (28, 28, 1), 128, 16), 128, 16),
    'lm': ('LM d=256, 2 layers, 128 tokens', lambda: language_model(16, 4),
           16, 4),
}


def plain_step_fn(loss_fn, tx):
  @jax.jit
  def step(params, opt_state, batch, val_batch):
    del val_batch
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def direction_step(loss_fn, tx):
  """Plain training plus `path_shapley(1)`'s direction, and no kernel.

  Returns `step(params, opt_state, batch, val_batch)` returning the updated
  parameters and optimizer state and the direction, not jitted.
  """
  attribution_fn = air.path_shapley(1)

  def step(params, opt_state, batch, val_batch):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    direction = attribution_fn(air.AttributionInputs(
        params=params, opt_state=opt_state, grads=grads, updates=updates,
        new_opt_state=new_opt_state,
        update_fn=lambda g: tx.update(g, opt_state, params)[0],
        val_loss=lambda p: jnp.mean(loss_fn(p, val_batch))))
    return optax.apply_updates(params, updates), new_opt_state, direction
  return step


def direction_only_fn(loss_fn, tx):
  """`direction_step`, jitted, with the direction summed to keep it alive.

  Any per-example kernel fed a fresh validation gradient each step costs at
  least this: it bounds the throughput of every fast kernel.
  """
  step = direction_step(loss_fn, tx)

  @jax.jit
  def direction_only(params, opt_state, batch, val_batch):
    params, opt_state, direction = step(params, opt_state, batch, val_batch)
    return params, opt_state, optax.tree.sum(direction)
  return direction_only


def peak_bytes(compiled):
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def bench_model(name, repeats):
  title, build, n, n_val = MODELS[name]
  loss_fn, params, batch, val_batch = build()
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  steps = {
      'plain optax.adamw': plain_step_fn(loss_fn, tx),
      'sgd_proxy': air.make_train_step(loss_fn, tx, air.sgd_proxy(1e-3)),
      'adam_fixed_state': air.make_train_step(loss_fn, tx,
                                              air.adam_fixed_state(1e-3)),
      'path_shapley(1)': air.make_train_step(loss_fn, tx),
      'path_shapley(3, power=2)': air.make_train_step(
          loss_fn, tx, air.path_shapley(3, power=2.0)),
      'path_shapley(1), sketch 8': air.make_train_step(loss_fn, tx,
                                                       sketch_rank=8),
      'path_shapley(1), sketch 16': air.make_train_step(loss_fn, tx,
                                                        sketch_rank=16),
      'bound: direction only, no kernel': direction_only_fn(loss_fn, tx),
  }
  args = (params, opt_state, batch, val_batch)
  compiled = {k: f.lower(*args).compile() for k, f in steps.items()}
  every = steps['path_shapley(1)']
  jax.block_until_ready(every(*args, attribute=False))

  def every_four():
    out = every(*args)
    for _ in range(3):
      out = every(*args, attribute=False)
    return out

  calls = {k: (lambda f=f: f(*args)) for k, f in steps.items()}
  calls['path_shapley(1), every 4'] = every_four
  for call in calls.values():
    jax.block_until_ready(call())

  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      elapsed = time.perf_counter() - start
      times[k].append(elapsed / (4 if 'every 4' in k else 1))

  plain = 'plain optax.adamw'
  plain_ms = statistics.median(times[plain]) * 1e3
  plain_flops = flops(compiled[plain])
  plain_peak = peak_bytes(compiled[plain])
  print(f'\n### {title}, n = {n}, {n_val} validation examples\n')
  print('| step | ms (IQR) | ratio | flop ratio | of bound | peak MiB | mem × |')
  print('|---|---|---|---|---|---|---|')
  for k in calls:
    ms = np.asarray(times[k]) * 1e3
    median = float(np.median(ms))
    q1, q3 = np.percentile(ms, [25, 75])
    ratio = float(np.median(np.asarray(times[plain])
                            / np.asarray(times[k])))
    if k in compiled:
      flop_ratio = plain_flops / flops(compiled[k])
      peak = peak_bytes(compiled[k])
    else:
      attributed = flops(compiled['path_shapley(1)'])
      flop_ratio = 4 * plain_flops / (attributed + 3 * plain_flops)
      peak = peak_bytes(compiled['path_shapley(1)'])
    print(f'| {k} | {median:.1f} ({q1:.1f}-{q3:.1f}) | {ratio:.2f} | '
          f'{flop_ratio:.2f} | {ratio / flop_ratio:.2f} | '
          f'{peak / 2**20:.1f} | {peak / plain_peak:.2f} |')
  sys.stdout.flush()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--models', default='mlp,cnn,lm')
  args = parser.parse_args()
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform}, '
        f'{jax.device_count()} device(s)')
  for name in args.models.split(','):
    bench_model(name, args.repeats)


if __name__ == '__main__':
  main()
