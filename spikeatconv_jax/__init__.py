"""spikeatconv_jax: SpikeAtConv spiking image classifiers in JAX/Flax."""

__version__ = "0.1.0"
