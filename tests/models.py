"""Small Flax linen models, their per-example losses, and reference dots.

Every model here is small enough to differentiate per example in a test and
is built as a `Problem`: a `loss_fn(params, batch)` returning per-example
losses of shape (n,), parameters, and a batch of n examples. Between them the
models call every layer the ghost kernel covers, in the ways that make
kernels easy to get wrong:

* `MLP`: `nn.Dense` layers, optionally without biases.
* `StridedCNN`: 2-D and 1-D `nn.Conv` with strides, SAME and VALID padding,
  with and without bias, one grouped convolution, then `nn.Dense`.
* `CausalLM`: a one-block transformer language model with `nn.Embed`, a
  learned position table read with `self.param` (no kernel covers it),
  `nn.LayerNorm`, `nn.RMSNorm`, `nn.MultiHeadDotProductAttention` under a
  causal mask combined with a padding mask, and output logits tied to the
  token embedding through `nn.Embed.attend`.
* `SharedDense`: one `nn.Dense` module applied twice.
* `MultiAxisDenseGeneral`: `nn.DenseGeneral` contracting and producing
  several axes.

`reference_dots` is the independent reference: per-example gradients by
`jax.vmap(jax.grad)`, each example run through `loss_fn` as a batch of one.
It is for tests and ground truth only.
"""

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Token id reserved for padding in `CausalLM` batches.
PAD = 0


class Problem(NamedTuple):
  """A model's per-example loss, its parameters and one batch.

  Attributes:
    loss_fn: `loss_fn(params, batch)` returning per-example losses, (n,).
    params: the model's parameters, as returned by `Module.init`.
    batch: a dict of arrays whose leading axis is the example axis.
  """

  loss_fn: Callable[[Any, Any], jax.Array]
  params: Any
  batch: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per row; `labels` are integer class ids."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def classification_loss(model: nn.Module) -> Callable[[Any, Any], jax.Array]:
  """Per-example cross-entropy of `model` on a batch `{'x': ..., 'y': ...}`."""

  def loss_fn(params, batch):
    return cross_entropy(model.apply(params, batch['x']), batch['y'])

  return loss_fn


