"""The train and eval steps: pure, module-level functions (STYLE.md §3 habits 7 and 12).

`train_step(state, batch, lr, *, model, tx, config)` does one optimizer update on one global
batch; `make_train_step` binds the static arguments with `functools.partial` and jits
it once with explicit in/out shardings and the state donated. The jitted steps are traced and
called under `jax.set_mesh(mesh)`, so a layer that runs its own kernel per device (the Pallas
TPU merge, through `shard_map`) finds the mesh.

Gradient accumulation (`config.grad_accum_steps = A > 1`) is a `lax.scan` over A micro-batches
inside the step, not `optax.MultiSteps`: every step still consumes one global batch and makes
one update, so the step count, the learning-rate schedule, the data position and every
checkpoint stay in optimizer steps (no half-accumulated gradients in a checkpoint). The loss
and gradient are the means over micro-batches (equal micro-batches, so this is the global-batch
mean), mixup/cutmix mixes the global batch once (pairs within each device's shard), and the
BatchNorm running statistics are updated micro-batch after micro-batch, each normalising with
its own micro-batch statistics, as accumulation does in PyTorch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spikeatconv_jax import metrics as metrics_lib
from spikeatconv_jax import optim
from spikeatconv_jax import sharding as sharding_lib
from spikeatconv_jax.data import device_ops
from spikeatconv_jax.train.state import TrainState


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing: (1 - s) * onehot + s / num_classes."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [B, N]
  return onehot * (1.0 - smoothing) + smoothing / num_classes


def _forward_loss(params, batch_stats, images, targets, rng, *, model):
  """Cross-entropy of the T-averaged logits (the model averages over T) with soft targets."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  logits, mutated = model.apply(
    variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats", "spikes"]
  )
  logits = logits.astype(jnp.float32)  # [B, N]
  loss = optax.softmax_cross_entropy(logits, targets).mean()
  rates = metrics_lib.site_rates(mutated.get("spikes", {}))
  return loss, (logits, mutated.get("batch_stats", batch_stats), rates)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  lr: jax.Array,
  *,
  model,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update.

  Args:
    state: the TrainState (donated by the jitted wrapper).
    batch: {"image": [B, H, W, C] uint8 (the pipeline's; pp_train's device part runs here) or
      float (taken as preprocessed), "label": [B] int32}, B the global batch.
    lr: float32 scalar, the learning rate of this step (schedule(state.step), from the host).
    model: the linen module.
    tx: the optax transformation without the learning rate (`optim.make_optimizer`).
    config: the top-level config (label_smoothing, mixup, cutmix, mix_switch_prob,
      grad_accum_steps, model.num_classes).
    mesh: the device mesh, to keep micro-batches spread over all devices when accumulating.

  Returns:
    (new state, measurements): scalars loss, accuracy, lr, grad_norm, param_norm, finite
    (1.0 when loss, gradient norm and new parameters are all finite), firing_rate and
    firing_rate/<stage>.
  """
  num_classes = config.model.num_classes
  rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, dropout_rng = jax.random.split(rng)
  images, labels = batch["image"], batch["label"]  # [B, H, W, C], [B]
  pp_train = config.dataset.pp_train if "dataset" in config else ""
  images = device_ops.apply(pp_train, images, jax.random.fold_in(rng, 2))
  targets = smooth_labels(labels, num_classes, config.label_smoothing)  # [B, N]
  if config.mixup > 0 or config.cutmix > 0:
    from spikeatconv_jax.data.mix import mix_batch

    images, targets = mix_batch(
      mix_rng,
      images,
      targets,
      mixup_alpha=config.mixup,
      cutmix_alpha=config.cutmix,
      switch_prob=config.mix_switch_prob,
      # Partners within each device's shard: no image crosses between devices.
      num_groups=sharding_lib.batch_size_per_step(mesh) if mesh is not None else 1,
    )

  grad_fn = jax.value_and_grad(functools.partial(_forward_loss, model=model), has_aux=True)
  accum = int(config.grad_accum_steps)
  if accum <= 1:
    (loss, (logits, batch_stats, rates)), grads = grad_fn(
      state.params, state.batch_stats, images, targets, dropout_rng
    )
    correct = jnp.argmax(logits, -1) == labels
  else:
    b = images.shape[0]
    if b % accum:
      raise ValueError(f"batch_size {b} is not a multiple of grad_accum_steps {accum}")

    def split(x):
      # Micro-batch i takes rows i, i + A, i + 2A, ...: a strided slice, so each micro-batch
      # still has rows on every device of the batch sharding (a contiguous split would not).
      x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)  # [A, B/A, ...]
      if mesh is not None:
        spec = PartitionSpec(None, sharding_lib.batch_axes(mesh))
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
      return x

    micro = (split(images), split(targets), split(labels), jnp.arange(accum))

    def body(carry, xs):
      grad_sum, batch_stats, loss_sum, correct_sum, rate_sum = carry
      x, t, y, i = xs
      (loss_i, (logits_i, batch_stats, rates_i)), g = grad_fn(
        state.params, batch_stats, x, t, jax.random.fold_in(dropout_rng, i)
      )
      grad_sum = jax.tree.map(jnp.add, grad_sum, g)
      correct_sum = correct_sum + jnp.sum(jnp.argmax(logits_i, -1) == y)
      rate_sum = jax.tree.map(jnp.add, rate_sum, rates_i)
      return (grad_sum, batch_stats, loss_sum + loss_i, correct_sum, rate_sum), None

    # The shapes of the sown rates, to start their running sum at zero.
    rate_shapes = jax.eval_shape(
      lambda: grad_fn(state.params, state.batch_stats, micro[0][0], micro[1][0], dropout_rng)
    )[0][1][2]
    init = (
      jax.tree.map(jnp.zeros_like, state.params),
      state.batch_stats,
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.int32),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rate_shapes),
    )
    (grad_sum, batch_stats, loss_sum, correct_sum, rate_sum), _ = jax.lax.scan(body, init, micro)
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    loss = loss_sum / accum
    rates = jax.tree.map(lambda r: r / accum, rate_sum)
    correct = correct_sum / b

  params, opt_state, grad_norm, param_norm = optim.update(
    tx, grads, state.opt_state, state.params, lr, exclude=bool(config.weight_decay_exclude)
  )
  measurements = {
    "loss": loss,
    "accuracy": jnp.mean(correct.astype(jnp.float32)),
    "lr": jnp.asarray(lr, jnp.float32),
    "grad_norm": grad_norm,
    "param_norm": param_norm,
    "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)).astype(
      jnp.float32
    ),
  }
  measurements.update(metrics_lib.summarize_rates(rates))
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, measurements


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model, num_classes: int):
  """Sums over the valid examples of one eval batch.

  Args:
    state: the TrainState (params and batch_stats are read).
    batch: {"image": [B, H, W, C], "label": [B], "mask": [B] (1 valid, 0 padding)}.

  Returns:
    {"correct_top1", "correct_top5", "loss", "count": sums over valid examples,
     "rates": {site: [K, T] * count}} (rates weighted by the batch's valid count).
  """
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits, mutated = model.apply(variables, batch["image"], train=False, mutable=["spikes"])
  logits = logits.astype(jnp.float32)  # [B, N]
  labels = batch["label"]
  mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)  # [B]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  loss = optax.softmax_cross_entropy(logits, onehot)  # [B]
  k = min(5, num_classes)
  _, top_k = jax.lax.top_k(logits, k)  # [B, k]
  in_top_k = jnp.any(top_k == labels[:, None], axis=-1)
  count = jnp.sum(mask)
  rates = metrics_lib.site_rates(mutated.get("spikes", {}))
  return {
    "correct_top1": jnp.sum((top_k[:, 0] == labels) * mask),
    "correct_top5": jnp.sum(in_top_k * mask),
    "loss": jnp.sum(loss * mask),
    "count": count,
    "rates": jax.tree.map(lambda r: r.astype(jnp.float32) * count, rates),
  }


class MeshJitted:
  """A jitted function whose calls and `lower` run under `jax.set_mesh(mesh)` (which jit does
  not allow inside the traced function)."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def make_train_step(model, tx, config, mesh, state_shardings) -> MeshJitted:
  """`train_step(state, batch, lr)` jitted once: explicit shardings, the state donated."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  step = functools.partial(train_step, model=model, tx=tx, config=config, mesh=mesh)
  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, batch_sh, sharding_lib.replicated(mesh)),
    out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
  return MeshJitted(jitted, mesh)


def make_eval_step(model, num_classes, mesh, state_shardings) -> MeshJitted:
  """`eval_step` jitted once; the state is not donated (training continues with it)."""
  step = functools.partial(eval_step, model=model, num_classes=num_classes)
  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
    out_shardings=NamedSharding(mesh, PartitionSpec()),
  )
  return MeshJitted(jitted, mesh)
