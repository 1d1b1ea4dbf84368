"""The "pallas_tpu" hook table (`layers.ops`): what TPUs run. The portable table with

- MBPL's merge conv as Pallas TPU kernels (`pallas_tpu.merge`), and at T = 1 fused with the
  LIF before it (`lif_spike_merge`: the kernels make the spikes from the LIF input), and with
  the merge's LayerNorm and the spike count after it as well (`lif_merge_norm`,
  `pallas_tpu.merge_norm`) where a whole map fits VMEM;
- the depthwise conv with a channel multiplier (stage entries) as one depthwise conv per
  multiplier (`dwconv.depthwise_conv2d_per_multiplier`);
- `materialize` / `materialize_cotangent` / `materialize_heads` as `lax.optimization_barrier`s
  (`pallas_tpu.hold`).

Loaded by `ops.get("pallas_tpu")` on first use.
"""

from __future__ import annotations

import dataclasses

from spikeatconv_jax.layers import dwconv, ops
from spikeatconv_jax.pallas_tpu import hold, merge, merge_norm

TABLE = dataclasses.replace(
  ops.get("xla"),
  name="pallas_tpu",
  spike_merge_conv=merge.spike_merge_conv,
  lif_spike_merge=merge.lif_spike_merge,
  lif_merge_norm=merge_norm.lif_merge_norm,
  depthwise_conv2d=dwconv.depthwise_conv2d_per_multiplier,
  materialize=hold.materialize,
  materialize_cotangent=hold.materialize_cotangent,
  materialize_heads=hold.materialize,
)
