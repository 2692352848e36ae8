"""Semantic segmentation data: TFDS image + mask -> mmsegmentation's transforms -> batches.

Train (mmsegmentation's ADE20K pipeline): random rescale of ``scale`` by a ratio in
``ratio_range`` (aspect kept), a random ``image_size`` crop in which no class covers more
than ``cat_max_ratio`` (10 tries), horizontal flip, photometric distortion, normalisation,
padding to the crop (image 0, mask ``ignore_label``). Eval: optionally rescaled to
``eval_scale`` (aspect kept), normalised and padded to ``eval_canvas``, with the real
size kept in ``size`` for sliding-window inference; its mask stays at the original size
(padded to ``eval_label_canvas``), where the predictions are compared, as in
mmsegmentation.

A mask is a TFDS ``Image`` (its first channel) or a 2-D integer tensor; with
``reduce_zero_label``, 0 becomes ``ignore_label`` and every other label one less
(ADE20K's "other" class).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from sequencer_jax.data import batches, pipeline, transforms
from sequencer_jax.errors import UserError


def dataset_spec(config, num_classes: int) -> batches.DatasetSpec:
    """Opens (and if needed prepares) ``config.dataset``, checks its image and mask keys
    and its splits; the classes are ``num_classes`` (a mask does not say how many)."""
    builder = pipeline.load_builder(config.dataset)
    for key, what in ((config.dataset.image_key, 'image'), (config.dataset.label_key, 'label')):
        pipeline.check_key(builder, key, what)
    dcfg = config.dataset
    eval_split, num_eval = pipeline.eval_split_of(builder, dcfg)
    num_train = pipeline.num_examples(builder.info.splits, dcfg.train_split) or 0
    return batches.DatasetSpec(builder, dcfg.train_split, eval_split, num_classes, num_train,
                                num_eval, dcfg.image_key, dcfg.label_key)


def decode(example, spec: batches.DatasetSpec, seg, check: bool = True
           ) -> tuple[tf.Tensor, tf.Tensor]:
    """An example -> (float32 RGB image ``[h, w, 3]`` in [0, 255], int32 mask ``[h, w]``),
    the mask's labels mapped (``reduce_zero_label``). With ``check``, an example whose mask
    has another size than its image, or labels past the last class, stops the input
    with a message saying which (``mask_problem``'s)."""
    image = transforms.to_rgb(transforms.decode(example[spec.image_key]))
    mask = example[spec.label_key]
    feature = spec.builder.info.features[spec.label_key]
    if isinstance(feature, tfds.features.Image):  # 16-bit PNGs keep their labels unscaled
        mask = tf.io.decode_image(mask, channels=0, dtype=tf.as_dtype(feature.dtype),
                                  expand_animations=False)[..., 0]
    mask = tf.cast(mask, tf.int32)
    if seg.reduce_zero_label:
        mask = tf.where(mask == 0, seg.ignore_label, mask - 1)
        mask = tf.where(mask == seg.ignore_label - 1, seg.ignore_label, mask)
    if check:
        tf.debugging.Assert(tf.reduce_all(tf.shape(mask) == tf.shape(image)[:2]), [
            _size_message(spec) + ' Mask and image sizes:', tf.shape(mask),
            tf.shape(image)[:2]])
        tf.debugging.Assert(_largest(mask, seg) < spec.num_classes, [
            _label_message(spec, seg) + ' The largest label:', _largest(mask, seg)])
    return image, mask


def _largest(mask, seg):
    return tf.reduce_max(tf.where(mask == seg.ignore_label, 0, mask))


def _size_message(spec) -> str:
    return (f'A mask ({spec.label_key}) of another size than its image ({spec.image_key}); '
            'each mask must label every pixel of its image.')


def _label_message(spec, seg) -> str:
    return (f'A mask label is not one of the {spec.num_classes} classes '
            f'(config.model.num_classes) nor ignore_label {seg.ignore_label}; raise '
            'config.model.num_classes or set config.segmentation.reduce_zero_label.')


def mask_problem(image: tf.Tensor, mask: tf.Tensor, spec: batches.DatasetSpec, seg
                 ) -> str | None:
    """What is wrong with a decoded (eager) example, or None."""
    if tuple(mask.shape) != tuple(image.shape[:2]):
        return (f'{_size_message(spec)} Its mask is {mask.shape[0]}x{mask.shape[1]}, its '
                f'image {image.shape[0]}x{image.shape[1]}.')
    largest = int(_largest(mask, seg))
    if largest >= spec.num_classes:
        return f'{_label_message(spec, seg)} Its largest label is {largest}.'
    return None


def rescale_size(h: tf.Tensor, w: tf.Tensor, scale) -> tuple[tf.Tensor, tf.Tensor]:
    """mmcv's keep-ratio rescale: the largest size whose long side fits ``scale[0]`` and
    short side ``scale[1]`` (``scale`` may be float tensors), rounded as mmcv does."""
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    factor = tf.minimum(scale[0] / tf.maximum(hf, wf), scale[1] / tf.minimum(hf, wf))
    return (tf.cast(hf * factor + 0.5, tf.int32), tf.cast(wf * factor + 0.5, tf.int32))


def _resized(image, mask, size):
    image = tf.image.resize(image, size, 'bilinear')
    mask = tf.image.resize(mask[..., None], size, 'nearest')[..., 0]
    return image, mask


def _random_crop(image, mask, crop: int, seed, cat_max_ratio: float, ignore: int,
                 num_classes: int):
    """mmsegmentation's RandomCrop: a ``crop`` window (smaller where the image is), drawn
    again up to 10 times while one class covers ``cat_max_ratio`` or more of its labelled
    pixels."""
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]

    def window(attempt):
        s = tf.random.experimental.stateless_fold_in(seed, attempt)
        s = tf.random.experimental.stateless_split(s, 2)
        top = tf.random.stateless_uniform([], s[0], 0, tf.maximum(h - crop, 0) + 1, tf.int32)
        left = tf.random.stateless_uniform([], s[1], 0, tf.maximum(w - crop, 0) + 1, tf.int32)
        return top, left

    def balanced(top, left):
        labels = tf.reshape(mask[top:top + crop, left:left + crop], [-1])
        counts = tf.math.bincount(tf.boolean_mask(labels, labels != ignore),
                                  minlength=num_classes, dtype=tf.int32)
        present = tf.math.count_nonzero(counts)
        return tf.logical_and(present > 1, tf.cast(tf.reduce_max(counts), tf.float32)
                              < cat_max_ratio * tf.cast(tf.reduce_sum(counts), tf.float32))

    def retry(attempt, top, left):
        return [attempt + 1, *window(attempt + 1)]

    def unbalanced(attempt, top, left):
        return tf.logical_and(attempt < 10, tf.logical_not(balanced(top, left)))

    top, left = window(0)
    if cat_max_ratio < 1:
        _, top, left = tf.while_loop(unbalanced, retry, [tf.constant(0), top, left])
    return (image[top:top + crop, left:left + crop], mask[top:top + crop, left:left + crop])


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """mmsegmentation's PhotoMetricDistortion on ``[h, w, 3]`` in [0, 255]: each with
    probability 1/2, brightness +-32, contrast x0.5-1.5 (before or after the colour
    changes, at random), saturation x0.5-1.5, hue +-18 of 180 degrees."""
    s = tf.random.experimental.stateless_split(seed, 9)
    coin = lambda i: tf.random.stateless_uniform([], s[i]) < 0.5  # noqa: E731
    uniform = lambda i, low, high: tf.random.stateless_uniform([], s[i], low, high)  # noqa: E731
    clip = lambda x: tf.clip_by_value(x, 0.0, 255.0)  # noqa: E731
    image = tf.where(coin(0), clip(image + uniform(1, -32.0, 32.0)), image)
    contrast_first = coin(2)
    contrast = lambda x: tf.where(coin(3), clip(x * uniform(4, 0.5, 1.5)), x)  # noqa: E731
    image = tf.where(contrast_first, contrast(image), image)
    saturated = tf.image.adjust_saturation(image / 255.0, uniform(6, 0.5, 1.5)) * 255.0
    image = tf.where(coin(5), clip(saturated), image)
    hued = tf.image.adjust_hue(image / 255.0, uniform(8, -18.0, 18.0) / 180.0) * 255.0
    image = tf.where(coin(7), clip(hued), image)
    return tf.where(contrast_first, image, contrast(image))


