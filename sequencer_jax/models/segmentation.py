"""Sequencer as a dense-prediction backbone: a feature pyramid, UperNet and an FCN head.

Sequencer's stages run at strides 7, 14, 14, 14 (one downsampling after the stem), not
the 4-8-16-32 a UperNet expects. ``SequencerPyramid`` builds the four levels as ViTDet's
simple feature pyramid does for a plain backbone, each from the stage whose depth suits
it: stage 0 deconvolved 2x (stride 3.5) and as it is (stride 7), stage 2 (stride 14), and
stage 3 max-pooled 2x (stride 28). ``UperNetHead`` is mmsegmentation's ``UPerHead``
(pyramid pooling on the coarsest level, a top-down FPN, the levels fused at the finest),
``FCNHead`` its auxiliary head on stage 2. Normalisation in the heads is GroupNorm, not
mmsegmentation's SyncBN: no batch statistics to carry in the train state, and the same
model at any per-device batch size.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequencer_jax.errors import UserError
from sequencer_jax.models.sequencer import LAYER_NORM_EPS, LayerNorm, Sequencer

Array = jax.Array
INFERENCE_MODES = ('whole', 'slide')


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
    """``[B, h, w, C]`` -> ``[B, *size, C]``, bilinear with half-pixel centres and no
    antialiasing: PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)``."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), 'linear', antialias=False)


def _adaptive_pool_matrix(length: int, bins: int) -> np.ndarray:
    """``[bins, length]``: row i averages PyTorch's adaptive-pooling window i,
    ``[floor(i L / n), ceil((i + 1) L / n))``."""
    matrix = np.zeros((bins, length), np.float32)
    for i in range(bins):
        start, stop = (i * length) // bins, math.ceil((i + 1) * length / bins)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def adaptive_avg_pool(x: Array, bins: int) -> Array:
    """``[B, H, W, C]`` -> ``[B, bins, bins, C]``, as ``nn.AdaptiveAvgPool2d(bins)``."""
    rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], bins), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], bins), x.dtype)
    return jnp.einsum('ih,bhwc,jw->bijc', rows, x, cols)


class ConvNormAct(nn.Module):
    """Conv (no bias) -> GroupNorm -> ReLU: mmsegmentation's ``ConvModule``."""

    features: int
    kernel_size: int = 1
    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        x = nn.Conv(self.features, (k, k), padding='SAME', use_bias=False, dtype=self.dtype)(x)
        x = nn.GroupNorm(num_groups=math.gcd(self.groups, self.features), dtype=self.dtype)(x)
        return nn.relu(x)


class SequencerPyramid(nn.Module):
    """The backbone's four stage outputs -> four levels ``[B, h_i, w_i, C_i]`` at strides
    3.5, 7, 14 and 28 of the image (``levels``: which stage feeds each level)."""

    channels: Sequence[int]
    levels: Sequence[int] = (0, 0, 2, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages: Sequence[Array]) -> list[Array]:
        outputs = []
        for level, stage in enumerate(self.levels):
            x = LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name=f'norm_{level}')(stages[stage])
            if level == 0:
                x = nn.ConvTranspose(self.channels[0], (2, 2), strides=(2, 2),
                                     dtype=self.dtype, name='up')(x)
            elif level == 3:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            outputs.append(x)
        return outputs


