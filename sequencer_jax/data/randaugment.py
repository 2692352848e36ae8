"""RandAugment as timm's ``rand-m9-mstd0.5-inc1``, in TF ops for tf.data.

Each of ``num_layers`` rounds picks one of 15 ops uniformly and applies it with
probability ``prob`` (0.5) at magnitude ``N(magnitude, magnitude_std)`` clipped to
[0, 10] ("inc1": the posterize/solarize/colour ops grow stronger with magnitude, as
timm's ``*Increasing`` ops do). Images are uint8-valued float32 ``[H, W, 3]``; geometric
ops fill with grey (128). All randomness is stateless, from a ``[2]`` int seed.
"""

from __future__ import annotations

import math

import tensorflow as tf

MAX_MAGNITUDE = 10.0
FILL = 128.0

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
       'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: a + factor * (b - a), clipped to [0, 255]. a is the degenerate."""
    return tf.clip_by_value(a + factor * (b - a), 0.0, 255.0)


def _grayscale(img: tf.Tensor) -> tf.Tensor:
    gray = tf.reduce_sum(img * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)
    return tf.tile(gray, [1, 1, 3])


def _affine(img: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Applies an output->input projective transform [a0, a1, a2, b0, b1, b2, 0, 0]."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=img[None], transforms=matrix[None], output_shape=tf.shape(img)[:2],
        interpolation='BILINEAR', fill_mode='CONSTANT', fill_value=FILL)
    return out[0]


def _rotate(img: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    h = tf.cast(tf.shape(img)[0], tf.float32)
    w = tf.cast(tf.shape(img)[1], tf.float32)
    rad = degrees * math.pi / 180.0
    cos, sin = tf.cos(rad), tf.sin(rad)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # Rotate about the centre: input = R^-1 (output - c) + c.
    matrix = tf.stack([cos, sin, cx - cos * cx - sin * cy,
                       -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0])
    return _affine(img, matrix)


def _equalize(img: tf.Tensor) -> tf.Tensor:
    def channel(c):
        c_int = tf.cast(c, tf.int32)
        hist = tf.math.bincount(tf.reshape(c_int, [-1]), minlength=256, maxlength=256)
        nonzero = tf.boolean_mask(hist, hist > 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
        lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(lut, 0, 255)
        return tf.where(step > 0, tf.cast(tf.gather(lut, c_int), tf.float32), c)
    return tf.stack([channel(img[..., i]) for i in range(3)], -1)


def _autocontrast(img: tf.Tensor) -> tf.Tensor:
    lo = tf.reduce_min(img, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(img, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.where(hi > lo, (img - lo) * scale, img)


def _sharpness(img: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(img[None], kernel, [1, 1, 1, 1], 'VALID')[0]
    # PIL leaves the one-pixel border unchanged.
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    mask = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) > 0
    degenerate = tf.where(mask, tf.round(smooth), img)
    return _blend(degenerate, img, factor)


def _signed(level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.where(flip, -level, level)


def apply_op(index: tf.Tensor, img: tf.Tensor, magnitude: tf.Tensor,
             seed: tf.Tensor) -> tf.Tensor:
    """Applies ``OPS[index]`` at ``magnitude`` in [0, 10] (timm's level mappings)."""
    m = magnitude / MAX_MAGNITUDE
    h = tf.cast(tf.shape(img)[0], tf.float32)
    w = tf.cast(tf.shape(img)[1], tf.float32)
    enhance = lambda: 1.0 + _signed(0.9 * m, seed)  # noqa: E731  (ColorIncreasing & co.)

    def posterize():
        bits = 4 - tf.cast(m * 4, tf.int32)  # 'Increasing': fewer bits as m grows
        shift = 8 - tf.clip_by_value(bits, 1, 8)
        div = tf.cast(tf.bitwise.left_shift(1, shift), tf.float32)
        return tf.floor(img / div) * div

    def shear(axis):
        s = _signed(0.3 * m, seed)
        matrix = [1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 'x' \
            else [1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0]
        return _affine(img, tf.stack(matrix))

    def translate(axis):
        t = _signed(0.45 * m, seed) * (w if axis == 'x' else h)
        matrix = [1.0, 0.0, t, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 'x' \
            else [1.0, 0.0, 0.0, 0.0, 1.0, t, 0.0, 0.0]
        return _affine(img, tf.stack(matrix))

    branches = [
        lambda: _autocontrast(img),
        lambda: _equalize(img),
        lambda: 255.0 - img,
        lambda: _rotate(img, _signed(30.0 * m, seed)),
        posterize,
        lambda: tf.where(img < 256.0 - 256.0 * m, img, 255.0 - img),
        lambda: tf.where(img < 128.0, tf.minimum(img + 110.0 * m, 255.0), img),
        lambda: _blend(_grayscale(img), img, enhance()),
        lambda: _blend(tf.fill(tf.shape(img), tf.reduce_mean(_grayscale(img))), img,
                       enhance()),
        lambda: _blend(tf.zeros_like(img), img, enhance()),
        lambda: _sharpness(img, enhance()),
        lambda: shear('x'),
        lambda: shear('y'),
        lambda: translate('x'),
        lambda: translate('y'),
    ]
    return tf.switch_case(index, branches)


def rand_augment(img: tf.Tensor, seed: tf.Tensor, num_layers: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> tf.Tensor:
    """timm's RandAugment. img: float32 [H, W, 3] in [0, 255]; seed: int32 [2]."""
    seeds = tf.random.experimental.stateless_split(seed, 4 * num_layers)
    for layer in range(num_layers):
        s = seeds[4 * layer:4 * layer + 4]
        index = tf.random.stateless_uniform([], s[0], 0, len(OPS), tf.int32)
        mag = magnitude + magnitude_std * tf.random.stateless_normal([], s[1])
        mag = tf.clip_by_value(mag, 0.0, MAX_MAGNITUDE)
        apply = tf.random.stateless_uniform([], s[2]) < prob
        img = tf.cond(apply, lambda: apply_op(index, img, mag, s[3]), lambda: img)
        img.set_shape([None, None, 3])
    return img
