"""Command-line plumbing shared by train.py and eval.py: one-line flag errors, multi-host init."""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging


def _cluster_detected() -> bool:
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_JOB_ID" in os.environ:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def init_distributed(mode: str, coordinator_address, num_processes, process_id) -> None:
  """Starts jax.distributed when asked to or when the environment is a multi-host one."""
  import jax

  manual = coordinator_address is not None
  if mode == "off" or (mode == "auto" and not manual and not _cluster_detected()):
    return
  # CPU collectives across processes need gloo (the CPU client has none by default). The
  # option only concerns the CPU client, and it must be set before any backend starts, so it
  # is set unconditionally (asking jax.default_backend() here would start the backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if manual:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
  else:
    jax.distributed.initialize()
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )  # fmt: skip


def start(argv, flag_values) -> None:
  """Common start of train.py and eval.py: argument check, INFO logging unless
  --verbosity was given, multi-host initialisation, and TensorFlow kept off the accelerators."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flag_values["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # the progress lines are INFO
  init_distributed(
    flag_values.distributed,
    flag_values.coordinator_address,
    flag_values.num_processes,
    flag_values.process_id,
  )
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # keep tf.data off the accelerators


def one_line(e: BaseException) -> str:
  """The gist of a flags/config error on one line: its first line, plus the final cause when
  the message embeds a traceback (config files that raise while being parsed)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  if len(lines) > 1 and "Traceback" in str(e):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines).replace("\\n", " ")


def unknown_field(e: BaseException) -> str:
  # ml_collections raises AttributeError/KeyError("'name'\nDid you mean ...") for an override
  # of a field the config does not have.
  text = str(e.args[0]) if e.args else str(e)
  found = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
  name = found.group(0) if found else text
  hint = re.search(r"Did you mean [^?]*\?", text)
  overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
  where = next((o for o in overrides if o.split(".")[-1] == name), f"--config...{name}")
  return f"unknown config field {where}" + (f" ({hint.group(0)})" if hint else "")


def run(main_fn) -> None:
  """`app.run(main_fn)` with config-flag errors turned into one-line messages.

  A bad `--config.x=...` (unknown field, wrong type) or a config file that rejects its arg is
  printed as one line naming the field, and the process exits 1 before jax is imported.
  """
  try:
    argv = flags.FLAGS(sys.argv)
  except flags.Error as e:
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    print(f"error: {unknown_field(e)}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (ValueError, TypeError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(1)
  app.run(main_fn, argv=argv)