class UperNetHead(nn.Module):
    """mmsegmentation's UPerHead: pyramid pooling on the last level, lateral 1x1 convs
    and a top-down pathway, 3x3 FPN convs, every level resized to the first and fused.

    levels ``[B, h_i, w_i, C_i]`` -> logits ``[B, h_0, w_0, num_classes]``.
    """

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> Array:
        top = levels[-1]
        pooled = [resize_bilinear(ConvNormAct(self.channels, dtype=self.dtype,
                                              name=f'ppm_{i}')(adaptive_avg_pool(top, s)),
                                  top.shape[1:3])
                  for i, s in enumerate(self.pool_scales)]
        psp = ConvNormAct(self.channels, 3, dtype=self.dtype, name='bottleneck')(
            jnp.concatenate([top, *pooled], axis=-1))
        laterals = [ConvNormAct(self.channels, dtype=self.dtype, name=f'lateral_{i}')(x)
                    for i, x in enumerate(levels[:-1])] + [psp]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i],
                                                                laterals[i - 1].shape[1:3])
        outs = [ConvNormAct(self.channels, 3, dtype=self.dtype, name=f'fpn_{i}')(x)
                for i, x in enumerate(laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[1:3]
        x = jnp.concatenate([resize_bilinear(o, size) for o in outs], axis=-1)
        x = ConvNormAct(self.channels, 3, dtype=self.dtype, name='fpn_bottleneck')(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name='classifier')(x)


class FCNHead(nn.Module):
    """mmsegmentation's FCNHead (one 3x3 conv), the recipe's auxiliary head:
    ``[B, h, w, C]`` -> logits ``[B, h, w, num_classes]``."""

    num_classes: int
    channels: int = 256
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = ConvNormAct(self.channels, 3, dtype=self.dtype)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name='classifier')(x)


class SequencerUperNet(nn.Module):
    """A Sequencer backbone (``backbone``, built with ``num_classes=0``), its pyramid and
    UperNet; with ``aux_channels``, an FCN head on stage 2 during training.

    images ``[B, H, W, 3]`` -> logits ``[B, H, W, num_classes]`` (UperNet's stride-3.5
    logits resized to the image); with ``train=True``, ``(logits, aux_logits)``, the aux
    ``None`` without the auxiliary head.
    """

    backbone: Sequencer
    num_classes: int
    channels: int = 512
    aux_channels: int | None = 256
    dtype: Any = jnp.float32

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """The backbone's check, and two patches of its last stage for the pooled level."""
        self.backbone.check_input_shape(shape)
        smallest = 2 * self.backbone.total_stride
        if min(shape[1:3]) < smallest:
            raise UserError(f'Images of {shape[1]}x{shape[2]} pixels are too small for the '
                            "pyramid, which pools the last stage's grid 2x: the smallest size "
                            f'that works is {smallest}x{smallest}.')

    @nn.compact
    def __call__(self, images: Array, train: bool = False):
        self.check_input_shape(images.shape)
        stages = self.backbone.features(images, train=train)
        dims = [stage.shape[-1] for stage in stages]
        levels = SequencerPyramid((dims[0],) * 2 + (dims[2], dims[3]), dtype=self.dtype,
                                  name='pyramid')(stages)
        logits = UperNetHead(self.num_classes, self.channels, dtype=self.dtype,
                             name='decode_head')(levels, train)
        logits = resize_bilinear(logits, images.shape[1:3])
        aux = None
        if self.aux_channels and (train or self.is_initializing()):  # its params in any init
            aux = resize_bilinear(FCNHead(self.num_classes, self.aux_channels, dtype=self.dtype,
                                          name='aux_head')(stages[2], train), images.shape[1:3])
        return (logits, aux) if train else logits


def resized_to_labels(logits: Array, sizes: Array, label_sizes: Array,
                      label_shape: Sequence[int]) -> Array:
    """Canvas logits ``[B, H, W, K]`` of images of ``sizes [B, 2]`` -> ``[B, *label_shape,
    K]`` whose top-left ``label_sizes [B, 2]`` hold each image's logits resized to its
    original size: bilinear as ``F.interpolate(align_corners=False)``, which
    mmsegmentation applies before comparing with the labels (the image's edge rows and
    columns repeat beyond it, as PyTorch clamps)."""
    h, w = logits.shape[1:3]

    def one(x, size, label_size):
        x = x[jnp.minimum(jnp.arange(h), size[0] - 1)][:, jnp.minimum(jnp.arange(w), size[1] - 1)]
        scale = label_size.astype(jnp.float32) / size.astype(jnp.float32)
        return jax.image.scale_and_translate(x, (*label_shape, x.shape[-1]), (0, 1), scale,
                                             jnp.zeros(2), 'linear', antialias=False)

    return jax.vmap(one)(logits, sizes, label_sizes)


def _num_windows(length, crop, stride, maximum=max):
    """mmsegmentation's window count along a side of ``length``: ints (``maximum=max``,
    a static count) or arrays (``maximum=jnp.maximum``)."""
    return maximum(length - crop + stride - 1, 0) // stride + 1


def slide_logits(logits_fn, images: Array, sizes: Array, crop: Sequence[int],
                 stride: Sequence[int]) -> Array:
    """Sliding-window inference as mmsegmentation's ``slide_inference``: ``crop`` windows
    every ``stride`` pixels, the last of each row and column ending at the image's edge,
    their logits averaged where they overlap.

    ``images [B, H, W, 3]`` are canvases whose top-left ``sizes [B, 2]`` (rows, columns)
    hold the image, the rest padding; each image gets its own windows, all windows of the
    batch are one call of ``logits_fn`` (``[N, *crop, 3] -> [N, *crop, K]``). Returns
    logits ``[B, H, W, K]`` (0 outside each image). Where an image is smaller than the
    crop, its window also holds padding (mmsegmentation runs the smaller crop as it is:
    one shape for every window here).
    """
    crop, stride = tuple(crop), tuple(stride)
    b, h, w, _ = images.shape
    ph, pw = max(h, crop[0]), max(w, crop[1])
    images = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
    rows, cols = _num_windows(ph, crop[0], stride[0]), _num_windows(pw, crop[1], stride[1])

    def corners(size):
        """[rows * cols, 2] window corners and whether each is one of the image's."""
        limit = jnp.maximum(size - jnp.asarray(crop), 0)
        counts = _num_windows(size, jnp.asarray(crop), jnp.asarray(stride), jnp.maximum)
        i, j = jnp.meshgrid(jnp.arange(rows), jnp.arange(cols), indexing='ij')
        top = jnp.minimum(i.reshape(-1) * stride[0], limit[0])
        left = jnp.minimum(j.reshape(-1) * stride[1], limit[1])
        used = (i.reshape(-1) < counts[0]) & (j.reshape(-1) < counts[1])
        return jnp.stack([top, left], -1), used

    starts, used = jax.vmap(corners)(sizes)                       # [B, N, 2], [B, N]
    cut = lambda image, start: jax.lax.dynamic_slice(  # noqa: E731
        image, (start[0], start[1], 0), (*crop, image.shape[-1]))
    windows = jax.vmap(jax.vmap(cut, (None, 0)))(images, starts)  # [B, N, *crop, 3]
    logits = logits_fn(windows.reshape(-1, *crop, images.shape[-1]))
    logits = logits.reshape(b, rows * cols, *crop, -1).astype(jnp.float32)

    def stitch(window_logits, starts, used):
        total = jnp.zeros((ph, pw, window_logits.shape[-1]), jnp.float32)
        count = jnp.zeros((ph, pw, 1), jnp.float32)
        for n in range(rows * cols):
            weight = used[n].astype(jnp.float32)
            at = (starts[n, 0], starts[n, 1], 0)
            total = jax.lax.dynamic_update_slice(
                total, jax.lax.dynamic_slice(total, at, (*crop, total.shape[-1]))
                + weight * window_logits[n], at)
            count = jax.lax.dynamic_update_slice(
                count, jax.lax.dynamic_slice(count, at, (*crop, 1)) + weight, at)
        return total / jnp.maximum(count, 1.0)

    return jax.vmap(stitch)(logits, starts, used)[:, :h, :w]


def predict_logits(logits_fn, images: Array, sizes: Array, mode: str = 'whole',
                   crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341),
                   flip: bool = False, scales: Sequence[float] = (1.0,)) -> Array:
    """The logits ``[B, H, W, K]`` of canvases ``images [B, H, W, 3]`` (see
    ``slide_logits`` for ``sizes``): ``mode`` 'whole' (the network on the whole canvas)
    or 'slide'.

    With test-time augmentation (``flip``: the mirrored images too; ``scales``: the
    canvases resized by each factor, bilinear, the predictions resized back to the
    canvas), the views' softmax probabilities are averaged, as mmsegmentation's
    ``SegTTAModel`` does, and their log is returned: the same argmax and the same
    log-probabilities as such logits. Two differences: the factors scale the canvas (the
    image as ``eval_scale`` rescaled it, as mmsegmentation 0.x's ``MultiScaleFlipAug``;
    1.x resizes the original image by each), and the views are averaged at the canvas'
    size, before any resizing to the labels' original size. A canvas is resized as a
    whole, so each image's last row and column blend with the padding at scales other
    than 1.
    """
    if mode not in INFERENCE_MODES:
        raise UserError(f'Unknown inference mode {mode!r}: use one of {list(INFERENCE_MODES)}.')

    def once(x, sizes):
        if mode == 'whole':
            return logits_fn(x).astype(jnp.float32)
        return slide_logits(logits_fn, x, sizes, crop, stride)

    def mirror(x, sizes):  # each image within its own width: its padding stays right
        cols = jnp.arange(x.shape[2])[None]
        source = jnp.where(cols < sizes[:, 1:2], sizes[:, 1:2] - 1 - cols, cols)
        return jax.vmap(lambda image, s: image[:, s])(x, source)

    views = []
    for scale in scales:
        shape = images.shape[1:3]
        if scale != 1.0:
            shape = tuple(max(round(side * scale), 1) for side in shape)
        scaled = resize_bilinear(images, shape)
        scaled_sizes = jnp.clip(jnp.round(sizes * scale).astype(sizes.dtype), 1,
                                jnp.asarray(shape))
        predicted = [once(scaled, scaled_sizes)]
        if flip:
            predicted.append(mirror(once(mirror(scaled, scaled_sizes), scaled_sizes),
                                    scaled_sizes))
        views += [resize_bilinear(v, images.shape[1:3]) for v in predicted]
    if len(views) == 1:
        return views[0]
    probabilities = sum(jax.nn.softmax(v, axis=-1) for v in views) / len(views)
    return jnp.log(jnp.maximum(probabilities, jnp.finfo(jnp.float32).tiny))
