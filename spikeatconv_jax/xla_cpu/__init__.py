"""The XLA:CPU wing: everything that exists only to make XLA:CPU fast.

The model code (`models/`, `snn/`, `layers/`) calls a small hook table (`layers.ops`): dense
and conv products, LayerNorms, the depthwise conv and MBPL's spike merge, two "materialize"
points, and a few reductions. This package fills the "xla_cpu" table with forms that compute
the same values (same parameters, so checkpoints move between tables) and run fast on XLA:CPU:

  native.py    native depthwise conv kernels (XLA FFI, csrc/dwconv_cpu.cc, built with g++ on
               first use) and `fusion_barrier`, a no-op custom call XLA cannot fuse through
  dwconv.py    the shift-sum and Toeplitz-matmul depthwise forms, their cost model, and the
               choice between them and the native kernels (with benchmark overrides)
  products.py  dense/conv products with CPU-shaped weight gradients; reductions over a leading
               axis written as elementwise adds
  norms.py     LayerNorms with a backward that keeps only the input and row statistics
  barriers.py  `materialize` / `materialize_cotangent` as fusion barriers
  table.py     the table itself
  malloc.py    re-executes the entry points under tcmalloc (stdlib only; no jax import)

`config.model.kernels` chooses the table: "xla_cpu", "xla" (portable), or "auto" (this one when
the target devices are CPUs). Nothing here is imported until the "xla_cpu" table is first used,
and importing this package imports nothing (entry points import `malloc` before jax).
"""
