"""spikeatconv_jax: SpikeAtConv spiking image classifiers in JAX/Flax."""

__version__ = "0.1.0"


def load(path, step=None, **kwargs):
  """Loads a trained model: `model, variables, config, step = spikeatconv_jax.load(workdir)`.

  See `spikeatconv_jax.inference.load` (imported on first use: Orbax loads only then).
  """
  from spikeatconv_jax import inference

  return inference.load(path, step, **kwargs)
