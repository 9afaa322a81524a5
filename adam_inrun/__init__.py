"""adam_inrun: optimizer-aware In-Run Data Shapley for JAX, Optax and Flax."""

from adam_inrun.ghost import coverage
from adam_inrun.ghost import ghost_dots

__version__ = '0.1.0'
