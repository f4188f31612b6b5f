"""jaxlab: ten research results as one JAX/Flax library with Pallas kernels."""

__version__ = "0.1.0"
