"""Benchmarks of rmsprop_jax against optax.rmsprop and torch.optim.RMSprop (run: python -m benchmarks.run)."""
