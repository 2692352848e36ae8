"""Images as the weights want them: timm's eval preprocessing, pixel for pixel, with PIL.

    x = sj.preprocess('photo.jpg', preprocessing)   # [H, W, 3] float32, as timm feeds it

``preprocessing`` is what ``sj.load_pretrained`` returns (timm's ``pretrained_cfg``:
``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``). The
geometry is timm's ``transforms_imagenet_eval`` with torchvision's rules (``resized_size``,
``crop_offset``, ``padding``);
the resampling is PIL's, as timm's own (antialiased when it shrinks). The tf.data
pipeline (``data.transforms.eval_transform``) follows the same rules in TensorFlow ops.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from sequencer_jax.errors import UserError

CROP_MODES = ('center', 'squash', 'border')
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest')


def scale_size(size: int, crop_pct: float) -> int:
    """The side an image is resized to before its ``size`` crop: floor(size / crop_pct)."""
    return math.floor(size / crop_pct)


def resized_size(height: int, width: int, size: int, crop_pct: float,
                 crop_mode: str = 'center') -> tuple[int, int]:
    """(height, width) an image is resized to, by timm's eval rule for ``crop_mode``:
    'center' (torchvision's ``Resize(int)``: the shorter side to ``scale_size``, the
    longer truncated), 'squash' (both sides to it), 'border' (timm's ``ResizeKeepRatio``
    with ``longest=1``: the longer side to it, the other rounded)."""
    scale = scale_size(size, crop_pct)
    if crop_mode == 'squash':
        return scale, scale
    if crop_mode == 'border':
        ratio = max(height / scale, width / scale)
        return round(height / ratio), round(width / ratio)
    if height <= width:
        return scale, int(scale * width / height)
    return int(scale * height / width), scale


def crop_offset(length: int, size: int) -> int:
    """Where torchvision's ``CenterCrop`` starts a ``size`` crop of ``length`` pixels
    (Python's round: halves to even)."""
    return int(round((length - size) / 2.0))


def padding(length: int, size: int) -> tuple[int, int]:
    """(before, after) padding that ``CenterCrop`` adds to ``length`` pixels shorter than
    ``size``."""
    if length >= size:
        return 0, 0
    return (size - length) // 2, (size - length + 1) // 2


def to_rgb(image: Any, name: str = 'the image'):
    """A PIL RGB image of a path, a PIL image or a uint8 array (grey ``[H, W]`` or ``[H, W,
    1]``, RGB, RGBA); a UserError naming ``name`` for anything else."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError:
            raise UserError(f'{name}: no such file.') from None
        except UnidentifiedImageError:
            raise UserError(f'{name}: not an image PIL can read.') from None
        except OSError as e:  # truncated or damaged data
            raise UserError(f'{name}: cannot be decoded ({e}).') from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise UserError(f'{name}: expected a uint8 array [H, W], [H, W, 1], [H, W, 3] or '
                            f'[H, W, 4], got {image.dtype} {list(image.shape)}.')
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                                else image)
    if not isinstance(image, Image.Image):
        raise UserError(f'{name}: expected a path, a PIL image or a uint8 array, got '
                        f'{type(image).__name__}.')
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        raise UserError(f'{name}: a {image.mode} image (16-bit or float pixels); convert it '
                        'to 8-bit RGB first.')
    return image.convert('RGB')


def preprocess(image: Any, preprocessing: dict[str, Any]) -> np.ndarray:
    """``image`` (see ``to_rgb``) as the weights want it: ``[H, W, 3]`` float32, the
    tensor timm's eval transform gives for the same image (channels last)."""
    from PIL import Image

    size = preprocessing['input_size'][-1]
    crop_pct = preprocessing.get('crop_pct') or 0.875
    crop_mode = preprocessing.get('crop_mode') or 'center'
    interpolation = preprocessing.get('interpolation') or 'bilinear'
    if crop_mode not in CROP_MODES or interpolation not in INTERPOLATIONS:
        raise UserError(f'Preprocessing with crop_mode={crop_mode!r} and interpolation='
                        f'{interpolation!r}: use one of {CROP_MODES} and {INTERPOLATIONS}.')
    image = to_rgb(image)
    height, width = resized_size(image.height, image.width, size, crop_pct, crop_mode)
    resample = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR,
                'nearest': Image.NEAREST}[interpolation]
    pixels = np.asarray(image.resize((width, height), resample))
    fill = [round(255 * m) for m in preprocessing['mean']] if crop_mode == 'border' else 0
    pads = [padding(height, size), padding(width, size)]
    if any(sum(p) for p in pads):
        pixels = np.stack([np.pad(pixels[..., c], pads, constant_values=f) for c, f in
                           enumerate(np.broadcast_to(fill, 3))], axis=-1)
    top, left = crop_offset(pixels.shape[0], size), crop_offset(pixels.shape[1], size)
    pixels = pixels[top:top + size, left:left + size].astype(np.float32) / 255
    mean, std = (np.asarray(preprocessing[k], np.float32) for k in ('mean', 'std'))
    return (pixels - mean) / std
