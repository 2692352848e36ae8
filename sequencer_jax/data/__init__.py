"""Input pipeline: TFDS datasets, augmentation, on-device mixing."""
