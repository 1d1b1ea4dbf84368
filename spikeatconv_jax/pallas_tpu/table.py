"""The "pallas_tpu" hook table (`layers.ops`): the portable table with MBPL's merge conv as
Pallas TPU kernels (`pallas_tpu.merge`). Loaded by `ops.get("pallas_tpu")` on first use."""

from __future__ import annotations

import dataclasses

from spikeatconv_jax.layers import ops
from spikeatconv_jax.pallas_tpu import merge

TABLE = dataclasses.replace(
  ops.get("xla"), name="pallas_tpu", spike_merge_conv=merge.spike_merge_conv
)
