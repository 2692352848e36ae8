"""Images/s of the input pipeline alone (decode, augment, batch; no model).

    python -m sequencer_jax.data.benchmark --dataset=sklearn_digits --batch_size=256 \
        --image_size=224 --batches=50

Prints the per-process rate of the train stream (with the configured augmentation) and
of the eval stream.
"""

from __future__ import annotations

import time

import ml_collections
from absl import flags

from sequencer_jax import cli, config_defaults
from sequencer_jax.data import pipeline


def _rate(dataset, batches: int, batch_size: int, warmup: int = 2) -> float:
    iterator = dataset.as_numpy_iterator()
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            break
        count += 1
    return count * batch_size / (time.perf_counter() - start)


_DATASET = flags.DEFINE_string('dataset', 'sklearn_digits', 'TFDS name')
_BATCHES = flags.DEFINE_integer('batches', 20, 'batches to time', lower_bound=1)
_NO_AUGMENT = flags.DEFINE_bool('no_augment', False,
                                'train stream without crop/flip/RandAugment/erasing')
for _name in ('data_dir', 'batch_size', 'image_size'):
    flags.declare_key_flag(_name)
DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE = 128, 224  # per process


def main(argv) -> dict[str, float]:
    del argv
    batch_size = cli.BATCH_SIZE.value or DEFAULT_BATCH_SIZE
    image_size = cli.IMAGE_SIZE.value or DEFAULT_IMAGE_SIZE
    augment = config_defaults.augment_config()
    if _NO_AUGMENT.value:
        augment = config_defaults.augment_config(crop_scale=None, flip=False,
                                                 randaugment=None, erase_prob=0.0)
    config = ml_collections.ConfigDict(dict(
        seed=0, image_size=image_size, eval_image_size=None, crop_pct=0.875,
        dataset=config_defaults.dataset_config(_DATASET.value, data_dir=cli.DATA_DIR.value),
        augment=augment))
    spec = pipeline.dataset_spec(config.dataset)
    train = _rate(pipeline.train_dataset(spec, config, batch_size, process_index=0,
                                         process_count=1), _BATCHES.value, batch_size)
    eval_ds, _ = pipeline.eval_dataset(spec, config, batch_size, process_index=0,
                                       process_count=1)
    evaluation = _rate(eval_ds, _BATCHES.value, batch_size, warmup=0)
    print(f'{spec.builder.name} at {image_size}px, batch {batch_size}: '
          f'train {train:.0f} images/s, eval {evaluation:.0f} images/s (this process)')
    return {'train_images_per_s': train, 'eval_images_per_s': evaluation}


if __name__ == '__main__':
    cli.run(main)
