"""Runs an entry point (train.py, eval.py) with tfds' mock data: `python tests/mock_run.py
NUM_EXAMPLES SCRIPT ARGS...`. Every tfds split then has NUM_EXAMPLES random examples of the
dataset's own features, so the real command line runs without the dataset."""

import runpy
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
  num_examples, script = int(sys.argv[1]), sys.argv[2]
  sys.argv = sys.argv[2:]
  with tfds.testing.mock_data(num_examples=num_examples):
    runpy.run_path(script, run_name="__main__")
