"""Local tfds builders (prepared from files on disk, never from the network)."""

from spikeatconv_jax.data.builders.fashion_mnist import DEFAULT_SOURCE_DIR, FashionMnistLocal

__all__ = ["DEFAULT_SOURCE_DIR", "FashionMnistLocal"]
