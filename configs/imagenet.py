r"""ImageNet-1K recipe of the paper (§4.2, DESIGN.md §9) for SpikeAtConv tiny/base/large.

  python train.py --config configs/imagenet.py:variant=base,spk=mbpl,attention=sisa,timesteps=1 \
    --workdir gs://bucket/runs/base_mbpl_t1 --config.dataset.data_dir=/path/to/tensorflow_datasets

Every key has the paper's default, so `configs/imagenet.py:variant=large` is the paper's Large
model. Keys: variant (tiny|base|large), spk (sl|rl|mbpl|hsl|dcl|none; none = spike-free,
which also switches attention to softmax), attention (sisa|bdsa), timesteps, block_attention,
dtype, remat, scan_blocks, image_size (the crop; the eval resize keeps the 224/235 ratio),
runlocal (16 training images, 2 steps: the path, not the numbers). `TABLES` lists the config
strings of every column of Tables 3 and 4.

Recipe: 200 epochs, global batch 768 (grad_accum_steps splits it on fewer devices), AdamW
lr 1e-3 (absolute), 10 warmup epochs from 1e-6, cosine to 1e-5, weight decay 0.05 without
biases/norms/layer scales/relative-position tables, global-norm clip 0.1, label smoothing 0.1,
RandomResizedCrop + flip + AutoAugment + random erasing 0.25, Mixup 0.8 / CutMix 1.0,
bfloat16 compute with float32 parameters, membranes and BatchNorm.
"""

import ml_collections
from ml_collections import config_dict

from configs.common import model_config, parse_arg

# Config strings of every column of the paper's ImageNet tables (paper top-1 where reported).
TABLES = {
  3: {  # SPK blocks on ImageNet (Base, SISA, T=1); the paper gives no numbers in the text.
    "sl": "variant=base,spk=sl",
    "rl": "variant=base,spk=rl",
    "mbpl": "variant=base,spk=mbpl",
    "hsl": "variant=base,spk=hsl",
    "dcl": "variant=base,spk=dcl",
    "spike_free": "variant=base,spk=none",
  },
  4: {  # model sizes: (config string, paper top-1 %, paper top-5 %)
    "base_t1": ("variant=base,timesteps=1", 80.53, 94.17),
    "base_t2": ("variant=base,timesteps=2", 80.70, 94.89),
    "tiny_t1": ("variant=tiny,timesteps=1", 76.58, 92.74),
    "large_t1": ("variant=large,timesteps=1", 81.23, 95.41),
  },
}
# The attention ablation of the paper (SISA vs BDSA) on every size.
BDSA = {f"{v}_bdsa": f"variant={v},attention=bdsa" for v in ("tiny", "base", "large")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(
    arg,
    variant="base",
    spk="mbpl",
    attention="sisa",
    timesteps=1,
    block_attention=False,
    dtype="bfloat16",
    remat=False,
    scan_blocks=True,
    image_size=224,
    runlocal=False,
  )
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "imagenet2012"
  config.dataset.data_dir = config_dict.placeholder(str)
  config.dataset.source_dir = config_dict.placeholder(str)  # manual_dir with the ILSVRC2012 tars
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.num_classes = 1000
  size = arg.image_size
  config.dataset.image_size = size
  config.dataset.pp_train = (
    f"decode_jpeg_and_inception_crop({size})|flip_lr|autoaugment|normalize('imagenet')"
    "|random_erase(0.25)"
  )
  resize = round(size * 235 / 224)
  config.dataset.pp_eval = (
    f"decode|resize_small({resize})|central_crop({size})|normalize('imagenet')"
  )
  config.dataset.shuffle_buffer = 250_000
  config.dataset.cache = False
  config.dataset.prefetch = 2

  spike_free = arg.spk == "none"
  config.model = model_config(
    variant=arg.variant,
    num_classes=1000,
    timesteps=arg.timesteps,
    spk=arg.spk,
    attention="softmax" if spike_free else arg.attention,
  )
  config.model.attention.block_attention = arg.block_attention
  config.model.dtype = arg.dtype
  config.model.remat = arg.remat
  # One compiled copy of a stage's repeated blocks (names unchanged): base/large compile faster.
  config.model.scan_blocks = arg.scan_blocks

  config.batch_size = 768
  config.num_epochs = 200
  config.total_steps = config_dict.placeholder(int)
  config.warmup_epochs = 10.0
  config.lr = 1e-3
  config.warmup_init_lr = 1e-6
  config.min_lr = 1e-5
  config.weight_decay = 0.05
  config.weight_decay_exclude = True
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.grad_clip = 0.1
  config.grad_accum_steps = 1
  config.label_smoothing = 0.1
  config.mixup = 0.8
  config.cutmix = 1.0
  config.mix_switch_prob = 0.5

  config.mesh = (("data", -1), ("fsdp", 1))  # e.g. (("data", -1), ("fsdp", 8)) for large
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3

  if arg.runlocal:
    config.batch_size = 8
    config.total_steps = 2
    config.warmup_epochs = 0.5  # 1 of the 2 steps (train[:16] at batch 8: 2 steps per epoch)
    config.dataset.train_split = "train[:16]"
    config.dataset.eval_split = "validation[:8]"
    config.dataset.shuffle_buffer = 16
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
  return config
