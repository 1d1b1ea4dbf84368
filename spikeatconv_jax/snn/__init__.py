"""Spiking core: spike function with surrogate gradients, multi-step LIF, SPK blocks.

Knows nothing of models, data or training.
"""

from spikeatconv_jax.snn.lif import lif_multistep, lif_multistep_reference, lif_multithreshold
from spikeatconv_jax.snn.spk import SPK, SPK_KINDS, collect_rates, make_spk
from spikeatconv_jax.snn.surrogate import SURROGATES, get_surrogate, spike, surrogate_grad

__all__ = [
  "SPK",
  "SPK_KINDS",
  "collect_rates",
  "SURROGATES",
  "get_surrogate",
  "lif_multistep",
  "lif_multistep_reference",
  "lif_multithreshold",
  "make_spk",
  "spike",
  "surrogate_grad",
]
