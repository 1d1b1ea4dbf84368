"""Every config and paper preset parses and builds its model abstractly (no compile)."""

import jax
import jax.numpy as jnp
import pytest

from configs import cifar100_resnet18, common, default, imagenet

IMAGENET_STRINGS = sorted(
  {s for s in imagenet.TABLES[3].values()}
  | {v[0] for v in imagenet.TABLES[4].values()}
  | set(imagenet.BDSA.values())
)


@pytest.fixture(autouse=True)
def _trace_with_portable_forms(monkeypatch):
  # Abstract builds only trace: shapes and parameters do not depend on the hook table, and the
  # portable forms trace fastest ("auto" resolves to them here).
  from spikeatconv_jax.layers import ops

  monkeypatch.setattr(ops, "platform_kernels", lambda platform: "xla")


def _abstract_params(model_config, image_size):
  from spikeatconv_jax import models

  module = models.build(model_config)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(
    lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False)
  )
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(variables["params"]))


def test_parse_arg_types_and_errors():
  c = common.parse_arg(
    "variant=large,timesteps=2,remat=1", variant="base", timesteps=1, remat=False
  )
  assert (c.variant, c.timesteps, c.remat) == ("large", 2, True)
  with pytest.raises(ValueError, match="unknown config-string key 'varient'"):
    common.parse_arg("varient=large", variant="base")
  with pytest.raises(ValueError, match="timesteps"):
    common.parse_arg("timesteps=two", timesteps=1)


def test_unknown_preset_lists_known():
  with pytest.raises(ValueError, match="known presets: ann"):
    cifar100_resnet18.get_config("preset=nope")


def test_tables_cover_the_paper_rows():
  # Table 1 has 10 rows, Table 2 has 8 (the 74.4 % row is shared).
  assert len(cifar100_resnet18.presets_of_table(1)) == 10
  assert len(cifar100_resnet18.presets_of_table(2)) == 8
  kinds = {imagenet.get_config(s).model.spk.kind for s in IMAGENET_STRINGS}
  assert kinds == {"sl", "rl", "mbpl", "hsl", "dcl", "none"}


@pytest.mark.parametrize("preset", sorted(cifar100_resnet18.PRESETS))
def test_cifar_preset_builds(preset):
  config = cifar100_resnet18.get_config(f"preset={preset}")
  assert _abstract_params(config.model, config.dataset.image_size) > 10_000_000


@pytest.mark.parametrize("arg", IMAGENET_STRINGS)
def test_imagenet_config_builds(arg):
  config = imagenet.get_config(arg)
  assert config.batch_size == 768 and config.lr == 1e-3 and config.grad_clip == 0.1
  assert _abstract_params(config.model, config.dataset.image_size) > 10_000_000


def test_default_config_builds():
  config = default.get_config()
  assert config.model.variant == "nano" and config.dataset.name == "fashion_mnist_local"
  assert _abstract_params(config.model, config.dataset.image_size) > 0


def test_run_presets_lists_every_table(capsys):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "run_presets.py"
  spec = importlib.util.spec_from_file_location("run_presets", path)
  run_presets = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run_presets)
  assert [len(run_presets.table_runs(t)) for t in (1, 2, 3, 4)] == [10, 8, 6, 7]
  assert run_presets.main(["--table", "2", "--list"]) == 0
  assert "mbpl8_t2" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    run_presets.main(["--table", "1"])  # running needs --data_dir


def test_default_runlocal_schedule_fits():
  """configs/default.py:runlocal=1 as given (no overrides) builds its learning-rate schedule:
  the warmup is shorter than its 4 steps."""
  from configs.default import get_config
  from spikeatconv_jax import optim

  c = get_config("runlocal=1")
  steps_per_epoch = 256 // c.batch_size  # train[:256]
  assert c.dataset.train_split == "train[:256]"
  assert 0 < optim.warmup_steps(c, steps_per_epoch) < c.total_steps
  optim.make_schedule(c, total_steps=c.total_steps, steps_per_epoch=steps_per_epoch)