class MLP(nn.Module):
  """Tanh multilayer perceptron.

  Attributes:
    hidden: width of each hidden layer.
    num_classes: number of output logits.
    use_bias: whether every `nn.Dense` has a bias.
  """

  hidden: tuple[int, ...] = (16, 12)
  num_classes: int = 5
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = jnp.tanh(nn.Dense(width, use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


class StridedCNN(nn.Module):
  """2-D then 1-D convolutions over a small image, then a dense classifier.

  Attributes:
    num_classes: number of output logits.
  """

  num_classes: int = 5

  @nn.compact
  def __call__(self, images):
    # images: (n, 8, 8, 2).
    x = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME')(images)
    x = nn.gelu(x)  # (n, 4, 4, 4)
    x = nn.Conv(6, (2, 2), padding='VALID', use_bias=False)(x)
    x = nn.gelu(x)  # (n, 3, 3, 6)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # a sequence, (n, 9, 6)
    x = nn.Conv(4, (3,), strides=(2,), padding='SAME', use_bias=False,
                feature_group_count=2)(x)
    x = nn.gelu(x)  # (n, 5, 4)
    x = nn.Conv(3, (2,), strides=(1,), padding='VALID')(x)  # (n, 4, 3)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class CausalLM(nn.Module):
  """A one-block pre-norm transformer language model with tied logits.

  Attributes:
    vocab_size: number of tokens, `PAD` included.
    max_len: length of the learned position table.
    width: model width.
    num_heads: attention heads.
  """

  vocab_size: int = 11
  max_len: int = 8
  width: int = 16
  num_heads: int = 2

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[1]
    embed = nn.Embed(self.vocab_size, self.width)
    # Read directly, outside any covered layer: left to the jvp fallback.
    position = self.param('position', nn.initializers.normal(0.1),
                          (self.max_len, self.width))
    x = embed(tokens) + position[:length]

    valid = tokens != PAD
    mask = nn.combine_masks(nn.make_causal_mask(tokens),
                            nn.make_attention_mask(valid, valid))
    attention = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, deterministic=True)
    x = x + attention(nn.LayerNorm()(x), mask=mask)

    hidden = nn.Dense(2 * self.width)(nn.RMSNorm()(x))
    x = x + nn.Dense(self.width)(nn.gelu(hidden))
    return embed.attend(nn.LayerNorm()(x))


def lm_loss(model: CausalLM) -> Callable[[Any, Any], jax.Array]:
  """Mean next-token cross-entropy over each sequence's non-padding targets."""

  def loss_fn(params, batch):
    tokens = batch['tokens']
    logits = model.apply(params, tokens[:, :-1])
    targets = tokens[:, 1:]
    weights = (targets != PAD).astype(logits.dtype)
    total = jnp.sum(cross_entropy(logits, targets) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1)

  return loss_fn


class SharedDense(nn.Module):
  """One `nn.Dense` applied twice, then a classifier.

  Attributes:
    width: input width, also the shared layer's width.
    num_classes: number of output logits.
  """

  width: int = 6
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(self.width)
    x = jnp.tanh(shared(x))
    x = jnp.tanh(shared(x))
    return nn.Dense(self.num_classes)(x)


class MultiAxisDenseGeneral(nn.Module):
  """`nn.DenseGeneral` over two input axes to two output axes, then three.

  Attributes:
    num_classes: number of output logits.
  """

  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    # x: (n, 3, 4, 5); contract (4, 5) into (2, 3), keep the axis of 3.
    x = nn.DenseGeneral(features=(2, 3), axis=(-2, -1))(x)
    x = jnp.tanh(x)  # (n, 3, 2, 3)
    x = nn.DenseGeneral(features=self.num_classes, axis=(1, 2, 3),
                        use_bias=False)(x)
    return x


def random_params(model: nn.Module, example: Any, seed: int,
                  dtype: Any = np.float32) -> Any:
  """Random parameters for `model`, drawn with NumPy in `dtype`.

  Only the parameters' shapes come from Flax (`jax.eval_shape` of
  `model.init`), so no initialiser is compiled: Flax's random initialisers,
  run eagerly, compile one program per shape and dominate a small test's
  runtime. Matrices and larger arrays are standard normal over the square
  root of their fan-in (every axis but the last), norm scales are near one,
  other vectors are small and non-zero.

  Args:
    model: the Flax module.
    example: an input batch for `model.init` (only its shape and dtype are
      used).
    seed: NumPy random seed.
    dtype: floating dtype of every parameter; float64 needs
      `jax.enable_x64(True)`.

  Returns:
    The variables dict, `{'params': ...}`, of JAX arrays.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)

  def draw(path, spec):
    noise = rng.standard_normal(spec.shape)
    if path[-1].key == 'scale':
      values = 1 + 0.1 * noise
    elif len(spec.shape) == 1:
      values = 0.1 * noise
    else:
      values = noise / np.sqrt(np.prod(spec.shape[:-1]))
    return jnp.asarray(values.astype(dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _classification_problem(model, seed, n, x_shape, num_classes,
                            dtype) -> Problem:
  rng = np.random.default_rng(seed)
  batch = {
      'x': jnp.asarray(rng.standard_normal((n,) + x_shape).astype(dtype)),
      'y': jnp.asarray(rng.integers(0, num_classes, n, dtype=np.int32)),
  }
  params = random_params(model, batch['x'], seed + 1, dtype)
  return Problem(classification_loss(model), params, batch)


def mlp_problem(seed: int, n: int, dtype: Any = np.float32,
                use_bias: bool = True) -> Problem:
  """An `MLP` on 7 Gaussian features with random labels."""
  model = MLP(use_bias=use_bias)
  return _classification_problem(model, seed, n, (7,), model.num_classes,
                                 dtype)


def cnn_problem(seed: int, n: int, dtype: Any = np.float32) -> Problem:
  """A `StridedCNN` on 8x8 two-channel Gaussian images with random labels."""
  model = StridedCNN()
  return _classification_problem(model, seed, n, (8, 8, 2),
                                 model.num_classes, dtype)


def shared_dense_problem(seed: int, n: int,
                         dtype: Any = np.float32) -> Problem:
  """A `SharedDense` on Gaussian features with random labels."""
  model = SharedDense()
  return _classification_problem(model, seed, n, (model.width,),
                                 model.num_classes, dtype)


def dense_general_problem(seed: int, n: int,
                          dtype: Any = np.float32) -> Problem:
  """A `MultiAxisDenseGeneral` on (3, 4, 5) Gaussian inputs."""
  model = MultiAxisDenseGeneral()
  return _classification_problem(model, seed, n, (3, 4, 5),
                                 model.num_classes, dtype)


def lm_tokens(seed: int, n: int, length: int, vocab_size: int) -> jax.Array:
  """Random token sequences, each of at least two real tokens, then `PAD`s."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab_size, (n, length), dtype=np.int32)
  lengths = rng.integers(2, length + 1, (n, 1))
  return jnp.asarray(np.where(np.arange(length) < lengths, tokens, PAD))


def lm_example(length: int) -> jax.ShapeDtypeStruct:
  """What `lm_loss` feeds a `CausalLM`: one sequence without its last token."""
  return jax.ShapeDtypeStruct((1, length - 1), jnp.int32)


def lm_problem(seed: int, n: int, dtype: Any = np.float32,
               length: int = 8) -> Problem:
  """A `CausalLM` on random token sequences padded at the end."""
  model = CausalLM(max_len=length)
  tokens = lm_tokens(seed, n, length, model.vocab_size)
  params = random_params(model, lm_example(length), seed + 1, dtype)
  return Problem(lm_loss(model), params, {'tokens': tokens})


# Every problem above, by name, for parametrised tests. Each is called as
# `PROBLEMS[name](seed, n, dtype)`; float64 needs `jax.enable_x64(True)`.
PROBLEMS = {
    'mlp': mlp_problem,
    'cnn': cnn_problem,
    'lm': lm_problem,
    'shared_dense': shared_dense_problem,
    'dense_general': dense_general_problem,
}


def random_direction(seed: int, params: Any) -> Any:
  """Standard normal values with the tree, shapes and dtypes of `params`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: jnp.asarray(
          rng.standard_normal(leaf.shape).astype(leaf.dtype)), params)


def per_example_grads(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                      batch: Any) -> Any:
  """Each example's gradient, stacked on a leading axis, by vmap(grad)."""

  def example_loss(params, example):
    as_batch = jax.tree.map(lambda leaf: leaf[None], example)
    return loss_fn(params, as_batch)[0]

  return jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)


def reference_dots(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                   batch: Any, direction: Any) -> np.ndarray:
  """`<direction, grad loss_fn(params, batch)[i]>` from per-example gradients.

  The gradients come from a jitted `per_example_grads`; the dots are summed
  over leaves in float64 NumPy, so they add no rounding of their own.

  Args:
    loss_fn: per-example loss function.
    params: the parameters.
    batch: a batch of n examples.
    direction: a pytree shaped like `params`.

  Returns:
    A float64 NumPy array of shape (n,).
  """
  grads = jax.jit(per_example_grads, static_argnums=0)(loss_fn, params, batch)
  return sum(
      np.tensordot(np.asarray(g, np.float64), np.asarray(d, np.float64),
                   np.ndim(d))
      for g, d in zip(jax.tree_util.tree_leaves(grads),
                      jax.tree_util.tree_leaves(direction)))
