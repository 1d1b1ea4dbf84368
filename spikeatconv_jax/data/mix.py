"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on device, inside the train step.

Batch mode as in timm's `Mixup` (mix_prob 1, DeiT/SDT-V2 recipes): one mixing weight per
batch, each image mixed with its partner in the reversed batch; when both alphas are positive,
CutMix is used with probability `switch_prob` and Mixup otherwise. CutMix's label weight is
corrected to the exact pasted area (timm ``correct_lam``). Label smoothing is left to the loss.

With ``num_groups = G`` the batch is G equal groups of consecutive examples (the device shards
of a batch-sharded array) and each group is reversed on its own: every partner lives on the
same device, so mixing moves no image between devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cutmix_box(rng, height: int, width: int, lam):
  """timm's ``rand_bbox``: a box of side fractions sqrt(1 - lam) centred uniformly, clipped.

  Returns:
    (top, bottom, left, right) int32 scalars, the box being rows [top, bottom) and columns
    [left, right).
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  k_y, k_x = jax.random.split(rng)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + cut_h // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def reverse_within_groups(x: jax.Array, num_groups: int) -> jax.Array:
  """`x` with each of its `num_groups` equal groups of leading rows reversed in place."""
  b = x.shape[0]
  return x.reshape(num_groups, b // num_groups, *x.shape[1:])[:, ::-1].reshape(x.shape)


def mix_batch(
  rng: jax.Array,
  images: jax.Array,
  labels_onehot: jax.Array,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float = 0.5,
  num_groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch with its reverse (within each of `num_groups` groups) by Mixup or CutMix.

  Args:
    rng: PRNG key.
    images: [B, H, W, C].
    labels_onehot: [B, K] one-hot or soft labels (rows summing to 1).
    mixup_alpha: Beta(α, α) parameter of Mixup; 0 disables Mixup.
    cutmix_alpha: Beta(α, α) parameter of CutMix; 0 disables CutMix.
    switch_prob: probability of CutMix when both are enabled.
    num_groups: G; example i of group g (rows g*B/G .. (g+1)*B/G - 1) is paired with example
      B/G - 1 - i of the same group. G = the number of batch shards keeps pairs on one device.

  Returns:
    (mixed images [B, H, W, C] of the input dtype, soft labels [B, K] float32).
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}")
  if images.ndim != 4 or labels_onehot.ndim != 2 or images.shape[0] != labels_onehot.shape[0]:
    raise ValueError(f"expected images [B,H,W,C] and labels [B,K], got {images.shape}, "
                     f"{labels_onehot.shape}")  # fmt: skip
  if num_groups < 1 or images.shape[0] % num_groups:
    raise ValueError(f"batch {images.shape[0]} does not split into {num_groups} groups")
  labels = labels_onehot.astype(jnp.float32)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, labels
  _, height, width, _ = images.shape
  k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 4)
  partner_images = reverse_within_groups(images, num_groups)  # [B, H, W, C]
  partner_labels = reverse_within_groups(labels, num_groups)  # [B, K]

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)

  # Mixup: a convex combination of the two images with weight lam.
  lam_mix = (
    jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  )
  mixed = lam_mix * images.astype(jnp.float32) + (1 - lam_mix) * partner_images.astype(jnp.float32)
  mixed = mixed.astype(images.dtype)

  # CutMix: paste the partner's box; the label weight is the area left of the own image.
  lam_cut = (
    jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  )
  top, bottom, left, right = cutmix_box(k_box, height, width, lam_cut)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # [H, W]
  cut = jnp.where(box[None, :, :, None], partner_images, images)
  lam_cut = 1.0 - jnp.sum(box).astype(jnp.float32) / (height * width)

  out_images = jnp.where(use_cutmix, cut, mixed)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  return out_images, lam * labels + (1.0 - lam) * partner_labels
