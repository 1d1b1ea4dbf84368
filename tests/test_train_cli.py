"""train.py / eval.py: one-line flag errors, the multi-host start-up decision, SIGTERM and a
quiet console, two processes + eval.

The subprocesses share the persistent compilation cache of the other training tests
(tests/train_utils.py), so the nano program is compiled once per device layout.
"""

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import train_utils

from spikeatconv_jax.train import cli

PY = sys.executable


def _run(args, timeout=120, **kw):
  return subprocess.run(
    [PY, *args],
    cwd=train_utils.REPO,
    env=kw.pop("env", train_utils.subprocess_env()),
    capture_output=True,
    text=True,
    timeout=timeout,
    **kw,
  )


@pytest.mark.parametrize(
  "override, expected",
  [
    ("--config.nonexistent=1", "error: unknown config field --config.nonexistent"),
    ("--config.model.spk.kindd=sl", "error: unknown config field --config.model.spk.kindd"),
    ("--config.lr=abc", "error: flag --config.lr=abc: could not convert string to float"),
  ],
)
def test_bad_override_is_a_one_line_error(tmp_path, override, expected):
  r = _run(
    ["train.py", "--config", "configs/default.py:runlocal=1", "--workdir", str(tmp_path), override]
  )
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith(expected), r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_bad_config_arg_is_a_one_line_error(tmp_path):
  r = _run(["train.py", "--config", "configs/default.py:runlocl=1", "--workdir", str(tmp_path)])
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
  assert "unknown config-string key 'runlocl'" in lines[0]


def _start(mode="auto", flags=(None, None, None), env=None, tpu=False, hosts=None):
  def tpu_hosts():
    if hosts is None:
      raise AssertionError("the metadata server must not be asked")
    return hosts

  return cli.distributed_start(mode, *flags, env or {}, cloud_tpu_vm=tpu, tpu_hosts=tpu_hosts)


def test_distributed_start_from_flags_and_environment():
  manual = ("10.0.0.1:1234", 2, 1)
  assert not _start().initialize  # a laptop, a single GPU box
  assert not _start("off", manual).initialize
  start = _start(flags=manual)
  assert start.initialize and start.kwargs == {
    "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1
  }  # fmt: skip
  assert _start("on") == cli.DistributedStart(True, {}, "--distributed=on")
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
  assert _start(env=slurm).initialize and _start(env=slurm).kwargs == {}
  assert not _start(env=dict(slurm, SLURM_NTASKS="1")).initialize
  # TPU variables on a host without TPU chips: JAX could not use them, so nothing starts.
  assert not _start(env={"TPU_WORKER_HOSTNAMES": "a,b"}).initialize


def test_distributed_start_on_a_cloud_tpu_vm():
  # A plain Cloud TPU VM sets no cluster variables: the metadata server lists the slice.
  assert _start(tpu=True, hosts=4) == cli.DistributedStart(True, {}, "a TPU slice of 4 hosts")
  assert not _start(tpu=True, hosts=1).initialize  # a single-host slice (v4-8, v5e-8)
  assert not _start(tpu=True, hosts=0).initialize
  # GKE and multislice jobs say it in the environment; the metadata server is not asked.
  assert _start(env={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, tpu=True).initialize
  assert not _start(env={"TPU_WORKER_HOSTNAMES": "localhost"}, tpu=True).initialize
  assert _start(env={"TPU_PROCESS_ADDRESSES": "h0:8476,h1:8476"}, tpu=True).initialize
  assert _start(env={"MEGASCALE_NUM_SLICES": "2"}, tpu=True).initialize
  assert _start(env={"MEGASCALE_COORDINATOR_ADDRESS": "h0"}, tpu=True).initialize
  assert not _start(env={"TPU_SKIP_MDS_QUERY": "1"}, tpu=True).initialize
  assert not _start("off", tpu=True, hosts=4).initialize


class _Metadata(http.server.BaseHTTPRequestHandler):
  def do_GET(self):
    ok = self.headers.get("Metadata-Flavor") == "Google" and self.path.endswith(
      "/attributes/worker-network-endpoints"
    )
    body = b"t1v-n-0:0:10.0.0.2,t1v-n-1:1:10.0.0.3,t1v-n-2:2:10.0.0.4" if ok else b""
    self.send_response(200 if ok else 404)
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


def test_tpu_hosts_from_a_metadata_server(monkeypatch):
  server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    assert cli.tpu_hosts_from_metadata() == 3
  finally:
    server.shutdown()
  monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{_free_port()}")  # nothing listens
  assert cli.tpu_hosts_from_metadata(timeout_s=2) is None


def test_log_file_path():
  assert cli.log_file_path("/runs/a", "train", 0, 1) == "/runs/a/train.log"
  assert cli.log_file_path("/runs/a", "train", 1, 4) == "/runs/a/train.1.log"
  path = cli.log_file_path("gs://bucket/run", "eval", 0, 1)
  assert not path.startswith("gs:") and path.endswith(os.path.join("gs_bucket_run", "eval.log"))


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


# A Python log line in absl's format: "I1205 03:34:29.537083 139794772490176 reader.py:262] ...".
_INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] ")
_PACKAGE = os.path.join(train_utils.REPO, "spikeatconv_jax")
_PROJECT_FILES = {"train.py", "eval.py"} | {n for _, _, names in os.walk(_PACKAGE) for n in names}


