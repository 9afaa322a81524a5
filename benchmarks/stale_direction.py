"""How much a cached direction costs in fidelity: the case against reuse.

Any kernel that takes a fresh validation gradient at every step pays for the
validation pass and the optimizer's pullback (see `throughput.py`'s bound
row). The obvious way around that is to compute `path_shapley(1)`'s
direction every k-th step only and reuse it in between, with a cheap kernel
for the per-example dots. This script measures what that does to the values.

For each fidelity setting (`fidelity.py`), training runs with the plain
optax step. At every step `t` the exact `path_shapley(1)` direction `d_t` is
formed; the values of step `t` with the direction refreshed every k steps
are the per-example dots with `d_s`, `s` the last refresh at or before `t`.
The table gives the Pearson R of those values against the exact ones
(`d_t` itself), over the steps that do not refresh (the others are exact),
after a warm-up. Float64.

Run: python benchmarks/stale_direction.py [--steps 60] [--warmup 10]
"""

import argparse

import jax

jax.config.update('jax_enable_x64', True)

import numpy as np  # pylint: disable=g-import-not-at-top

import adam_inrun as air
import fidelity
import throughput

REFRESH_EVERY = (2, 4, 8, 16)


def directions(setting: fidelity.Setting, num_steps: int):
  """Yields `(params, batch, direction)` for each step of a plain run."""
  step = jax.jit(throughput.direction_step(setting.loss_fn, setting.tx))
  params, opt_state = setting.params, setting.tx.init(setting.params)
  for _ in range(num_steps):
    batch = setting.next_batch()
    new_params, new_opt_state, direction = step(params, opt_state, batch,
                                                setting.val_batch)
    yield params, batch, direction
    params, opt_state = new_params, new_opt_state


def measure(setting: fidelity.Setting, num_steps: int, warmup: int
            ) -> dict[int, list[float]]:
  """Pearson R against the exact values, by refresh interval, per step."""
  dots = jax.jit(lambda params, batch, direction: air.ghost_dots(
      setting.loss_fn, params, batch, direction))
  history, found = [], {k: [] for k in REFRESH_EVERY}
  for t, (params, batch, direction) in enumerate(
      directions(setting, num_steps)):
    history.append(direction)
    exact = np.asarray(dots(params, batch, direction))
    for k in REFRESH_EVERY:
      refreshed = t - t % k
      if refreshed != t and t >= warmup:
        stale = np.asarray(dots(params, batch, history[refreshed]))
        found[k].append(float(np.corrcoef(exact, stale)[0, 1]))
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--warmup', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  print(f'Pearson R of values with a direction refreshed every k steps '
        f'against the exact ones, steps {args.warmup + 1}-{args.steps}: '
        'median (minimum).\n')
  print('| setting | ' + ' | '.join(f'k = {k}' for k in REFRESH_EVERY) + ' |')
  print('|---|' + '---:|' * len(REFRESH_EVERY))
  for name, make in fidelity.SETTINGS.items():
    found = measure(make(args.seed), args.steps, args.warmup)
    cells = [f'{np.median(found[k]):.3f} ({min(found[k]):.3f})'
             for k in REFRESH_EVERY]
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
