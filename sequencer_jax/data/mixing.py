"""Mixup, CutMix and label smoothing on device (JAX), as timm's ``Mixup``.

Per batch: with probability ``switch_prob`` CutMix (lam ~ Beta(cutmix_alpha)), else
Mixup (lam ~ Beta(mixup_alpha)); each example is mixed with the batch reversed, and
the labels are smoothed one-hots mixed with the same (box-corrected) ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels [B] -> [B, K]: 1 - smoothing + smoothing/K on the label, else
    smoothing/K."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
    """A box covering about 1 - lam of the image: (top, left, bottom, right) and the
    exact kept fraction after clipping to the image."""
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    top, bottom = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
    left, right = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return (top, left, bottom, right), kept


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
              smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, C], integer labels [B] -> mixed images, soft labels [B, K].

    With both alphas 0, only label smoothing is applied.
    """
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 4)
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    if mixup_alpha <= 0:
        use_cutmix = jnp.bool_(True)
    if cutmix_alpha <= 0:
        use_cutmix = jnp.bool_(False)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    _, h, w, _ = images.shape
    (top, left, bottom, right), lam_box = cutmix_box(k_box, h, w, lam_cut)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    flipped = images[::-1]
    mixed_cut = jnp.where(inside[None, :, :, None], flipped, images)
    mixed_mix = lam_mix * images + (1.0 - lam_mix) * flipped
    lam = jnp.where(use_cutmix, lam_box, lam_mix)
    images = jnp.where(use_cutmix, mixed_cut, mixed_mix.astype(images.dtype))
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return images, targets
