"""Default config sections shared by the files in configs/ (the paper's values)."""

from __future__ import annotations

import ml_collections


def dataset_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """``config.dataset``: which TFDS dataset and how to read it."""
    config = ml_collections.ConfigDict(dict(
        name=name,
        data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default
        train_split='train',
        eval_split=ml_collections.FieldReference(None, field_type=str),  # None: auto
        image_key='image',
        label_key='label',
        shuffle_buffer=16_384,
        prefetch=2,
        deterministic=True,
        skip_corrupt=False,
    ))
    config.update(overrides)
    return config


def augment_config(**overrides) -> ml_collections.ConfigDict:
    """``config.augment``: the DeiT recipe used by Sequencer (set a part to None / 0 to
    switch it off)."""
    config = ml_collections.ConfigDict(dict(
        crop_scale=(0.08, 1.0),
        flip=True,
        randaugment=ml_collections.ConfigDict(dict(
            num_layers=2, magnitude=9.0, magnitude_std=0.5)),  # rand-m9-mstd0.5-inc1
        erase_prob=0.25,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        switch_prob=0.5,
        label_smoothing=0.1,
    ))
    for key, value in overrides.items():
        config[key] = value
    return config
