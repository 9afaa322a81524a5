"""adam_inrun: optimizer-aware In-Run Data Shapley for JAX, Optax and Flax."""
