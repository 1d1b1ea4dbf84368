"""scripts/compile_tpu.py: the train and eval steps compiled by XLA:TPU on this host (libtpu)."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from spikeatconv_jax import hardware

REPO = pathlib.Path(__file__).resolve().parent.parent

_HLO = """\
HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0.1: bf16[8,16]) -> bf16[16,8] {
  %param_0.1 = bf16[8,16]{1,0} parameter(0)
  ROOT %transpose.3 = bf16[16,8]{1,0} transpose(bf16[8,16]{1,0} %param_0.1), dimensions={1,0}
}

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element((s32[], bf16[8,16]{1,0}) %p), index=1
  %fusion.1 = bf16[16,8]{1,0} fusion(bf16[8,16]{1,0} %x), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/stage1/t"}
  %conv = bf16[8,16]{1,0} convolution(bf16[8,16]{1,0} %x, bf16[8,16]{1,0} %x), window={size=1}, dim_labels=bf_io->bf, batch_group_count=4
  %ar = f32[4]{0} all-reduce-start(f32[4]{0} %y), replica_groups={}, to_apply=%add
  %cc = bf16[8,16]{1,0} custom-call(bf16[8,16]{1,0} %x), custom_call_target="ConcatBitcast"
  ROOT %t = (s32[], bf16[8,16]{1,0}) tuple(s32[] %i, bf16[8,16]{1,0} %x)
}

