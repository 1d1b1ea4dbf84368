"""Command-line plumbing shared by train.py and eval.py: one-line flag errors, multi-host
start-up, and a console that shows the run's own lines while the libraries' INFO goes to a log
file in the workdir."""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Mapping

from absl import app, flags, logging

# What a Cloud TPU VM's metadata server lists for its slice: one entry per host.
_METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints"


@dataclasses.dataclass(frozen=True)
class DistributedStart:
  """Whether and how to call `jax.distributed.initialize`.

  Attributes:
    initialize: call it at all.
    kwargs: its arguments; empty means JAX's own cluster detection (TPU, SLURM, ...).
    why: what decided it, for the log.
  """

  initialize: bool
  kwargs: dict
  why: str


def _count(value: str | None) -> int:
  return len([v for v in (value or "").split(",") if v.strip()])


def _int(value: str | None, default: int) -> int:
  try:
    return int(value) if value not in (None, "") else default
  except ValueError:
    return default


def distributed_start(
  mode: str,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  env: Mapping[str, str],
  *,
  cloud_tpu_vm: bool,
  tpu_hosts: Callable[[], int | None],
) -> DistributedStart:
  """Decides the multi-host start-up from the flags, the environment and the platform.

  Args:
    mode: --distributed: "auto", "on" or "off".
    coordinator_address, num_processes, process_id: the manual-launch flags.
    env: the environment variables.
    cloud_tpu_vm: JAX found TPU chips and libtpu on this host (what JAX's own TPU cluster
      detection requires).
    tpu_hosts: the number of hosts in this TPU slice, from the VM's metadata server (None
      when unknown); only called on a Cloud TPU VM whose environment does not say.

  "auto" starts jax.distributed when the coordinator flags are given, in a SLURM job of more
  than one task, and on a TPU VM that is one host of a multi-host slice (a pod slice, a GKE
  multi-host node pool, or a multislice job). JAX then finds the coordinator and the process
  ids by itself.
  """
  if mode == "off":
    return DistributedStart(False, {}, "--distributed=off")
  if coordinator_address is not None:
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return DistributedStart(True, kwargs, "--coordinator_address")
  if mode == "on":
    return DistributedStart(True, {}, "--distributed=on")
  if "SLURM_JOB_ID" in env and _int(env.get("SLURM_NTASKS"), 1) > 1:
    return DistributedStart(True, {}, f"a SLURM job of {env['SLURM_NTASKS']} tasks")
  if not cloud_tpu_vm:
    return DistributedStart(False, {}, "a single host")
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _int(env.get("MEGASCALE_NUM_SLICES"), 1) > 1:
    return DistributedStart(True, {}, "a multislice TPU job")
  listed = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
  if listed is not None:
    hosts = _count(listed)
  elif env.get("TPU_SKIP_MDS_QUERY") is not None:
    hosts = None
  else:
    hosts = tpu_hosts()
  if hosts is not None and hosts > 1:
    return DistributedStart(True, {}, f"a TPU slice of {hosts} hosts")
  return DistributedStart(False, {}, "a single TPU host")


def tpu_hosts_from_metadata(timeout_s: float = 10.0) -> int | None:
  """The number of hosts of this Cloud TPU VM's slice, as its metadata server lists them (the
  list JAX's TPU cluster detection reads); None when the server does not answer."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
    _METADATA_URL.format(host=host), headers={"Metadata-Flavor": "Google"}
  )
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      return _count(response.read().decode())
  except OSError as e:
    logging.warning("cannot read the TPU slice's hosts from the metadata server: %s", e)
    return None


def _on_cloud_tpu_vm() -> bool:
  # Set when jax is imported, from the TPU chips on the PCI bus and libtpu; no backend starts.
  from jax._src import cloud_tpu_init

  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def init_distributed(mode: str, coordinator_address, num_processes, process_id) -> None:
  """Starts jax.distributed when asked to or when the environment is a multi-host one."""
  import jax

  start = distributed_start(
    mode,
    coordinator_address,
    num_processes,
    process_id,
    os.environ,
    cloud_tpu_vm=_on_cloud_tpu_vm(),
    tpu_hosts=tpu_hosts_from_metadata,
  )
  if not start.initialize:
    return
  # CPU collectives across processes need gloo (the CPU client has none by default). The
  # option only concerns the CPU client, and it must be set before any backend starts, so it
  # is set unconditionally (asking jax.default_backend() here would start the backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**start.kwargs)
  logging.info(
    "jax.distributed (%s): process %d of %d, %d local / %d global devices",
    start.why, jax.process_index(), jax.process_count(), jax.local_device_count(),
    jax.device_count(),
  )  # fmt: skip


class _RunLinesOnly(py_logging.Filter):
  """Lets through the records of this project's code (progress, evals, warnings) and WARNING
  or above from anything; the libraries' INFO (Orbax, tfds, absl) stays out of the console."""

  def __init__(self, roots: tuple[str, ...]):
    super().__init__()
    self.roots = roots

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(self.roots)


def log_file_path(workdir: str, program: str, process_index: int, process_count: int) -> str:
  """WORKDIR/<program>.log (<program>.<i>.log per process when there are several). A URL
  workdir (gs://...) cannot take an appended local file, so its log goes to the temp dir."""
  name = f"{program}.log" if process_count == 1 else f"{program}.{process_index}.log"
  if "://" in workdir:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", workdir).strip("_")
    return os.path.join(tempfile.gettempdir(), "spikeatconv_logs", safe, name)
  return os.path.join(os.path.abspath(workdir), name)


def quiet_console(verbosity_given: bool) -> None:
  """INFO logging; unless --verbosity was given, the console shows only this project's lines
  (and warnings from anything)."""
  if verbosity_given:
    return
  logging.set_verbosity(logging.INFO)  # the progress lines are INFO
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  roots = (package + os.sep, os.path.abspath(sys.argv[0]))
  logging.get_absl_handler().addFilter(_RunLinesOnly(roots))


def log_to_file(path: str) -> None:
  """Appends every log record at the current verbosity to `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = py_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  py_logging.getLogger().addHandler(handler)
  logging.info("the full log (library messages included) goes to %s", path)


def start(argv, flag_values) -> None:
  """Common start of train.py and eval.py: argument check, the console and the log file,
  multi-host initialisation, and TensorFlow kept off the accelerators."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_console(flag_values["verbosity"].present)
  init_distributed(
    flag_values.distributed,
    flag_values.coordinator_address,
    flag_values.num_processes,
    flag_values.process_id,
  )
  import jax

  program = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "run"
  log_to_file(log_file_path(flag_values.workdir, program, jax.process_index(), jax.process_count()))
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
