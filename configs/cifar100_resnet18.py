r"""CIFAR-100 ResNet-18 ablations: one preset per row of the paper's Tables 1 and 2 (§4.1).

  python train.py --config configs/cifar100_resnet18.py:preset=mbpl4_t2 \
    --workdir runs/c100_mbpl4_t2 \
    --config.dataset.data_dir=/path/to/tensorflow_datasets

Recipe (paper §4.1, DESIGN.md §9): 200 epochs, batch 256, AdamW lr 0.02 with 5 linear warmup
epochs then cosine to 0, weight decay 0.01 on all parameters, flip + rotation ±30° + shear ±10°,
no label smoothing. `python scripts/run_presets.py --table 1 ...` runs a table's presets in turn.

Config-string keys: preset (see PRESETS), runlocal.
"""

import ml_collections
from ml_collections import config_dict

from configs.common import model_config, parse_arg

# name: (table rows it reproduces, paper top-1 %, SPK settings). T is model.timesteps.
PRESETS = {
  # Table 1.
  "ann": dict(tables=(1,), paper_top1=75.4, kind="none", timesteps=1),  # ReLU ResNet-18
  "sl_t1_tau4_sig": dict(
    tables=(1,), paper_top1=64.3, kind="sl", timesteps=1, tau=4.0, surrogate="sigmoid"
  ),
  "sl_t1_tau2_sig": dict(tables=(1,), paper_top1=66.0, kind="sl", timesteps=1, surrogate="sigmoid"),
  "sl_t1_tau2_atan": dict(tables=(1,), paper_top1=67.1, kind="sl", timesteps=1),
  "sl_t4_tau2_sig": dict(tables=(1,), paper_top1=70.9, kind="sl", timesteps=4, surrogate="sigmoid"),
  "sl_t8_tau2_sig": dict(tables=(1,), paper_top1=70.4, kind="sl", timesteps=8, surrogate="sigmoid"),
  "rl_t1": dict(tables=(1,), paper_top1=71.0, kind="rl", timesteps=1, thresholds=(1.0, 2.0)),
  "mbpl4_t2": dict(
    tables=(1, 2), paper_top1=74.4, kind="mbpl", timesteps=2, thresholds=(0.2, 1.0, 2.0, 4.0)
  ),
  "hsl_t2": dict(tables=(1,), paper_top1=70.6, kind="hsl", timesteps=2, thresholds=(1.0, 2.0)),
  "dcl_t2": dict(tables=(1,), paper_top1=70.3, kind="dcl", timesteps=2, thresholds=(1.0, 1.0)),
  # Table 2 (MBPL branches and thresholds).
  "mbpl2_t1": dict(tables=(2,), paper_top1=71.7, kind="mbpl", timesteps=1, thresholds=(1.0, 2.0)),
  "mbpl3_t1": dict(
    tables=(2,), paper_top1=71.9, kind="mbpl", timesteps=1, thresholds=(1.0, 2.0, 4.0)
  ),
  "mbpl4_t1": dict(
    tables=(2,), paper_top1=72.5, kind="mbpl", timesteps=1, thresholds=(0.2, 1.0, 2.0, 4.0)
  ),
  "mbpl4_1246_t1": dict(
    tables=(2,), paper_top1=72.2, kind="mbpl", timesteps=1, thresholds=(1.0, 2.0, 4.0, 6.0)
  ),
  "mbpl4_t2_sig": dict(
    tables=(2,),
    paper_top1=73.8,
    kind="mbpl",
    timesteps=2,
    thresholds=(0.2, 1.0, 2.0, 4.0),
    surrogate="sigmoid",
  ),
  "mbpl4_t4": dict(
    tables=(2,), paper_top1=73.6, kind="mbpl", timesteps=4, thresholds=(0.2, 1.0, 2.0, 4.0)
  ),
  "mbpl8_t2": dict(
    tables=(2,),
    paper_top1=59.0,
    kind="mbpl",
    timesteps=2,
    thresholds=(0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
  ),
}


def presets_of_table(table: int) -> list[str]:
  """The preset names that reproduce rows of paper Table `table` (1 or 2)."""
  return [name for name, p in PRESETS.items() if table in p["tables"]]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, preset="mbpl4_t2", runlocal=False)
  if arg.preset not in PRESETS:
    raise ValueError(f"unknown preset {arg.preset!r}; known presets: {', '.join(PRESETS)}")
  p = dict(PRESETS[arg.preset])
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.preset = arg.preset
  config.paper_top1 = p.pop("paper_top1")
  p.pop("tables")

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "cifar100"
  config.dataset.data_dir = config_dict.placeholder(str)
  config.dataset.source_dir = config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.num_classes = 100
  config.dataset.image_size = 32
  config.dataset.pp_train = (
    "decode|flip_lr|random_rotate(30)|random_shear(10)|normalize('cifar100')"
  )
  config.dataset.pp_eval = "decode|normalize('cifar100')"
  config.dataset.shuffle_buffer = 50_000
  config.dataset.cache = True
  config.dataset.prefetch = 2

  config.model = model_config(
    name="resnet18_cifar", num_classes=100, timesteps=p.pop("timesteps"), spk=p.pop("kind")
  )
  config.model.spk.update(p)
  config.model.drop_path = 0.0

  config.batch_size = 256
  config.num_epochs = 200
  config.total_steps = config_dict.placeholder(int)
  config.warmup_epochs = 5.0
  config.lr = 0.02
  config.warmup_init_lr = 0.0
  config.min_lr = 0.0
  config.weight_decay = 0.01
  config.weight_decay_exclude = False  # "applied to all parameters" (DESIGN.md §9 Choice)
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.grad_clip = config_dict.placeholder(float)
  config.grad_accum_steps = 1
  config.label_smoothing = 0.0
  config.mixup = 0.0
  config.cutmix = 0.0
  config.mix_switch_prob = 0.5

  config.mesh = (("data", -1), ("fsdp", 1))
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  if arg.runlocal:
    config.batch_size = 16
    config.total_steps = 4
    config.warmup_epochs = 0.25  # 1 of the 4 steps (train[:64] at batch 16: 4 steps per epoch)
    config.dataset.train_split = "train[:64]"
    config.dataset.eval_split = "test[:32]"
    config.dataset.shuffle_buffer = 64
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
  return config
