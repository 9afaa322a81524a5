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
