r"""The CPU default run: nano SpikeAtConv (MBPL + SISA, T=1) on Fashion-MNIST.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` IDX files through the local tfds
builder `fashion_mnist_local` (no network). Images are padded 28 -> 32 px so the nano
model's stage maps are 8/4/2/1.

  python train.py --config configs/default.py --workdir runs/default
  python eval.py --config configs/default.py --workdir runs/default

Config-string keys: runlocal (tiny splits and batches, for tests), spk, attention, timesteps.
"""

import ml_collections
from ml_collections import config_dict

from configs.common import model_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, runlocal=False, spk="mbpl", attention="sisa", timesteps=1)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "fashion_mnist_local"
  config.dataset.data_dir = config_dict.placeholder(str)  # None: tfds' default data dir
  config.dataset.source_dir = "/usr/share/datasets/fashion-mnist"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.num_classes = 10
  config.dataset.image_size = 32
  config.dataset.pp_train = (
    "fmnist_decode|pad_to(32)|random_crop(32,pad=2)|flip_lr|normalize('fmnist')"
  )
  config.dataset.pp_eval = "fmnist_decode|pad_to(32)|normalize('fmnist')"
  config.dataset.shuffle_buffer = 20_000
  config.dataset.cache = True
  config.dataset.prefetch = 2

  config.model = model_config(
    variant="nano",
    num_classes=10,
    timesteps=arg.timesteps,
    spk=arg.spk,
    attention="softmax" if arg.spk == "none" else arg.attention,
  )
  config.model.drop_path = 0.0
  # Stage maps 8/4/2/1 at 32 px: P=4 keeps grid attention strided (tokens 2 apart) at stage 0.
  config.model.attention.partition = 4

  # Optimisation (AdamW, linear warmup then cosine decay).
  config.batch_size = 128
  config.num_epochs = 6
  config.total_steps = config_dict.placeholder(int)  # overrides num_epochs when set
  config.warmup_epochs = 0.5
  config.lr = 2e-3
  config.warmup_init_lr = 0.0
  config.min_lr = 1e-5
  config.weight_decay = 0.05
  config.weight_decay_exclude = True  # no decay on biases, norms, layer scales, rel-pos tables
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.grad_clip = config_dict.placeholder(float)  # global-norm clip; None: off
  config.grad_accum_steps = 1
  config.label_smoothing = 0.1
  config.mixup = 0.0  # Mixup alpha; 0: off
  config.cutmix = 0.0  # CutMix alpha; 0: off
  config.mix_switch_prob = 0.5

  # Mesh: a data axis over all devices; an optional FSDP axis shards params and optimizer state.
  config.mesh = (("data", -1), ("fsdp", 1))

  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3

  if arg.runlocal:
    config.batch_size = 16
    config.total_steps = 4
    config.dataset.train_split = "train[:256]"
    config.dataset.eval_split = "test[:64]"
    config.dataset.shuffle_buffer = 64
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
  return config
