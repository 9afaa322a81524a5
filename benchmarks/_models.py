"""Models the benchmarks share."""

import flax.linen as nn


class MLP(nn.Module):
  """ReLU multilayer perceptron, 64-128-128-10 by default.

  Attributes:
    widths: hidden layer widths.
    num_classes: output logits.
  """

  widths: tuple[int, ...] = (128, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class Block(nn.Module):
  """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

  heads: int

  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
        nn.LayerNorm()(x), mask=mask)
    h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h))


class LM(nn.Module):
  """Causal byte-level transformer with logits tied to the embedding.

  Attributes:
    width: model width.
    depth: number of blocks.
    vocab: vocabulary size.
  """

  width: int = 256
  depth: int = 2
  vocab: int = 256

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width)
    x = embed(tokens)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(heads=4)(x, mask)
    return embed.attend(nn.LayerNorm()(x))
