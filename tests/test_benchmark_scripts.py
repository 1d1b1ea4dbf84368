"""The benchmark helpers that can run without their hardware: gpu.sh's checks, MFU arithmetic."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs.common import model_config
from spikeatconv_jax import energy

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_script_parses_and_refuses_a_cpu_backend():
  script = REPO / "benchmarks" / "gpu.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  env = dict(os.environ, PY=sys.executable, JAX_PLATFORMS="cpu")
  r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "not a GPU" in r.stderr, r.stderr


def test_train_flops_are_three_forward_passes():
  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  cfg = model_config(variant="nano", spk="sl", attention="sisa", num_classes=10, timesteps=2)
  cfg.attention.partition = 4
  gmacs = energy.report(cfg, 32)["dense_gmacs_per_step"]
  layers = bench.train_flops_by_layer(cfg, 32)
  assert sum(flops for _, flops in layers) == pytest.approx(6 * gmacs * 1e9 * 2)
  by_op = bench.flops_by_op(layers)
  assert sum(by_op.values()) == pytest.approx(6 * gmacs * 1e9 * 2)
  assert by_op["dwconv7x7"] > 0 and by_op["sisa attention"] > 0
  assert bench.matmul_peak_tflops("float32", n=128, repeats=2) > 0


def test_vs_timm_reads_the_last_matching_json_line():
  spec = importlib.util.spec_from_file_location("vs_timm", REPO / "benchmarks" / "vs_timm.py")
  vs_timm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(vs_timm)
  lines = ['row {"a": 1}', '{"benchmark": "model", "rows": [1]}', "table"]
  text = "\n".join(lines + ['{"benchmark": "model", "rows": []}'])
  assert vs_timm.last_json(text, '"benchmark": "model"') == {"benchmark": "model", "rows": []}
  with pytest.raises(RuntimeError, match="no JSON line"):
    vs_timm.last_json("nothing here", '"bench": "timm_train_step"')


@pytest.mark.parametrize("interleave", [True, False])
def test_model_benchmark_interleaves_settings(interleave):
  import argparse

  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  calls = []

  def fn(name):
    return lambda: calls.append(name) or 0

  settings = [({"batch": 4}, {"fwd": fn("a.fwd"), "train": fn("a.train")})]
  settings.append(({"batch": 4}, {"fwd": fn("b.fwd"), "train": fn("b.train")}))
  args = argparse.Namespace(repeats=2, interleave=interleave, mfu=False)
  rows = bench.measure(args, settings)
  one_round = ["a.fwd", "a.train", "b.fwd", "b.train"]
  if interleave:
    assert calls == one_round * 2
  else:
    assert calls == ["a.fwd", "a.fwd", "a.train", "a.train", "b.fwd", "b.fwd", "b.train", "b.train"]
  assert [len(r["train_step_s"]) for r in rows] == [2, 2]
  assert all(r["train_img_s"] > 0 and r["fwd_img_s"] > 0 for r in rows)


def test_model_benchmark_train_only_times_only_the_train_step():
  """--train-only (gpu.sh): no forward program is built or timed; its columns stay empty."""
  import argparse

  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  args = argparse.Namespace(
    variant="nano", timesteps="1", nets="none/softmax", image_size=None, partition=None,
    batch=2, classes=10, dtype="float32", remat=False, scan_blocks=False, repeats=2,
    interleave=False, compile_only=False, train_only=True, mfu=False, peak_tflops=None,
  )  # fmt: skip
  row, fns = bench.prepare_setting(args, 1, "none/softmax")
  assert sorted(fns) == ["train"]
  (row,) = bench.measure(args, [(row, fns)])
  assert row["fwd_img_s"] is None and row["fwd_compile_s"] is None
  assert row["train_img_s"] > 0 and row["train_compile_s"] > 0 and len(row["train_step_s"]) == 2


def test_top_ops_sums_hlo_ops_on_device_tracks():
  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  meta = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
  ]
  x = lambda pid, name, dur, op=None: dict(ph="X", pid=pid, name=name, dur=dur, args={"hlo_op": op})
  events = meta + [
    x(1, "host_fusion", 9000.0, "fusion.1"),  # host track: ignored once device tracks exist
    x(2, "kernel_a", 1000.0, "fusion.2"),
    x(2, "kernel_b", 500.0, "fusion.2"),
    x(2, "kernel_c", 2000.0, "convolution.7"),
    x(2, "memcpy", 300.0),  # names no HLO op
    x(2, "kernel_d", 250.0, "fusion.3"),
  ]
  got = bench.top_ops(events, top=2)
  assert got["tracks"] == "device" and got["total_ms"] == 3.75
  assert got["ops"] == [["convolution.7", 2.0, 1], ["fusion.2", 1.5, 2]]
  assert got["kinds"] == [["convolution", 2.0, 1], ["fusion", 1.75, 3]]
  assert got["custom_calls"] == []
  # XLA:CPU: no device tracks; the ops run on host threads, Python frames are not ops.
  cpu = [x(1, "$api.py:1 f", 50.0), x(1, "ynn_fusion", 100.0, "ynn_fusion.4")]
  assert bench.top_ops(cpu, top=5)["ops"] == [["ynn_fusion.4", 0.1, 1]]
  # Custom calls are summed per target, all of them (not cut to `top`).
  cpu += [x(1, "ffi_call.1", 300.0, "ffi_call.1"), x(1, "ffi_call.2", 200.0, "ffi_call.2")]
  cpu += [x(1, "ffi_call.3", 400.0, "ffi_call.3")]
  targets = {"ffi_call.1": "fwd", "ffi_call.2": "fwd", "ffi_call.3": "bwd"}
  got = bench.top_ops(cpu, top=1, targets=targets)
  assert got["custom_calls"] == [["fwd", 0.5, 2], ["bwd", 0.4, 1]]


def test_custom_call_targets_names_the_native_depthwise_kernels():
  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  from spikeatconv_jax.xla_cpu import native

  x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((7, 7, 16, 1))
  loss = lambda x, k: native.depthwise_conv2d_native(x, k).sum()
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, k).compile().as_text()
  targets = bench.custom_call_targets(hlo)
  assert set(native.KERNEL_TARGETS) <= set(targets.values())
  for name in targets:  # each maps back to its defining line
    assert re.search(rf"%?{re.escape(name)} = .*custom-call\(", hlo)


def test_model_benchmark_keeps_timings_when_profiling_fails(monkeypatch):
  import argparse

  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)

  def no_profiler(fn, top, targets=None):
    raise RuntimeError("no CUPTI")

  monkeypatch.setattr(bench, "profile_step", no_profiler)
  args = argparse.Namespace(repeats=2, interleave=False, mfu=False, profile_top=5)
  (row,) = bench.measure(args, [({"batch": 4}, {"train": lambda: 0})])
  assert row["train_img_s"] > 0 and row["train_profile_error"] == "RuntimeError: no CUPTI"
  assert "train_profile" not in row


def test_model_benchmark_gives_the_native_kernels_rate_only_when_all_depthwise_convs_ran_them(
  monkeypatch,
):
  import argparse

  spec = importlib.util.spec_from_file_location("bench_model", REPO / "benchmarks" / "model.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  fwd, bwd_input, bwd_kernel = bench.native.KERNEL_TARGETS
  calls = [[fwd, 10.0, 2], [bwd_input, 20.0, 2], [bwd_kernel, 30.0, 2], ["barrier", 5.0, 9]]
  monkeypatch.setattr(bench, "profile_step", lambda fn, top, targets=None: {"custom_calls": calls})
  args = argparse.Namespace(repeats=1, interleave=False, mfu=True, profile_top=3, peak_tflops=1.0)

  def row(layers):
    by_op = {"dwconv7x7": 0.004, "linear": 0.006}  # TFLOP per image
    return dict(
      batch=2, train_tflops_per_image=0.01, train_tflops_per_image_by_op=by_op,
      dwconv7x7_layers=layers,
    )  # fmt: skip

  (got,) = bench.measure(args, [(row(2), {"train": lambda: 0})])
  assert got["native_dwconv_ms"] == 60.0  # the three kernels, not the barrier
  assert got["native_dwconv_tflops_s"] == pytest.approx(2 * 0.004 / 0.060)
  # Three depthwise layers but two forward calls: one ran elsewhere, so no rate.
  (got,) = bench.measure(args, [(row(3), {"train": lambda: 0})])
  assert "native_dwconv_ms" not in got and "native_dwconv_tflops_s" not in got


@pytest.mark.slow
def test_sharded_step_benchmark_runs_the_custom_calls_without_gathering():
  # The real train step on 2 host devices; the native depthwise calls are partitioned, so the
  # compiled step holds no all-gather (with --gather it would hold one per custom call operand).
  script = REPO / "benchmarks" / "sharded_step.py"
  cmd = [sys.executable, str(script), "--devices", "2", "--batch", "8", "--repeats", "1"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  row = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
  assert row["devices"] == 2 and row["partition_rule"] and row["dwconv"] == "native"
  assert row["all_gathers"] == 0 and row["step_ms"] > 0


def test_lif_benchmark_times_a_git_revision_alongside():
  """`benchmarks/lif.py --against REV` times lif.py at REV alternated with today's and reports
  the ratio; an unknown revision stops with git's one-line reason."""
  script = [sys.executable, str(REPO / "benchmarks" / "lif.py")]
  small = ["--timesteps", "1,2", "--dtypes", "float32", "--shape", "1,4,4,8", "--repeats", "2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    script + small + ["--warmup", "1", "--against", "HEAD"],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["against"] == "HEAD" and len(result["results"]) == 4
  for row in result["results"]:
    assert row["baseline_ms"] > 0
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ms"])
  assert "HEAD ms" in r.stdout and "speedup" in r.stdout
  bad = subprocess.run(
    script + small + ["--against", "no-such-revision"],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode != 0 and "--against no-such-revision" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_tpu_parts_cover_every_block_of_the_model():
  # benchmarks/tpu_parts.py: each stage's entry branch once, the other branches, attentions and
  # FFNs as often as the model has them, on the maps the model feeds them (no compile here).
  spec = importlib.util.spec_from_file_location("tpu_parts", REPO / "benchmarks" / "tpu_parts.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  cfg = model_config(variant="tiny", spk="mbpl", attention="sisa")
  parts = {name: (shape, count) for name, _, shape, count in bench.parts(cfg, 224, 8)}
  depths = (1, 3, 6, 1)
  assert parts["stem"] == ((8, 224, 224, 3), 1)
  assert parts["s0.entry"] == ((1, 8, 112, 112, 64), 1)
  assert parts["s2.conv"] == ((1, 8, 14, 14, 256), 5) and "s0.conv" not in parts
  for s, d in enumerate(depths):
    assert parts[f"s{s}.attn"][1] == parts[f"s{s}.ffn"][1] == d
    assert parts[f"s{s}.entry"][1] + parts.get(f"s{s}.conv", (None, 0))[1] == d
