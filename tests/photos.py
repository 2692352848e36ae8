"""Real photographs of several sizes and aspect ratios, as image files: scikit-learn's two
sample photos (427x640), cropped and scaled, written as PNG (lossless) and JPEG."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np

# Each case: (name, its pixels from a sample photo). Down-scaled (the 427x640 originals,
# a portrait crop, an odd-sized crop) and up-scaled (a 113x150 thumbnail) at 224 px.
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# (size, crop_pct, crop_mode, interpolation): the weights' own, and others of timm's.
CONFIGS = ((224, 0.875, 'center', 'bicubic'), (160, 0.9, 'border', 'bilinear'),
           (128, 1.0, 'squash', 'bicubic'), (288, 0.875, 'center', 'bicubic'))


def photos() -> dict[str, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = {}
    for name in ('china', 'flower'):
        pixels = load_sample_image(f'{name}.jpg')
        out[name] = pixels
        out[f'{name}_portrait'] = pixels[:, 100:401]
        out[f'{name}_odd'] = pixels[3:330, 7:]
        out[f'{name}_thumbnail'] = np.asarray(Image.fromarray(pixels).resize((150, 113)))
    return out


def write(folder: pathlib.Path, fmt: str = 'png') -> dict[str, pathlib.Path]:
    """Every photo as a ``fmt`` file in ``folder``; their paths by name."""
    from PIL import Image

    paths = {}
    for name, pixels in photos().items():
        paths[name] = folder / f'{name}.{fmt}'
        Image.fromarray(pixels).save(paths[name], quality=90)
    return paths


def preprocessing(size: int, crop_pct: float, crop_mode: str, interpolation: str) -> dict:
    return dict(IMAGENET, input_size=(3, size, size), crop_pct=crop_pct, crop_mode=crop_mode,
                interpolation=interpolation)


def to_levels(normalised: np.ndarray) -> np.ndarray:
    """A normalised [H, W, 3] image back in levels of 255 (floats)."""
    return (normalised * np.array(IMAGENET['std']) + np.array(IMAGENET['mean'])) * 255


def digest(levels: np.ndarray) -> str:
    """SHA-256 of 8-bit pixels [H, W, 3]."""
    return hashlib.sha256(np.ascontiguousarray(levels, np.uint8).tobytes()).hexdigest()
