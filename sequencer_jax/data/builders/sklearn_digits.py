"""``sklearn_digits``: the embedded default dataset, as a TFDS builder.

The 1,797 handwritten digits (8x8 grey images, 10 classes) that scikit-learn ships
inside its package (UCI optical recognition of handwritten digits), so nothing is
downloaded. Split 80/20 into train (1,437) and test (360) with a fixed permutation.
Being a real TFDS builder, it flows through exactly the same pipeline as ImageNet.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1437


def split_digits(split: str):
    """scikit-learn's digits and the indices of ``split`` ('train' or 'test') in them."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    return digits, order[:NUM_TRAIN] if split == 'train' else order[NUM_TRAIN:]


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits as a TFDS image classification dataset."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='Handwritten digits shipped with scikit-learn (8x8 grey).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(8, 8, 1)),
                'label': tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is inside scikit-learn.
        return {'train': self._generate_examples('train'),
                'test': self._generate_examples('test')}

    def _generate_examples(self, split):
        digits, order = split_digits(split)
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        for index in order:
            yield int(index), {'image': images[index][:, :, None],
                               'label': int(digits.target[index])}
