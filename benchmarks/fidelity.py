r"""Fidelity of every estimator against the real step game, by training step.

Each setting trains a model with the plain optax step. At each evaluated
step `t` the state before that step is frozen, and on that step's batch

* every estimator's attributed step (`make_train_step(...,
  with_diagnostics=True)`, built once per setting) values the examples and
  reports its efficiency residual; its new parameters are checked against
  the plain step's. Two rows use the fast sketch kernel (`sketch_rank` 8
  and 16) with `path_shapley(1)`; the "Pearson vs exact" column compares
  every row with the exact `path_shapley(1)` values of the same step, which
  for those rows is the sketch's own error;
* Monte-Carlo Shapley (`groundtruth.shapley`, antithetic permutations) and
  leave-one-out (`groundtruth.leave_one_out`) of the real step give the
  references.

The Monte-Carlo estimate is computed as two independent halves, each with
half the permutations. Their mean is the reference and their correlation
`r` is its noise level: by Spearman-Brown the full estimate correlates with
the exact Shapley values at about `sqrt(2 r / (1 + r))`, the best any
estimator can be seen to reach.

Settings:

* `digits`: an MLP 64-128-128-10 on scikit-learn's digits (features / 16),
  `optax.adam(1e-3)`, n = 64, a clean validation batch of 128.
* `digits_rescaled`: the same with each input feature multiplied by
  `exp(N(0, 2))`, where Adam's per-parameter scaling matters.
* `bytes_lm`: a one-block byte-level causal transformer LM (Embed, causal
  MultiHeadDotProductAttention, LayerNorm, Dense, logits tied through
  `Embed.attend`) on the bytes of a Python standard-library source file,
  `optax.adamw(3e-3)`, n = 32 windows of 32 tokens.

Everything runs in float64. Usage::

  python benchmarks/fidelity.py
  python benchmarks/fidelity.py --settings digits --steps 1 10 \
      --permutations 16

Progress goes to stderr; one markdown table per setting, then a summary of
each estimator's weak spots read off the tables, go to stdout.
"""

import argparse
import os
import sys
import time
from typing import Any, Callable, NamedTuple

# Without XLA's newer CPU fusion emitters, this script's programs compile in
# about a third less time and run about as fast; compilation is much of the
# cost of a short benchmark.
if '--xla_cpu_use_fusion_emitters' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_cpu_use_fusion_emitters=false')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_enable_x64', True)

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats
from sklearn import datasets

import adam_inrun as air

from _models import MLP

# (name, attribution function of the learning rate, sketch rank or None).
ESTIMATORS = (
    ('sgd_proxy', air.sgd_proxy, None),
    ('adam_fixed_state', air.adam_fixed_state, None),
    ('adam_fixed_state(at_midpoint)',
     lambda rate: air.adam_fixed_state(rate, at_midpoint=True), None),
    ('path_shapley(1)', lambda rate: air.path_shapley(1), None),
    ('path_shapley(3)', lambda rate: air.path_shapley(3), None),
    ('path_shapley(3, power=2)',
     lambda rate: air.path_shapley(3, power=2.0), None),
    # The fast kernel: the same estimator with sketched dense directions.
    ('path_shapley(1), sketch 8', lambda rate: air.path_shapley(1), 8),
    ('path_shapley(1), sketch 16', lambda rate: air.path_shapley(1), 16),
)

# The "Pearson vs exact" column compares each estimator with this one's
# values on the same step: for the sketch rows, the fast kernel's error.
EXACT = 'path_shapley(1)'

REFERENCE = 'MC Shapley, half vs half'

# An estimator is judged only where the reference's expected correlation
# with the exact values reaches this.
TRUSTED_CEILING = 0.9

# An efficiency residual above this counts as the step flagging its values.
FLAGGED_RESIDUAL = 0.25


class Setting(NamedTuple):
  """One training problem to measure fidelity on.

  Attributes:
    name: the key used on the command line.
    title: a one-line description for the table heading.
    loss_fn: `loss_fn(params, batch)` returning per-example losses. Settings
      that share `loss_fn` and `tx` objects share compiled programs.
    tx: the optax transformation used for training.
    learning_rate: the rate given to the estimators that need one.
    params: float64 parameters at initialisation.
    val_batch: the fixed validation batch.
    next_batch: `next_batch()` returns a fresh training batch.
    permutations: default number of Monte-Carlo permutations per step.
  """

  name: str
  title: str
  loss_fn: Callable[[Any, Any], jax.Array]
  tx: optax.GradientTransformation
  learning_rate: float
  params: Any
  val_batch: Any
  next_batch: Callable[[], Any]
  permutations: int