def _padded(x: tf.Tensor, size, value, key: str = 'eval_canvas') -> tf.Tensor:
    """``x [h, w, ...]`` padded at the bottom and right with ``value`` to ``size``; a
    larger ``x`` stops the input naming config.segmentation's ``key``."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    tf.debugging.Assert(tf.logical_and(h <= size[0], w <= size[1]), [
        f'An eval image larger than config.segmentation.{key}={tuple(size)}: make it hold '
        'every eval image (rescaled for eval_canvas, original for eval_label_canvas). Its '
        'size:', tf.shape(x)[:2]])
    paddings = [[0, size[0] - h], [0, size[1] - w]] + [[0, 0]] * (len(x.shape) - 2)
    return tf.ensure_shape(tf.pad(x, paddings, constant_values=value), [*size, *x.shape[2:]])


def train_preprocess(spec: batches.DatasetSpec, config):
    """``(example, seed) -> {'image' [S, S, 3], 'label' [S, S]}`` for
    ``pipeline.train_dataset``, S = ``config.image_size``."""
    seg, crop = config.segmentation, config.image_size

    def preprocess(example, seed):
        image, mask = decode(example, spec, seg)
        s = tf.random.experimental.stateless_split(seed, 4)
        ratio = tf.random.stateless_uniform([], s[0], *seg.ratio_range)
        size = rescale_size(tf.shape(mask)[0], tf.shape(mask)[1],
                            (seg.scale[0] * ratio, seg.scale[1] * ratio))
        image, mask = _resized(image, mask, size)
        image, mask = _random_crop(image, mask, crop, s[1], seg.cat_max_ratio,
                                   seg.ignore_label, spec.num_classes)
        if seg.flip:
            flip = tf.random.stateless_uniform([], s[2]) < 0.5
            image = tf.where(flip, image[:, ::-1], image)
            mask = tf.where(flip, mask[:, ::-1], mask)
        if seg.photometric:
            image = photometric_distortion(image, s[3])
        return {'image': _padded(transforms.normalize(image), (crop, crop), 0.0),
                'label': _padded(mask, (crop, crop), seg.ignore_label)}

    return preprocess


def eval_canvas(config) -> tuple[int, int]:
    """The (H, W) every eval image is padded to."""
    return tuple(config.segmentation.eval_canvas or (config.image_size,) * 2)


def label_canvas(config) -> tuple[int, int]:
    """The (H, W) every eval mask is padded to: at its original size, which is the image's
    unless ``eval_scale`` rescales it."""
    seg = config.segmentation
    return tuple(seg.eval_label_canvas or eval_canvas(config)) if seg.eval_scale \
        else eval_canvas(config)


def eval_dataset(spec: batches.DatasetSpec, config, local_batch: int, split: str | None = None,
                 process_index: int | None = None, process_count: int | None = None):
    """This process's padded eval batches and their count: ``image [H, W, 3]`` (rescaled
    to ``eval_scale`` if set) with ``size [2]``, its rows and columns on the canvas; the
    mask at its original size, ``label [Hl, Wl]`` (``ignore_label`` outside it) with
    ``label_size [2]``; and ``mask`` (1 for real examples)."""
    seg, canvas, labels = config.segmentation, eval_canvas(config), label_canvas(config)

    def preprocess(example):
        image, mask = decode(example, spec, seg)
        label_size = tf.shape(mask)[:2]
        if seg.eval_scale:
            image = tf.image.resize(image, rescale_size(
                label_size[0], label_size[1], tuple(float(v) for v in seg.eval_scale)),
                'bilinear')
        size = tf.shape(image)[:2]
        return {'image': _padded(transforms.normalize(image), canvas, 0.0, 'eval_canvas'),
                'size': size, 'label': _padded(mask, labels, seg.ignore_label,
                                               'eval_label_canvas'),
                'label_size': label_size}

    padding = {'image': tf.zeros([*canvas, 3]), 'size': tf.constant(canvas, tf.int32),
               'label': tf.fill(labels, tf.constant(seg.ignore_label, tf.int32)),
               'label_size': tf.constant(labels, tf.int32)}
    return pipeline.padded_eval_batches(spec, config, local_batch, preprocess, padding, split,
                                        process_index, process_count)


def check_first_example(spec: batches.DatasetSpec, config) -> None:
    """Reads the first train example, so that a mask of the wrong size or with labels past
    the classes stops the run before any work, not at its first bad batch."""
    for example in pipeline.read(spec, spec.train_split).take(1):
        problem = mask_problem(*decode(example, spec, config.segmentation, check=False),
                               spec, config.segmentation)
        if problem:
            raise UserError(f'{spec.builder.name}, the first example of split '
                            f'{spec.train_split!r}: {problem}')
