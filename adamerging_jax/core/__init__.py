"""The model- and data-agnostic core: pytrees and jax only."""