ENTRY %main.9 () -> f32[] {
  %init = (s32[], bf16[8,16]{1,0}) tuple(s32[] %c, bf16[8,16]{1,0} %z)
  %w = (s32[], bf16[8,16]{1,0}) while((s32[], bf16[8,16]{1,0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[] constant(0)
}
"""  # noqa: E501


def test_census_counts_ops_in_every_computation():
  c = hardware.census(_HLO)
  assert c["transposes"] == 1 and c["convolutions"] == 1
  assert c["convolutions_batch_group"] == 1 and c["convolutions_feature_group"] == 0
  assert c["custom_calls"] == {"ConcatBitcast": 1}
  assert c["collectives"]["all-reduce"] == 1 and c["while_loops"] == 1 and c["fusions"] == 1


_TPU_LOOP = """\
HloModule jit_scan

%cond.5 (arg: (s32[], bf16[8])) -> pred[] {
  %constant.94 = s32[]{:T(128)} constant(5)
  %arg = (s32[]{:T(128)}, bf16[8]{0}) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element((s32[]{:T(128)}, bf16[8]{0}) %arg), index=0
  ROOT %lt.7 = pred[]{:T(512)} compare(%gte, %constant.94), direction=LT, metadata={op_name="w"}
}

%body.4 (arg: (s32[], bf16[8])) -> (s32[], bf16[8]) {
  %arg = (s32[]{:T(128)}, bf16[8]{0}) parameter(0)
  %y = bf16[8]{0} get-tuple-element((s32[]{:T(128)}, bf16[8]{0}) %arg), index=1
  %e = bf16[8]{0} exponential(bf16[8]{0} %y)
  ROOT %t = (s32[], bf16[8]{0}) tuple(s32[] %i, bf16[8]{0} %e)
}

ENTRY %main () -> f32[] {
  %w = (s32[]{:T(128)}, bf16[8]{0}) while((s32[], bf16[8]{0}) %init), condition=%cond.5, body=%body.4
  ROOT %r = f32[] constant(0)
}
"""  # noqa: E501


def test_loop_trip_counts_read_a_counter_condition():
  # XLA:TPU's optimized scans carry no known_trip_count: the condition is `i < 5`.
  assert hardware.loop_trip_counts(_TPU_LOOP) == [5]
  assert hardware.top_ops(_TPU_LOOP, 1)[0]["trips"] == 5


def test_loop_trip_counts_list_every_while_loop():
  # XLA's cost analysis counts this body once though it runs three times.
  assert hardware.loop_trip_counts(_HLO) == [3]
  assert hardware.loop_trip_counts(
    _HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  ) == [0]


def test_top_ops_multiply_bytes_by_the_loop_trip_count():
  top = hardware.top_ops(_HLO, 10)
  fusion = next(r for r in top if r["op"] == "fusion:kLoop")
  # bf16[16,8] result + bf16[8,16] operand = 512 bytes, three trips of the loop body.
  assert fusion["bytes"] == 3 * 512 and fusion["trips"] == 3
  assert fusion["source"] == "jit(step)/stage1/t"
  assert top[0]["op"] == "convolution" and top[0]["bytes"] == 3 * 768
  assert all(r["name"] != "transpose.3" for r in top)  # inside a fusion, not top-level


# XLA:TPU's own text: operands by name only, memory spaces in the layouts (S(1): VMEM).
_TPU_SPACES = """\
HloModule jit_step

ENTRY %main (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0:T(1024)} parameter(0)
  %cs = (f32[1024]{0:T(1024)S(1)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%p)
  %cd = f32[1024]{0:T(1024)S(1)} copy-done(%cs)
  %ss = ((f32[1024]{0:T(1024)}), f32[256]{0:T(256)S(1)}, s32[]{:S(2)}) slice-start(%p), slice={[0:256]}
  %sd = f32[256]{0:T(256)S(1)} slice-done(%ss)
  %f = bf16[1024]{0:T(1024)S(1)} fusion(%cd), kind=kLoop, calls=%fused
  ROOT %g = f32[1024]{0:T(1024)} fusion(%f, %p), kind=kLoop, calls=%fused.2
}
"""  # noqa: E501


def test_bytes_by_memory_space_read_the_layouts():
  got = hardware.bytes_by_memory_space(_TPU_SPACES)
  # copy-start: its 4 KiB HBM source and 4 KiB VMEM destination (4 bytes of context: other);
  # slice-start: the 1 KiB slice read from HBM and written to VMEM (not its whole source);
  # %f reads 4 KiB of VMEM, writes 2 KiB of VMEM; %g reads 2 KiB VMEM + 4 KiB HBM, writes 4 KiB.
  hbm = 4096 + 1024 + 4096 + 4096
  assert got == {"hbm": hbm, "vmem": 4096 + 1024 + 4096 + 2048 + 2048, "other": 4 + 4}
  top = {r["name"]: r["bytes"] for r in hardware.top_ops(_TPU_SPACES, 5)}
  assert top["g"] == 4096 + 2048 + 4096  # operands found by name


@pytest.mark.parametrize(
  "name, chips", [("v5e:2x2", 4), ("v5e:16x16", 256), ("v4:2x2x1", 4), ("v6e:1x1", 1)]
)
def test_topology_names(name, chips):
  assert hardware.num_chips(name) == chips


@pytest.mark.parametrize("name", ["v5e", "v9:2x2", "v5e:2x", "v5e:0x2", "tpu:2x2"])
def test_bad_topology_names_are_rejected(name):
  with pytest.raises(ValueError, match="topology"):
    hardware.parse_topology(name)


def test_chip_table_has_the_figures_and_their_sources():
  for gen, chip in hardware.CHIPS.items():
    assert chip.generation == gen and chip.source.startswith("https://cloud.google.com/tpu/docs/")
    assert chip.peak_bf16_flops > 1e14 and chip.hbm_bytes_per_s > 5e11 and chip.hbm_bytes >= 2**34


@pytest.mark.slow
def test_compiles_nano_for_one_v5e_chip(tmp_path):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -r requirements-tpu.txt)")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["TPU_SKIP_MDS_QUERY"] = "1"
  hlo_dir = tmp_path / "hlo"
  cmd = [
    sys.executable, str(REPO / "scripts" / "compile_tpu.py"),
    "--config", "configs/default.py", "--topology", "v5e:1x1", "--global_batch", "2",
    "--top_fusions", "3", "--dump_hlo", str(hlo_dir), "--compare", "spike-free",
    "--config.model.spk.mbpl_merge=dwconv",  # the paper's merge: the Pallas kernels
  ]  # fmt: skip
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["topology"] == "v5e:1x1" and result["chips"] == 1
  assert result["chip"]["generation"] == "v5e" and "TPU v5" in result["device_kind"]
  program, twin = result["programs"]  # the twin compiled in a child process of its own
  assert twin["name"] == "spike-free" and twin["kernels"] == "pallas_tpu" and twin["params"] > 0
  ratios = result["ratios"]["spike-free"]
  for key in ("flops_per_image", "bytes_per_image"):
    want = program["train"][key] / twin["train"][key]
    assert ratios[key] == pytest.approx(want, rel=2e-3) and want > 1
  assert "configs/default.py / spike-free (train)" in r.stdout
  assert program["mesh"] == {"data": 1, "fsdp": 1} and program["images_per_chip"] == 2
  # The TPU table (portable forms plus the Pallas merge), not the XLA:CPU wing's.
  assert program["kernels"] == "pallas_tpu"
  for kind in ("train", "eval"):
    step = program[kind]
    hbm = step["hbm"]
    assert hbm["fits"] and hbm["arguments_bytes"] > 0 and hbm["temporaries_bytes"] > 0
    assert hbm["total_bytes"] >= hbm["temporaries_bytes"]
    assert step["flops_per_image"] > 1e6 and step["bytes_per_image"] > 1e5
    spaces = step["bytes_per_image_by_space"]
    assert spaces["hbm"] > 0 and spaces["vmem"] >= 0 and set(spaces) == {"hbm", "vmem", "other"}
    assert step["roofline_step_s"] > 0 and step["img_per_s_per_chip"] > 0
    assert 0 < step["mfu"] <= 1 and step["compile_s"] > 0
    assert step["census"]["convolutions"] > 0 and step["census"]["fusions"] > 0
    assert step["loops_counted_once"] == []  # nano has one block a stage: no block loops
    # The program is XLA:TPU's: none of the project's XLA:CPU custom calls (native depthwise
    # kernels, fusion barriers) is in it.
    targets = step["census"]["custom_calls"]
    assert not [t for t in targets if t.startswith(hardware.CPU_TARGET_PREFIX)], targets
    text = (hlo_dir / f"configs_default.py.{kind}.hlo.txt").read_text()
    calls = re.findall(r'custom_call_target="([^"]+)"', text)
    assert sorted(set(calls)) == sorted(targets)
    assert not [t for t in calls if "spikeatconv" in t or "barrier" in t.lower()], calls
    # MBPL's LIFs, merge convs and LayerNorms are fused Mosaic calls at T=1 (forward; backward
    # in the train step), none in the twin.
    assert targets.get("tpu_custom_call", 0) > 0 and "lif_merge_norm_fwd" in text
    assert ("lif_merge_norm_bwd" in text) == (kind == "train")
  assert "tpu_custom_call" not in twin["train"]["census"]["custom_calls"]
  # Train: the parameters' gradient and Adam moments make the train step's outputs larger.
  assert program["train"]["hbm"]["outputs_bytes"] > program["eval"]["hbm"]["outputs_bytes"]
  assert program["train"]["flops_per_image"] > 2 * program["eval"]["flops_per_image"]
  assert len(program["train"]["top_fusions"]) == 3
  assert "train step" in r.stdout and "HBM total / chip" in r.stdout
  assert "layouts: HBM / VMEM GB" in r.stdout and "hbm_layout_bytes_per_image" in ratios
