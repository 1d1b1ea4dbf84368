r"""Side by side on this machine: our tiny train step (spike-free and spiking) vs timm's MaxxViT-V2.

  .venv/bin/python benchmarks/vs_timm.py --torch-python /work/torchvenv/bin/python

Runs, one after the other in this invocation:
  1. benchmarks/model.py --variant tiny --timesteps 1 --batch 8 --mfu --nets
     none/softmax,mbpl/sisa,mbpl:sum/sisa (float32, 224 px, AdamW; MFU over the float32 matmul
     peak measured in that run; the spiking net with the paper's dwconv merge and the sum merge);
  2. benchmarks/timm_maxxvit.py --model maxxvitv2_tiny (timm's MaxxViT-V2 with the tiny dims and
     depths of DESIGN.md §7, float32, AdamW, batch 8, `--threads` threads) in the separate PyTorch
     environment given by --torch-python (optional: without it only our side runs).
Then prints the ratios the performance issue sets targets for: our spike-free img/s over timm's
(target ≥ 1), our spiking step time over our spike-free one (target ≤ 1.5), and MFU (target
≥ 35 %). Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from spikeatconv_jax.xla_cpu import malloc  # noqa: E402

# Both sides inherit this process's LD_PRELOAD: ours and PyTorch run under the same allocator
# (tcmalloc when installed; SPIKEATCONV_TCMALLOC=0 runs both under glibc).
if __name__ == "__main__":  # not on import (tests import this file)
  malloc.reexec_with_tcmalloc()


def last_json(text: str, key: str) -> dict:
  """The last JSON object line of `text` that holds `key`."""
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith("{") and key in line:
      return json.loads(line)
  raise RuntimeError(f"no JSON line with {key!r} in the output:\n{text[-3000:]}")


def run(cmd: list[str], timeout: int) -> str:
  print("$ " + " ".join(cmd), flush=True)
  repo = os.path.dirname(HERE)
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=repo)
  if r.returncode != 0:
    raise RuntimeError(f"{cmd[1]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
  return r.stdout


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--torch-python", default=None, help="python of the PyTorch + timm environment")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--threads", type=int, default=2, help="PyTorch threads (our side: all cores)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--timeout", type=int, default=3600, help="seconds per side")
  args = ap.parse_args(argv)

  ours_cmd = [sys.executable, os.path.join(HERE, "model.py"), "--variant", "tiny"]
  nets = "none/softmax,mbpl/sisa,mbpl:sum/sisa"
  ours_cmd += ["--timesteps", "1", "--nets", nets, "--batch", str(args.batch)]
  # Interleaved: the three nets' steps alternate, so the ratios between them see the same machine.
  ours_cmd += ["--repeats", str(args.repeats), "--mfu", "--interleave"]
  ours = last_json(run(ours_cmd, args.timeout), '"benchmark": "model"')
  rows = {r["net"]: r for r in ours["rows"]}
  free, spiking, spiking_sum = rows["none/softmax"], rows["mbpl/sisa"], rows["mbpl:sum/sisa"]

  timm_row = None
  if args.torch_python:
    timm_cmd = [args.torch_python, os.path.join(HERE, "timm_maxxvit.py"), "--model"]
    timm_cmd += ["maxxvitv2_tiny", "--batch", str(args.batch), "--threads", str(args.threads)]
    timm_row = last_json(run(timm_cmd, args.timeout), '"bench": "timm_train_step"')

  out = dict(
    benchmark="vs_timm",
    batch=args.batch,
    ours_spike_free_img_s=free["train_img_s"],
    ours_spiking_img_s=spiking["train_img_s"],
    ours_spike_free_mfu=free["mfu"],
    ours_spiking_mfu=spiking["mfu"],
    peak_tflops_s=free["peak_tflops_s"],
    ours_spiking_sum_merge_img_s=spiking_sum["train_img_s"],
    spiking_over_spike_free_step=free["train_img_s"] / spiking["train_img_s"],
    spiking_sum_merge_over_spike_free_step=free["train_img_s"] / spiking_sum["train_img_s"],
    # Dense train FLOPs of the spiking net over the spike-free one (the merge's depthwise convs),
    # and the MFU the spiking step would need for the 1.5x target at the spike-free step's MFU.
    spiking_over_spike_free_flops=spiking["train_tflops_per_image"]
    / free["train_tflops_per_image"],
    compile_s={
      "spike_free": free["train_compile_s"],
      "spiking": spiking["train_compile_s"],
      "spiking_sum_merge": spiking_sum["train_compile_s"],
    },
    ours_rows=ours["rows"],  # every benchmarks/model.py column (fwd, memory, compile)
    timm=timm_row,
    spike_free_over_timm=(free["train_img_s"] / timm_row["images_per_s"]) if timm_row else None,
    load_avg=list(os.getloadavg()),
    allocator=malloc.in_use(),
  )
  print(f"\nallocator: {out['allocator']} (ours and timm)")
  print(f"{'train step, tiny, 224 px, float32':<40}{'img/s':>10}{'MFU':>8}")
  print(f"{'ours, spike-free (GELU + softmax)':<40}{free['train_img_s']:>10.3f}"
        f"{100 * free['mfu']:>7.1f}%")  # fmt: skip
  print(f"{'ours, spiking (MBPL + SISA, T=1)':<40}{spiking['train_img_s']:>10.3f}"
        f"{100 * spiking['mfu']:>7.1f}%")  # fmt: skip
  print(f"{'ours, spiking, MBPL sum merge':<40}{spiking_sum['train_img_s']:>10.3f}"
        f"{100 * spiking_sum['mfu']:>7.1f}%")  # fmt: skip
  if timm_row:
    print(f"{'timm MaxxViT-V2 tiny dims':<40}{timm_row['images_per_s']:>10.3f}{'-':>8}")
    print(f"ours spike-free / timm: {out['spike_free_over_timm']:.2f}x (target >= 1)")
  else:
    print("timm side skipped (no --torch-python)")
  ratio = out["spiking_over_spike_free_step"]
  print(f"spiking / spike-free step time: {ratio:.2f}x (target <= 1.5); with the sum merge: "
        f"{out['spiking_sum_merge_over_spike_free_step']:.2f}x")  # fmt: skip
  need = out["spiking_over_spike_free_flops"] * free["mfu"] / 1.5
  print(f"spiking / spike-free dense FLOPs: {out['spiking_over_spike_free_flops']:.2f}x; "
        f"1.5x would need the spiking step at {100 * need:.1f}% MFU")  # fmt: skip
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