# Programs that run once or a handful of times cost far more to compile than
# to run; XLA's cheaper backend settings cut that by a third or more.
_FAST_COMPILE = {'xla_backend_optimization_level': 0,
                 'xla_llvm_disable_expensive_passes': True}


def _initialise(model: nn.Module, seed: int, example: jax.Array) -> Any:
  """`model`'s parameters in float64, from one cheaply compiled program."""
  key = jax.random.key(seed)
  init = jax.jit(model.init).lower(key, example).compile(_FAST_COMPILE)
  return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64),
                      init(key, example))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _digits_loss(params, batch):
  return _cross_entropy(MLP().apply(params, batch['x']), batch['y'])


_DIGITS_TX = optax.adam(1e-3)


def digits_setting(*, rescaled: bool, seed: int) -> Setting:
  """The digits MLP, optionally with log-normally rescaled features."""
  x, y = datasets.load_digits(return_X_y=True)
  x = x / 16.0
  rng = np.random.default_rng(seed)
  if rescaled:
    x = x * np.exp(rng.normal(0.0, 2.0, size=x.shape[1]))
  order = rng.permutation(len(x))
  x, y = x[order], y[order]
  train_x, train_y = x[:1500], y[:1500]
  val_batch = {'x': jnp.asarray(x[1500:1628]), 'y': jnp.asarray(y[1500:1628])}
  params = _initialise(MLP(), seed, jnp.zeros((1, 64)))

  def next_batch():
    index = rng.choice(len(train_x), 64, replace=False)
    return {'x': jnp.asarray(train_x[index]), 'y': jnp.asarray(train_y[index])}

  name = 'digits_rescaled' if rescaled else 'digits'
  title = ('MLP 64-128-128-10 on digits'
           + (', features rescaled by exp(N(0, 2))' if rescaled else '')
           + ', adam(1e-3), n = 64, |V| = 128')
  return Setting(name, title, _digits_loss, _DIGITS_TX, 1e-3, params,
                 val_batch, next_batch, permutations=32)


class ByteLM(nn.Module):
  """A pre-norm causal transformer over bytes with tied output logits.

  Attributes:
    length: context length, the size of the position table.
    width: model width.
    num_heads: attention heads.
    num_layers: transformer blocks.
  """

  length: int = 32
  width: int = 32
  num_heads: int = 2
  num_layers: int = 1

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(256, self.width)
    # Positions are looked up per example, so the Embed kernel covers them.
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = embed(tokens) + nn.Embed(self.length, self.width)(positions)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      attention = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, deterministic=True)
      x = x + attention(nn.LayerNorm()(x), mask=mask)
      hidden = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
      x = x + nn.Dense(self.width)(hidden)
    return embed.attend(nn.LayerNorm()(x))


def bytes_lm_setting(*, seed: int, source: str = 'argparse.py') -> Setting:
  """Next-byte prediction on a standard-library file, 32-byte windows.

  Training windows come from the first 90% of the file, the validation
  windows are spread evenly over the rest.
  """
  path = os.path.join(os.path.dirname(os.__file__), source)
  with open(path, 'rb') as f:
    data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  length, n, n_val = 32, 32, 16
  split = int(0.9 * len(data))
  train, held_out = data[:split], data[split:]

  def windows(text, starts):
    return jnp.asarray(np.stack([text[s:s + length + 1] for s in starts]))

  val_starts = np.linspace(0, len(held_out) - length - 1, n_val).astype(int)
  val_batch = {'tokens': windows(held_out, val_starts)}
  rng = np.random.default_rng(seed)

  def next_batch():
    return {'tokens': windows(
        train, rng.integers(0, len(train) - length - 1, size=n))}

  model = ByteLM(length=length)
  params = _initialise(model, seed, jnp.zeros((1, length), jnp.int32))

  def loss_fn(params, batch):
    tokens = batch['tokens']
    logits = model.apply(params, tokens[:, :-1])
    return jnp.mean(_cross_entropy(logits, tokens[:, 1:]), axis=1)

  title = (f'byte-level causal transformer (d = 32, 1 block, {length} '
           f'tokens) on {source}, adamw(3e-3), n = {n}, |V| = {n_val}')
  # Each game evaluation costs about ten times the MLP's.
  return Setting('bytes_lm', title, loss_fn, optax.adamw(3e-3), 3e-3, params,
                 val_batch, next_batch, permutations=16)


