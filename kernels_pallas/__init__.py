"""Pallas GPU/TPU kernels. This package imports jax only, never jaxlab."""
