"""``digit_canvases``: the embedded segmentation dataset, as a TFDS builder.

Each 64x64 RGB canvas holds three of scikit-learn's handwritten digits, enlarged 3x, in
random colours, each at a random place in its own quarter of the canvas, over a random
colour gradient with noise; its mask labels every pixel 0 (background) or 1 + the digit
drawn there (11 classes). Train
canvases (1,000) use the digits of ``sklearn_digits``' train split, test canvases (200)
those of its test split, so evaluation sees unseen handwriting. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from sequencer_jax.data.builders.sklearn_digits import split_digits

SIZE = 64
DIGITS_PER_CANVAS = 3
SCALE = 3  # 8x8 digits drawn 24x24
NUM_CANVASES = {'train': 1000, 'test': 200}
NUM_CLASSES = 11  # background and the ten digits


def _canvas(rng: np.random.RandomState, digits: np.ndarray, labels: np.ndarray):
    """One (image uint8 [64, 64, 3], mask uint8 [64, 64, 1]) of random digits, each in
    its own quarter of the canvas."""
    ramp = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    start, end = rng.uniform(0, 160, (2, 1, 1, 3))
    image = start + (end - start) * (ramp if rng.rand() < 0.5 else ramp.transpose(1, 0, 2))
    image = image + rng.normal(0, 12, (SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cell = SIZE // 2
    quarters = rng.choice(4, DIGITS_PER_CANVAS, replace=False)
    for quarter, index in zip(quarters, rng.choice(len(digits), DIGITS_PER_CANVAS,
                                                   replace=False)):
        ink = np.kron(digits[index], np.ones((SCALE, SCALE))) / 16.0  # [24, 24] in [0, 1]
        top, left = (np.array(divmod(quarter, 2)) * cell
                     + rng.randint(0, cell - ink.shape[0] + 1, 2))
        window = (slice(top, top + ink.shape[0]), slice(left, left + ink.shape[1]))
        drawn = ink > 0.35
        colour = rng.uniform(170, 255, 3)
        image[window][drawn] = colour * ink[drawn][:, None] + image[window][drawn] * (
            1 - ink[drawn][:, None])
        mask[window][drawn] = 1 + labels[index]
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask[:, :, None]


class DigitCanvases(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits composited on canvases, labelled per pixel."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description='Three handwritten digits per 64x64 canvas; per-pixel digit labels.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(SIZE, SIZE, 3)),
                'segmentation_mask': tfds.features.Image(shape=(SIZE, SIZE, 1)),
            }),
            supervised_keys=('image', 'segmentation_mask'),
            homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the digits are inside scikit-learn.
        return {split: self._generate_examples(split) for split in NUM_CANVASES}

    def _generate_examples(self, split):
        digits, order = split_digits(split)  # sklearn_digits' split
        rng = np.random.RandomState({'train': 1, 'test': 2}[split])
        for index in range(NUM_CANVASES[split]):
            image, mask = _canvas(rng, digits.images[order], digits.target[order])
            yield index, {'image': image, 'segmentation_mask': mask}