SETTINGS = {
    'digits': lambda seed: digits_setting(rescaled=False, seed=seed),
    'digits_rescaled': lambda seed: digits_setting(rescaled=True, seed=seed),
    'bytes_lm': lambda seed: bytes_lm_setting(seed=seed),
}


class Row(NamedTuple):
  """One table row: an estimator, or the reference, at one step.

  For the reference, `pearson` and `spearman` compare its two halves and
  `residual` and `sum_ratio` are NaN.
  """

  step: int
  estimator: str
  pearson: float
  spearman: float
  pearson_loo: float
  residual: float
  sum_ratio: float
  pearson_exact: float = float('nan')


def _pearson(a, b) -> float:
  if np.std(a) == 0 or np.std(b) == 0:
    return float('nan')
  return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
  if np.std(a) == 0 or np.std(b) == 0:
    return float('nan')
  return float(stats.spearmanr(a, b).statistic)


def ceiling(split_half: float) -> float:
  """Expected correlation of the full MC estimate with the exact values."""
  if not split_half > 0:
    return float('nan')
  return float(np.sqrt(2.0 * split_half / (1.0 + split_half)))


def _log(start: float, message: str) -> None:
  print(f'[{time.perf_counter() - start:6.1f}s] {message}', file=sys.stderr,
        flush=True)


def plain_step(loss_fn, tx) -> Callable[..., tuple]:
  """The reference optax step: the mean loss's gradient, then the update."""

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


# The attributed steps run a handful of times each, so compiling them costs
# far more than running them: the six are compiled as one program, which
# shares the work common to all, with `_FAST_COMPILE`.
def attributed_steps(loss_fn, tx, learning_rate) -> Callable[..., list]:
  """Every estimator's step on the same state, as one function."""
  steps = [air.make_train_step(loss_fn, tx, make(learning_rate),
                               with_diagnostics=True, sketch_rank=rank,
                               jit=False)
           for _, make, rank in ESTIMATORS]

  def run_all(params, opt_state, batch, val_batch):
    return [step(params, opt_state, batch, val_batch) for step in steps]

  return jax.jit(run_all)


def _largest_difference(a: Any, b: Any) -> tuple[float, str]:
  gaps = jax.tree_util.tree_leaves_with_path(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a,
      b))
  path, gap = max(gaps, key=lambda item: item[1])
  return gap, jax.tree_util.keystr(path, simple=True, separator='/')


class Programs:
  """Compiled programs for one (loss_fn, tx) pair, reused across settings."""

  def __init__(self, setting: Setting):
    self.plain = plain_step(setting.loss_fn, setting.tx)
    self._attributed = attributed_steps(setting.loss_fn, setting.tx,
                                        setting.learning_rate)
    self._compiled = None

  def attributed(self, *state):
    if self._compiled is None:
      self._compiled = self._attributed.lower(*state).compile(_FAST_COMPILE)
    return self._compiled(*state)


