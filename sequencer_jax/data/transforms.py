"""Train and eval preprocessing in TF ops (run inside tf.data, in parallel).

Train (DeiT recipe, each step a switch of ``config.augment``): inception-style random
resized crop, horizontal flip, RandAugment, normalisation, random erasing. Eval: resize
the shorter side to ``size / crop_pct`` (bicubic), centre crop, normalise. Randomness is
stateless, from a per-example ``[2]`` int32 seed, so a pipeline is reproducible.
"""

from __future__ import annotations

import math

import tensorflow as tf

from sequencer_jax.data import randaugment

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 1|3] -> float32 [H, W, 3] in [0, 255] (grey images are tiled)."""
    image = tf.cast(image, tf.float32)
    return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                   lambda: image)


def normalize(image: tf.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tf.Tensor:
    """[0, 255] -> (image - mean) / std, per channel (mean and std of [0, 255] images)."""
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
    """Inception crop: area fraction in ``scale``, aspect ratio in ``ratio`` (log-uniform),
    resized bicubic to ``size``; falls back to the whole image after 10 tries."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, [size, size], method='bicubic')


def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.25,
                   area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3)),
                   ) -> tf.Tensor:
    """timm's RandomErasing (mode 'pixel', one box) on a normalised image [H, W, 3]:
    with probability ``prob``, a random box is replaced by N(0, 1) noise."""
    s = tf.random.experimental.stateless_split(seed, 6)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    target = hf * wf * tf.random.stateless_uniform([], s[0], *area)
    aspect = tf.exp(tf.random.stateless_uniform([], s[1], *log_ratio))
    eh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = tf.logical_and(eh < h, ew < w)
    eh, ew = tf.minimum(eh, h - 1), tf.minimum(ew, w - 1)
    top = tf.random.stateless_uniform([], s[2], 0, h - eh + 1, tf.int32)
    left = tf.random.stateless_uniform([], s[3], 0, w - ew + 1, tf.int32)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    noise = tf.random.stateless_normal(tf.shape(image), s[4])
    apply = tf.logical_and(fits, tf.random.stateless_uniform([], s[5]) < prob)
    return tf.where(tf.logical_and(box, apply), noise, image)


def train_transform(image: tf.Tensor, seed: tf.Tensor, size: int, augment) -> tf.Tensor:
    """uint8 [H, W, C] -> normalised float32 [size, size, 3].

    ``augment`` is the ``config.augment`` ConfigDict (see configs): ``crop_scale``,
    ``flip``, ``randaugment`` (``num_layers``, ``magnitude``, ``magnitude_std``, or None),
    ``erase_prob``.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    image = to_rgb(image)
    if augment.crop_scale is not None:
        image = random_resized_crop(image, size, seeds[0], scale=tuple(augment.crop_scale))
    else:
        image = tf.image.resize(image, [size, size], method='bicubic')
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    if augment.randaugment is not None:
        ra = augment.randaugment
        image = randaugment.rand_augment(image, seeds[2], ra.num_layers, ra.magnitude,
                                         ra.magnitude_std)
    image = normalize(image)
    if augment.erase_prob > 0:
        image = random_erasing(image, seeds[3], augment.erase_prob)
    return image


def eval_transform(image: tf.Tensor, size: int, crop_pct: float = 0.875,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   interpolation: str = 'bicubic') -> tf.Tensor:
    """uint8 [H, W, C] -> normalised float32 [size, size, 3]: shorter side to
    ``size / crop_pct`` (``interpolation``: 'bicubic', 'bilinear' or 'nearest'), then the
    central ``size x size`` crop, normalised by ``mean`` and ``std`` (of [0, 255])."""
    image = to_rgb(image)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = math.floor(size / crop_pct) / tf.minimum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), size)
    image = tf.image.resize(image, [new_h, new_w], method=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image[top:top + size, left:left + size]
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    return tf.ensure_shape(normalize(image, mean, std), [size, size, 3])
