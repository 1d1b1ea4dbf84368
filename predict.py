r"""Classifies image files with a trained checkpoint; prints a table, optionally writes JSON.

  python predict.py --workdir runs/default shoe.png shirts/ --top 3
  python predict.py --workdir runs/default --step 936 images/ --output /tmp/pred.json \
    --spike_maps /tmp/spikes.png

Each image is decoded and preprocessed by the eval pp string of the training config
(config.json in the workdir), so it must be of the size the model was trained on unless that
pp string resizes. The table gives, per file, the top-K classes (names from the dataset's tfds
metadata) with their probabilities and the image's mean firing rate (the unweighted mean over
SPK sites of each site's rate per LIF branch and time step, as eval.py reports a split).
--workdir also takes a checkpoints/<step> directory or a file written by scripts/export.py.
--spike_maps saves, for the first image, the input next to the spike maps of the first SPK of
the stem and of each stage at every time step.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from spikeatconv_jax.train import cli  # noqa: E402

flags.DEFINE_string("workdir", None, "Training workdir, checkpoint step directory or export file.")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.DEFINE_integer("top", 5, "How many classes to list per image.")
flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
flags.DEFINE_string("output", None, "Write the predictions as JSON to this file.")
flags.DEFINE_string("spike_maps", None, "Save the first image's spike maps as this PNG.")
flags.mark_flags_as_required(["workdir"])


def table(files: list[str], top: list[list[tuple[str, float]]], rates) -> str:
  """One row per file: the top-K "name probability" cells and the mean firing rate."""
  k = len(top[0]) if top else 0
  name_w = max([len(n) for row in top for n, _ in row] + [5])
  file_w = min(max([len(f) for f in files] + [4]), 48)
  cell = name_w + 7
  head = f"{'file':<{file_w}}  " + "".join(f"{f'top-{i + 1}':<{cell}}" for i in range(k))
  lines = [head + f"{'rate':>7}"]
  for f, row, r in zip(files, top, rates, strict=True):
    f = f if len(f) <= file_w else "..." + f[-(file_w - 3) :]
    cells = "".join(f"{f'{n} {p:.3f}':<{cell}}" for n, p in row)
    lines.append(f"{f:<{file_w}}  {cells}{r:7.4f}")
  return "\n".join(lines)


def save_spike_maps(path: str, image, maps: dict, title: str = "") -> None:
  """A PNG: the input image, then per site (columns) and time step (rows) a mosaic of the
  site's channels, each cell showing how many LIF branches fired at each position."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  sites = list(maps)
  t = max(m.shape[0] for m in maps.values())
  fig, axes = plt.subplots(
    t, len(sites) + 1, figsize=(2.6 * (len(sites) + 1), 2.9 * t + 0.6), squeeze=False
  )
  shown = image if image.shape[-1] in (1, 3) else image[..., :1]
  shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-9)
  for row in range(t):
    ax = axes[row, 0]
    if row == 0:
      ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray")
      ax.set_title("input (preprocessed)", fontsize=9)
    ax.set_ylabel(f"t = {row}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
      spine.set_visible(row == 0)
  vmax = max(float(m.max()) for m in maps.values()) or 1.0
  for col, site in enumerate(sites, start=1):
    m = maps[site]  # [T, H, W, C]
    for row in range(t):
      ax = axes[row, col]
      mosaic = channel_mosaic(m[min(row, m.shape[0] - 1)])
      im = ax.imshow(mosaic, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
      _, h, w, c = m.shape
      rate = float(np.mean(m[min(row, m.shape[0] - 1)]))
      label = f"{site}\n{h}x{w}, {min(c, 64)}/{c} ch, mean {rate:.3f}"
      ax.set_title(label, fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.8, label="LIF branches fired")
  fig.suptitle(title or "spike maps", fontsize=10)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def channel_mosaic(x, max_channels: int = 64):
  """[H, W, C] -> a grid of the first `max_channels` channel maps, one NaN pixel apart (blank
  in the picture)."""
  import math

  import numpy as np

  h, w, c = x.shape
  c = min(c, max_channels)
  cols = math.ceil(math.sqrt(c))
  rows = math.ceil(c / cols)
  gap = 1 if h * w > 1 else 0  # 1x1 maps: one pixel per channel, no gaps
  out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan, np.float32)
  for i in range(c):
    r, q = divmod(i, cols)
    out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = x[..., i]
  return out


def main(argv):
  from absl import logging

  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import numpy as np

  from spikeatconv_jax import files, inference

  if FLAGS.top < 1:
    print("error: --top must be >= 1", file=sys.stderr)
    sys.exit(1)
  try:
    image_paths = inference.image_files(argv[1:])
    loaded = inference.load(FLAGS.workdir, FLAGS.step)
    images = inference.preprocess(image_paths, loaded.config.dataset)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  names = inference.class_names(loaded.config)
  out = inference.predict(loaded.model, loaded.variables, images, batch_size=FLAGS.batch_size)
  k = min(FLAGS.top, len(names))
  order = np.argsort(-out["probs"], axis=-1)[:, :k]
  top = [[(names[c], float(p[c])) for c in row] for row, p in zip(order, out["probs"])]
  print(table([str(f) for f in image_paths], top, out["firing_rate"]))

  if FLAGS.output:
    result = {
      "workdir": str(FLAGS.workdir),
      "step": loaded.step,
      "model": f"{loaded.config.model.name}/{loaded.config.model.get('variant', '')}",
      "pp_eval": loaded.config.dataset.pp_eval,
      "predictions": [
        {
          "file": str(f),
          "top": [{"class": int(c), "name": names[c], "prob": float(p[c])} for c in row],
          "firing_rate": float(out["firing_rate"][i]),
          "firing_rates_per_stage": {s: float(v[i]) for s, v in out["stage_rates"].items()},
        }
        for i, (f, row, p) in enumerate(zip(image_paths, order, out["probs"]))
      ],
    }
    files.write_json(FLAGS.output, result)
    print(f"wrote {FLAGS.output}")
  if FLAGS.spike_maps:
    maps = inference.spike_maps(loaded.model, loaded.variables, images[0])
    if not maps:
      print("error: the model has no SPK sites (a spike-free model): no spike maps")
      sys.exit(1)
    title = f"{image_paths[0].name}: {top[0][0][0]} ({top[0][0][1]:.2f}), step {loaded.step}"
    save_spike_maps(FLAGS.spike_maps, images[0], maps, title=title)
    print(f"wrote {FLAGS.spike_maps}")


if __name__ == "__main__":
  cli.run(main)