def measure(setting: Setting, programs: Programs, steps: list[int],
            num_permutations: int, seed: int, start: float
            ) -> tuple[list[Row], tuple[float, str]]:
  """The rows of one setting's table, and the worst parameter mismatch.

  The mismatch is the largest absolute difference, and where it occurs,
  between an attributed step's new parameters and the plain step's.
  """
  game = (setting.loss_fn, setting.tx)
  half = max(num_permutations // 2, 1)
  params, opt_state = setting.params, setting.tx.init(setting.params)
  done, rows, mismatch = 0, [], (0.0, '')

  for t in sorted(set(steps)):
    if done < t - 1:
      _log(start, f'{setting.name}: training to step {t}')
    while done < t - 1:
      params, opt_state = programs.plain(params, opt_state,
                                         setting.next_batch())
      done += 1
    batch = setting.next_batch()
    state = (params, opt_state, batch, setting.val_batch)

    _log(start, f'{setting.name}: step {t}, Monte-Carlo Shapley '
         f'({2 * half} permutations) and leave-one-out')
    keys = jax.random.split(jax.random.key(seed * 100_003 + t))
    halves = [np.asarray(air.groundtruth.shapley(
        *game, *state, num_permutations=half, key=key)) for key in keys]
    shapley = (halves[0] + halves[1]) / 2.0
    loo = np.asarray(air.groundtruth.leave_one_out(*game, *state))
    rows.append(Row(t, REFERENCE, _pearson(*halves), _spearman(*halves),
                    _pearson(shapley, loo), float('nan'), float('nan')))

    _log(start, f'{setting.name}: step {t}, the {len(ESTIMATORS)} '
         'estimators')
    new_params, new_opt_state = programs.plain(params, opt_state, batch)
    outputs = dict(zip((name for name, *_ in ESTIMATORS),
                       programs.attributed(*state)))
    exact = np.asarray(outputs[EXACT][2])
    for name, (stepped, _, values, diagnostics) in outputs.items():
      mismatch = max(mismatch, _largest_difference(stepped, new_params))
      values = np.asarray(values)
      rows.append(Row(
          t, name, _pearson(values, shapley), _spearman(values, shapley),
          _pearson(values, loo), float(diagnostics.efficiency_residual),
          float(diagnostics.values_sum) / float(diagnostics.total_utility),
          _pearson(values, exact)))
    params, opt_state, done = new_params, new_opt_state, t
  return rows, mismatch


def _number(value: float, spec: str = '.3f') -> str:
  return '—' if np.isnan(value) else format(value, spec)


def table(rows: list[Row]) -> str:
  """One setting's rows as a markdown table."""
  lines = [
      '| step | estimator | Pearson vs Shapley | Spearman vs Shapley '
      '| Pearson vs LOO | Pearson vs exact | efficiency residual '
      '| Σ values / (U(B) − U(∅)) |',
      '|---:|---|---:|---:|---:|---:|---:|---:|',
  ]
  for row in rows:
    label = row.estimator
    if label == REFERENCE:
      label += f' (ceiling {_number(ceiling(row.pearson), ".2f")})'
    lines.append(
        f'| {row.step} | {label} | {_number(row.pearson)} '
        f'| {_number(row.spearman)} | {_number(row.pearson_loo)} '
        f'| {_number(row.pearson_exact)} '
        f'| {_number(row.residual, ".2g")} | {_number(row.sum_ratio)} |')
  return '\n'.join(lines)


def _by_step(cells: list[tuple[str, Row]], field: str) -> str:
  """'step 1: 0.24-0.33 (digits, bytes_lm); step 2: ...' for `cells`."""
  parts = []
  for t in sorted({row.step for _, row in cells}):
    here = [(name, getattr(row, field)) for name, row in cells
            if row.step == t]
    low, high = (f'{f(value for _, value in here):.2f}' for f in (min, max))
    span = low if low == high else f'{low}-{high}'
    parts.append(f'step {t}: {span} ({", ".join(n for n, _ in here)})')
  return '; '.join(parts)


def summary(results: dict[str, list[Row]]) -> str:
  """Each estimator's weak spots in plain words, read off the rows.

  Ranking is judged only where the reference is trustworthy (expected
  correlation with exact Shapley at least `TRUSTED_CEILING`): there an
  estimator is weak when its Pearson R against Shapley is below 0.9, and
  the step's own efficiency residual flags a weak cell when it exceeds
  `FLAGGED_RESIDUAL`.
  Efficiency needs no reference: values summing to under 0.8 or over 1.25
  of the step's total utility under- or over-count it.
  """
  trusted, noisy = set(), []
  for name, rows in results.items():
    for row in rows:
      if row.estimator != REFERENCE:
        continue
      if ceiling(row.pearson) >= TRUSTED_CEILING:
        trusted.add((name, row.step))
      else:
        noisy.append(f'{name} step {row.step} (expected R '
                     f'{_number(ceiling(row.pearson), ".2f")})')
  lines = []
  if noisy:
    lines.append('- The Monte-Carlo reference is too noisy to rank against '
                 'at ' + ', '.join(noisy) + '; those cells are not judged '
                 'below.')

  steps = sorted({row.step for rows in results.values() for row in rows})
  best = []
  for t in steps:
    means = {}
    for estimator, *_ in ESTIMATORS:
      rs = [row.pearson for name, rows in results.items() for row in rows
            if row.estimator == estimator and row.step == t
            and (name, t) in trusted]
      if rs:
        means[estimator] = float(np.mean(rs))
    if means:
      winner = max(means, key=means.get)
      best.append(f'step {t}: {winner} ({means[winner]:.3f})')
  if best:
    lines.append('- Best mean Pearson R vs Shapley over the judged settings, '
                 'by step: ' + '; '.join(best) + '.')

  for estimator, *_ in ESTIMATORS:
    cells = [(name, row) for name, rows in results.items() for row in rows
             if row.estimator == estimator]
    if not cells:
      continue
    judged = [(name, row) for name, row in cells
              if (name, row.step) in trusted]
    weak = [(name, row) for name, row in judged if not row.pearson >= 0.9]
    strong = [row.pearson for _, row in judged
              if row.step not in {r.step for _, r in weak}]
    under = [(name, row) for name, row in cells if row.sum_ratio < 0.8]
    over = [(name, row) for name, row in cells if row.sum_ratio > 1.25]

    parts = []
    if weak:
      parts.append('ranks poorly (Pearson R vs Shapley) at '
                   + _by_step(weak, 'pearson'))
      flagged = sum(row.residual > FLAGGED_RESIDUAL for _, row in weak)
      parts.append(f'its efficiency residual exceeds {FLAGGED_RESIDUAL} in '
                   f'{flagged} of these {len(weak)} cells')
    if strong:
      parts.append(f'R ≥ {min(strong):.2f} at the other judged steps'
                   if weak else f'R ≥ {min(strong):.2f} wherever judged')
    if under:
      parts.append('under-counts the step total (Σ values / total) at '
                   + _by_step(under, 'sum_ratio'))
    if over:
      parts.append('over-counts the step total at '
                   + _by_step(over, 'sum_ratio'))
    if not under and not over:
      parts.append('its values sum to 0.8-1.25× the step total everywhere')
    if estimator != EXACT:
      worst = min(row.pearson_exact for _, row in cells)
      parts.append(f'its Pearson R vs the exact {EXACT} values is at least '
                   f'{worst:.3f}')
    lines.append(f'- **{estimator}**: ' + '. '.join(
        p[0].upper() + p[1:] for p in parts) + '.')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--settings', nargs='+', choices=list(SETTINGS),
                      default=list(SETTINGS))
  parser.add_argument('--steps', nargs='+', type=int,
                      default=[1, 2, 10, 100, 1000],
                      help='training steps to evaluate, counted from 1')
  parser.add_argument('--permutations', type=int, default=None,
                      help='Monte-Carlo permutations per step, antithetic, '
                      'split into two halves (default: 32 for the digits '
                      'settings, 16 for bytes_lm)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if min(args.steps) < 1:
    parser.error(f'steps count from 1; got --steps {args.steps}.')
  if args.permutations is not None and args.permutations < 4:
    parser.error(f'need at least 4 permutations; got {args.permutations}.')

  start = time.perf_counter()
  programs, results = {}, {}
  for name in args.settings:
    setting = SETTINGS[name](args.seed)
    key = (setting.loss_fn, setting.tx)
    if key not in programs:
      programs[key] = Programs(setting)
    permutations = args.permutations or setting.permutations
    rows, (gap, where) = measure(setting, programs[key], args.steps,
                                 permutations, args.seed, start)
    results[name] = rows

    print(f'\n### {name}: {setting.title}\n')
    print(table(rows))
    print(f'\nReference rows: Monte-Carlo Shapley from {permutations} '
          'antithetic permutations in two independent halves; the Pearson '
          'and Spearman columns compare the halves (the reference\'s noise); '
          'the ceiling, √(2r/(1+r)) for their Pearson r, is the expected '
          'correlation of the full estimate with exact Shapley, the most an '
          'estimator can be seen to reach; the LOO column compares the full '
          'estimate with '
          'leave-one-out. Largest difference between an attributed step\'s '
          f'new parameters and the plain step\'s: {gap:.1e}'
          + (f' (at {where})' if gap > 0 else '') + '.', flush=True)
    _log(start, f'{name} done')

  print('\n### Where each estimator is weak\n')
  print(summary(results))
  print(f'\nTotal time {time.perf_counter() - start:.0f} s.')


if __name__ == '__main__':
  main()
