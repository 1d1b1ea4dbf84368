"""TPU kernels written in Pallas (Mosaic): the "pallas_tpu" hook table of `layers.ops`.

Nothing here is imported by the models; `ops.get("pallas_tpu")` loads `table` on first use.
The kernels compile for TPU only; `interpret=True` runs them anywhere (the tests).
"""
