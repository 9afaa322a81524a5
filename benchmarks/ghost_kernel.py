"""Cost of `ghost_dots` against a plain backward pass and vmap(grad).

For each model, three jitted programs run on the same parameters and batch:

- plain: `jax.grad` of the mean loss, one forward and backward pass, the
  work of a training step without attribution;
- ghost: `air.ghost_dots`, the per-example dots with a direction;
- vmap: the same dots from per-example gradients, `jax.vmap(jax.grad)`,
  dotted with the direction inside the same program.

Compile time is excluded; the three are called in turn, repeat after repeat,
so machine noise hits them alike, and each reports its median wall time.
Columns: model, batch size n, the three medians in ms, ghost / plain and
vmap / ghost (the speed-up over per-example gradients), each the median
over repeats of the ratio within one repeat, whether `air.coverage` puts
every parameter in a kernel (no: some go to the exact but slower `jax.jvp`
fallback, a forward-mode pass through the whole model), and the largest
difference between the ghost and vmap dots over the largest vmap dot.

Counting matmuls, plain is three per layer (forward, input gradient, weight
gradient) and ghost is also three (forward, input gradient, and the replay
of the layer on the direction: the weight gradient is never formed), so
ghost / plain near 1 is the ideal for matmul-bound models. A training step
that attributes also needs the weight gradient, so it does four matmuls per
layer where plain training does three.

The `lm` model adds a learned position table with `self.param`, which no
kernel covers; `lm-embed-pos` is the same model with positions looked up by
`nn.Embed` per example, so every parameter is in a kernel.

Run: python benchmarks/ghost_kernel.py [--repeats 20] [--models mlp,cnn,lm]
"""

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import adam_inrun as air

from _models import MLP


class CNN(nn.Module):
  """Three 3x3 convolutions, two of stride 2, then two dense layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), padding='SAME')(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), padding='SAME')(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), padding='VALID')(x))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Pre-norm transformer block under a causal mask."""

  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, deterministic=True)(nn.LayerNorm()(x),
                                                      mask=mask)
    hidden = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.RMSNorm()(x)))
    return x + nn.Dense(x.shape[-1])(hidden)


class LM(nn.Module):
  """Byte-level causal language model with tied input and output embedding.

  Attributes:
    embed_positions: look positions up with `nn.Embed` per example (covered
      by a kernel) instead of adding a `self.param` table (the jvp fallback).
  """

  embed_positions: bool = False
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  vocab_size: int = 256
  max_len: int = 128

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab_size, self.width)
    positions = jnp.arange(tokens.shape[1])
    if self.embed_positions:
      x = embed(tokens) + nn.Embed(self.max_len, self.width)(
          jnp.broadcast_to(positions, tokens.shape))
    else:
      table = self.param('position', nn.initializers.normal(0.02),
                         (self.max_len, self.width))
      x = embed(tokens) + table[positions]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(self.num_heads)(x, mask)
    return embed.attend(nn.LayerNorm()(x))


def cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def classification(model, x_shape, n, rng):
  batch = {'x': jnp.asarray(rng.standard_normal((n,) + x_shape), jnp.float32),
           'y': jnp.asarray(rng.integers(0, 10, n))}
  loss_fn = lambda p, b: cross_entropy(model.apply(p, b['x']), b['y'])
  params = jax.jit(model.init)(jax.random.key(0), batch['x'][:1])
  return loss_fn, params, batch


def language_model(model, length, n, rng):
  tokens = jnp.asarray(rng.integers(0, model.vocab_size, (n, length + 1)))

  def loss_fn(params, batch):
    logits = model.apply(params, batch['tokens'][:, :-1])
    return cross_entropy(logits, batch['tokens'][:, 1:]).mean(axis=1)

  params = jax.jit(model.init)(jax.random.key(0), tokens[:1, :-1])
  return loss_fn, params, {'tokens': tokens}


# Each entry builds (loss_fn, params, batch) from a batch size and an rng.
MODELS = {
    'mlp': functools.partial(classification, MLP(widths=(1024, 1024)),
                             (784,)),
    'cnn': functools.partial(classification, CNN(), (32, 32, 3)),
    'lm': functools.partial(language_model, LM(), 64),
    'lm-embed-pos': functools.partial(
        language_model, LM(embed_positions=True), 64),
}
DEFAULT_BATCH = {'mlp': 64, 'cnn': 64, 'lm': 32, 'lm-embed-pos': 32}


def programs(loss_fn):
  """The three jitted programs, each `f(params, batch, direction)`."""

  def plain(params, batch, direction):
    del direction
    return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)

  def ghost(params, batch, direction):
    return air.ghost_dots(loss_fn, params, batch, direction)

  def vmapped(params, batch, direction):
    def example_loss(params, example):
      return loss_fn(params, jax.tree.map(lambda a: a[None], example))[0]
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
    return sum(jnp.tensordot(g, d, d.ndim) for g, d in zip(
        jax.tree.leaves(grads), jax.tree.leaves(direction)))

  return {'plain': jax.jit(plain), 'ghost': jax.jit(ghost),
          'vmap': jax.jit(vmapped)}


def measure(name, n, repeats, rng):
  """Median milliseconds and ratios, whether kernels cover all, the error."""
  loss_fn, params, batch = MODELS[name](n, rng)
  direction = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  compiled = programs(loss_fn)
  outputs = {}
  for label, program in compiled.items():  # compile, and check the results
    outputs[label] = jax.block_until_ready(program(params, batch, direction))
  scale = float(jnp.max(jnp.abs(outputs['vmap'])))
  error = float(jnp.max(jnp.abs(outputs['ghost'] - outputs['vmap']))) / scale

  times = {label: [] for label in compiled}
  for _ in range(repeats):
    for label, program in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(program(params, batch, direction))
      times[label].append(1e3 * (time.perf_counter() - start))
  coverage = air.coverage(loss_fn, params, batch)
  covered = all(sites != ('jvp',) for sites in coverage.values())
  medians = {label: statistics.median(t) for label, t in times.items()}
  ratio = lambda a, b: statistics.median(
      x / y for x, y in zip(times[a], times[b]))
  ratios = {'ghost/plain': ratio('ghost', 'plain'),
            'vmap/ghost': ratio('vmap', 'ghost')}
  return medians, ratios, covered, error


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS),
                      help=f'comma-separated, from {", ".join(MODELS)}')
  parser.add_argument('--batch', type=int, default=None,
                      help='batch size n for every model (default per model)')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)

  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{args.repeats} repeats, compile time excluded\n')
  print('| model | n | plain fwd+bwd ms | ghost_dots ms | vmap(grad) ms '
        '| ghost/plain | vmap/ghost | all kernel-covered | rel. error |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in args.models.split(','):
    n = args.batch or DEFAULT_BATCH[name]
    ms, ratios, covered, error = measure(name, n, args.repeats, rng)
    print(f"| {name} | {n} | {ms['plain']:.2f} | {ms['ghost']:.2f} "
          f"| {ms['vmap']:.2f} | {ratios['ghost/plain']:.2f} "
          f"| {ratios['vmap/ghost']:.1f} | {'yes' if covered else 'no'} "
          f'| {error:.1e} |', flush=True)


if __name__ == '__main__':
  main()
