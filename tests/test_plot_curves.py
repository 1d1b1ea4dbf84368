"""scripts/plot_curves.py reads metrics.jsonl series and writes a PNG."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "plot_curves.py"


def _module():
  spec = importlib.util.spec_from_file_location("plot_curves", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _workdir(tmp_path, name, rows):
  d = tmp_path / name
  d.mkdir()
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(d)


def test_reads_series_and_writes_png(tmp_path):
  pc = _module()
  rows = [
    {"step": 10, "loss": 2.0, "accuracy": 0.3},
    {"step": 20, "loss": 1.5, "accuracy": 0.5},
    {"step": 20, "eval/loss": 1.2, "eval/top1": 0.6},
  ]
  a = _workdir(tmp_path, "a", rows)
  b = _workdir(tmp_path, "b", rows[:1])
  curves = pc.read_curves(a)
  assert curves["train loss"] == ([10, 20], [2.0, 1.5])
  assert curves["eval top-1"] == ([20], [0.6])
  out = tmp_path / "c.png"
  assert pc.main([a, b, "--labels", "x,y", "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    pc.read_curves(str(tmp_path))
