"""Writes a miniature ImageNet in TFDS's manual-download layout.

``ILSVRC2012_img_train.tar`` is a tar of per-synset tars of JPEGs, and
``ILSVRC2012_img_val.tar`` a flat tar of ``ILSVRC2012_val_%08d.JPEG`` whose labels
TFDS takes from its bundled validation_labels.txt. Every image of a class is filled
with that class's colour, so tests can check the labels the pipeline delivers.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def imagenet_synsets() -> list[str]:
    path = tfds.core.tfds_path('datasets/imagenet2012/labels.txt')
    return tf.io.gfile.GFile(os.fspath(path)).read().split()


def validation_synsets() -> list[str]:
    path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
    return tf.io.gfile.GFile(os.fspath(path)).read().split()


def class_colour(label: int) -> np.ndarray:
    """A distinct RGB colour per ImageNet class index."""
    rng = np.random.RandomState(label)
    return rng.randint(30, 226, size=3).astype(np.uint8)


def _jpeg(label: int, height: int, width: int) -> bytes:
    image = np.broadcast_to(class_colour(label), (height, width, 3))
    return tf.io.encode_jpeg(tf.constant(image), quality=95).numpy()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_mini_imagenet(manual_dir: str, num_classes: int = 3, per_class: int = 4,
                        num_val: int = 6, corrupt_train: int = 0) -> dict:
    """Writes both tars; returns the expected labels {'train': [...], 'validation': [...]}.

    ``corrupt_train`` train images get truncated JPEG bytes (for error-handling tests).
    """
    os.makedirs(manual_dir, exist_ok=True)
    synsets = imagenet_synsets()
    expected = {'train': [], 'validation': []}
    with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
        for label in range(num_classes):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode='w') as inner:
                for i in range(per_class):
                    data = _jpeg(label, 40 + 4 * i, 52)
                    if corrupt_train and label == 0 and i < corrupt_train:
                        data = data[:len(data) // 3]
                    _add(inner, f'{synsets[label]}_{i}.JPEG', data)
                    expected['train'].append(label)
            _add(outer, f'{synsets[label]}.tar', buf.getvalue())
    val_synsets = validation_synsets()
    with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as tar:
        for i in range(num_val):
            label = synsets.index(val_synsets[i])
            _add(tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(label, 48, 36))
            expected['validation'].append(label)
    return expected
