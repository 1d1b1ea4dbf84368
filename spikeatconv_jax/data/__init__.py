"""Input pipelines: tfds + tf.data on the host, global jax.Arrays out (see pipeline.py)."""

import os

# Set before TensorFlow is first imported, anywhere below.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