def _check_quiet_console(console: str, log_file: str):
  """The console holds the run's own INFO lines only; the log file holds the libraries' too."""
  sources = {m.group(1) for m in map(_INFO_LINE.match, console.splitlines()) if m}
  assert sources and sources <= _PROJECT_FILES, sources - _PROJECT_FILES
  with open(log_file) as f:
    logged = f.read()
  libraries = {m.group(1) for m in map(_INFO_LINE.match, logged.splitlines()) if m}
  assert libraries - _PROJECT_FILES, libraries  # e.g. Orbax's checkpoint_manager.py, tfds
  for chatter in ("CheckpointManagerOptions", "tf.data.Dataset"):
    assert chatter not in console and chatter in logged, chatter
  assert sources <= libraries  # the run's own lines are in the file as well


@pytest.mark.slow
def test_sigterm_saves_a_usable_checkpoint(tmp_path):
  root = str(tmp_path)
  cfg = train_utils.write_config_file(root, total_steps=1000, checkpoint_every_steps=1000)
  workdir = os.path.join(root, "run")
  proc = subprocess.Popen(
    [PY, "train.py", "--config", cfg, "--workdir", workdir],
    cwd=train_utils.REPO,
    env=train_utils.subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 900
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        break
      time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  assert "stopped at step" in out
  _check_quiet_console(out, os.path.join(workdir, "train.log"))
  steps = _checkpoint_steps(workdir)
  assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
  last_logged = max(json.loads(line)["step"] for line in open(metrics))
  assert steps[0] >= last_logged
  # Usable: eval.py restores it.
  out_json = os.path.join(root, "eval.json")
  r = _run(["eval.py", "--config", cfg, "--workdir", workdir, "--output", out_json], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  _check_quiet_console(r.stderr + r.stdout, os.path.join(workdir, "eval.log"))
  res = json.load(open(out_json))
  assert res["step"] == steps[0] and np.isfinite(res["loss"])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


TWO_PROCESS_STEPS = 16


def _two_processes(cfg, workdir, on_start=None):
  """train.py as two processes of 4 CPU devices each (gloo collectives); `on_start(procs)` runs
  while they train. Returns their outputs once both have exited."""
  port = _free_port()
  env = train_utils.subprocess_env(num_devices=4)
  procs = [
    subprocess.Popen(
      [
        PY,
        "train.py",
        "--config",
        cfg,
        "--workdir",
        workdir,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=train_utils.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  try:
    if on_start is not None:
      on_start(procs)
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  return outs


def _two_process_config(root):
  return train_utils.write_config_file(
    root, total_steps=TWO_PROCESS_STEPS, warmup_epochs=0.1, checkpoint_every_steps=1000
  )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """An uninterrupted two-process run of TWO_PROCESS_STEPS steps."""
  root = str(tmp_path_factory.mktemp("two"))
  workdir = os.path.join(root, "run")
  outs = _two_processes(_two_process_config(root), workdir)
  return root, workdir, outs


def _train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_and_single_process_eval(two_process_run):
  root, workdir, outs = two_process_run
  cfg = _two_process_config(root)
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  assert "'data': 8" in outs[0]  # one global mesh over both processes' devices
  assert _checkpoint_steps(workdir) == [TWO_PROCESS_STEPS]
  steps = [r["step"] for r in _train_rows(workdir)]
  assert steps == list(range(1, TWO_PROCESS_STEPS + 1))  # process 0 alone writes
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  # Single process, 8 devices: restores the 2-process checkpoint.
  out_json = os.path.join(root, "eval.json")
  r = _run(["eval.py", "--config", cfg, "--workdir", workdir, "--output", out_json], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(out_json))
  assert res["step"] == TWO_PROCESS_STEPS and res["num_examples"] == 24
  assert res["num_examples"] == final["eval"]["num_examples"]
  # Same parameters, same eval data: the same accuracy as the distributed run's final eval.
  assert res["top1"] == final["eval"]["top1"]
  np.testing.assert_allclose(res["loss"], final["eval"]["loss"], rtol=1e-4)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, two_process_run):
  """JAX's preemption notice: SIGTERM reaches process 1 only; both save the same step and exit
  0, and the resumed run retraces the uninterrupted one."""
  root, straight, _ = two_process_run
  cfg = _two_process_config(root)
  workdir = str(tmp_path / "preempted")
  metrics = os.path.join(workdir, "metrics.jsonl")

  def preempt_process_1(procs):
    deadline = time.time() + 900
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
        break
      time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "the run ended before the signal"
    procs[1].send_signal(signal.SIGTERM)

  outs = _two_processes(cfg, workdir, preempt_process_1)
  stops = [re.search(r"stopped at step (\d+) \(([^)]*)\)", out) for out in outs]
  assert all(stops), [out[-3000:] for out in outs]
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step < TWO_PROCESS_STEPS
  assert stops[0].group(2) == stops[1].group(2) == "preemption notice"
  assert _checkpoint_steps(workdir) == [step]  # the one save, written by both processes

  _two_processes(cfg, workdir)  # resume to the end
  rows, reference = _train_rows(workdir), _train_rows(straight)
  assert [r["step"] for r in rows] == [r["step"] for r in reference]
  assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  expected = json.load(open(os.path.join(straight, "final_metrics.json")))
  assert final["eval"]["loss"] == expected["eval"]["loss"]
  assert final["eval"]["top1"] == expected["eval"]["top1"]
