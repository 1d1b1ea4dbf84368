"""train.py / eval.py as processes: one-line flag errors, SIGTERM, two processes + eval.

The subprocesses share the persistent compilation cache of the other training tests
(tests/train_utils.py), so the nano program is compiled once per device layout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import train_utils

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


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


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
  steps = _checkpoint_steps(workdir)
  assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
  last_logged = max(json.loads(line)["step"] for line in open(metrics))
  assert steps[0] >= last_logged
  # Usable: eval.py restores it.
  out_json = os.path.join(root, "eval.json")
  r = _run(["eval.py", "--config", cfg, "--workdir", workdir, "--output", out_json], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(out_json))
  assert res["step"] == steps[0] and np.isfinite(res["loss"])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_single_process_eval(tmp_path):
  root = str(tmp_path)
  cfg = train_utils.write_config_file(root, total_steps=2, warmup_epochs=0.1)
  workdir = os.path.join(root, "run")
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
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=1200)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  assert "'data': 8" in outs[0]  # one global mesh over both processes' devices
  assert _checkpoint_steps(workdir) == [2]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # process 0 alone writes
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  # Single process, 8 devices: restores the 2-process checkpoint.
  out_json = os.path.join(root, "eval.json")
  r = _run(["eval.py", "--config", cfg, "--workdir", workdir, "--output", out_json], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(out_json))
  assert res["step"] == 2 and res["num_examples"] == final["eval"]["num_examples"] == 24
  # Same parameters, same eval data: the same accuracy as the distributed run's final eval.
  assert res["top1"] == final["eval"]["top1"]
  np.testing.assert_allclose(res["loss"], final["eval"]["loss"], rtol=1e-4)
