"""The "xla_cpu" hook table (`layers.ops`), loaded by `ops.get("xla_cpu")` on first use."""

from __future__ import annotations

from spikeatconv_jax.layers.ops import Ops
from spikeatconv_jax.xla_cpu import barriers, dwconv, norms, products

TABLE = Ops(
  name="xla_cpu",
  dense_dot_general=products.dense_dot_general,
  conv_general_dilated=products.conv_general_dilated,
  layer_norm=norms.CPULayerNorm,
  scaled_layer_norm=norms.CPUScaledLayerNorm,
  depthwise_conv2d=dwconv.depthwise_conv2d,
  spike_merge_conv=dwconv.spike_merge_conv,
  materialize=barriers.materialize,
  materialize_cotangent=barriers.materialize_cotangent,
  sum_leading=products.sum_leading,
  repeat_time=products.repeat_time,
  add_broadcast=products.add_broadcast,
)
