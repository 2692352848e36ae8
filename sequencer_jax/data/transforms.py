"""Train and eval preprocessing in TF ops (run inside tf.data, in parallel).

Train (DeiT recipe, each step a switch of ``config.augment``): inception-style random
resized crop, horizontal flip, RandAugment, normalisation, random erasing. Eval: timm's
eval transform (``eval_transform``; the same rules as ``sequencer_jax.images``, in TF
ops). Randomness is stateless, from a per-example ``[2]`` int32 seed, so a pipeline is
reproducible.
"""

from __future__ import annotations

import math

import tensorflow as tf

from sequencer_jax import images
from sequencer_jax.data import randaugment

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Image file bytes -> uint8 [H, W, C]. JPEGs with the accurate integer IDCT, as PIL
    (and so timm) decodes them: TensorFlow's default differs by a level of 255 on
    average (measured on scikit-learn's sample photos saved at quality 90)."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, dct_method='INTEGER_ACCURATE'),
        lambda: tf.io.decode_image(encoded, channels=0, expand_animations=False))


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
    resized bicubic to ``size``, antialiased where it shrinks as timm's PIL crop is; falls
    back to the whole image after 10 tries."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return _resize(crop, tf.constant(size), tf.constant(size), 'bicubic')


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
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = 'bicubic',
                   crop_mode: str = 'center') -> tf.Tensor:
    """uint8 [H, W, C] -> normalised float32 [size, size, 3], as timm's eval transform:
    resized by ``crop_mode``'s rule (``images.resized_size``: 'center' takes the
    shorter side to ``floor(size / crop_pct)``), antialiased when it shrinks as PIL is
    (``interpolation``: 'bicubic', 'bilinear' or 'nearest'), rounded to 8 bits, padded
    where short ('border': with the mean's colour), the central ``size x size`` crop at
    torchvision's offsets, normalised by ``mean`` and ``std`` (of [0, 255])."""
    image = to_rgb(image)
    height, width = _resized_size(tf.shape(image)[0], tf.shape(image)[1], size, crop_pct,
                                  crop_mode)
    image = _resize(image, height, width, interpolation)
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    fill = tf.constant([round(m) for m in mean] if crop_mode == 'border' else [0, 0, 0],
                       tf.float32)
    pads = [_padding(tf.shape(image)[axis], size) for axis in (0, 1)] + [[0, 0]]
    image = tf.pad(image - fill, pads) + fill  # pads with fill, a colour per channel
    top, left = (_crop_offset(tf.shape(image)[axis], size) for axis in (0, 1))
    image = image[top:top + size, left:left + size]
    return tf.ensure_shape(normalize(image, mean, std), [size, size, 3])


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
             interpolation: str) -> tf.Tensor:
    """``image`` resized to (height, width), antialiased where it shrinks, as PIL is.
    Enlarging takes TensorFlow's plain kernel: the same filter there, at a third of the
    cost of the antialiasing one."""
    size = tf.stack([height, width])
    if interpolation == 'nearest':
        return tf.image.resize(image, size, method=interpolation)
    shrinks = tf.reduce_any(size < tf.shape(image)[:2])
    return tf.cond(shrinks,
                   lambda: tf.image.resize(image, size, method=interpolation, antialias=True),
                   lambda: tf.image.resize(image, size, method=interpolation))


def _resized_size(height: tf.Tensor, width: tf.Tensor, size: int, crop_pct: float,
                  crop_mode: str) -> tuple[tf.Tensor, tf.Tensor]:
    """``images.resized_size`` in TF ops, in float64 as Python computes it."""
    scale = images.scale_size(size, crop_pct)
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    if crop_mode == 'squash':
        return tf.constant(scale), tf.constant(scale)
    if crop_mode == 'border':
        ratio = tf.maximum(h / scale, w / scale)
        return (tf.cast(tf.round(h / ratio), tf.int32),  # halves to even, as Python's round
                tf.cast(tf.round(w / ratio), tf.int32))
    longer = lambda short, long: tf.cast(tf.floor(scale * long / short), tf.int32)  # noqa: E731
    return (tf.where(height <= width, scale, longer(w, h)),
            tf.where(height <= width, longer(h, w), scale))


def _padding(length: tf.Tensor, size: int) -> list[tf.Tensor]:
    """``images.padding``: [before, after] to bring ``length`` up to ``size``."""
    short = tf.maximum(size - length, 0)
    return [short // 2, short - short // 2]


def _crop_offset(length: tf.Tensor, size: int) -> tf.Tensor:
    """``images.crop_offset``: (length - size) / 2, halves rounded to even."""
    return tf.cast(tf.round(tf.cast(length - size, tf.float64) / 2), tf.int32)
