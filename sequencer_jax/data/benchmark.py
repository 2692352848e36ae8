"""Images/s of the input pipeline alone (decode, augment, batch; no model).

    python -m sequencer_jax.data.benchmark --dataset sklearn_digits --batch-size 256 \
        --image-size 224 --batches 50

Prints the per-process rate of the train stream (with the configured augmentation) and
of the eval stream.
"""

from __future__ import annotations

import argparse
import time

import ml_collections

from sequencer_jax import arguments, config_defaults
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


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog='python -m sequencer_jax.data.benchmark',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--dataset', default='sklearn_digits', help='TFDS name')
    parser.add_argument('--data-dir', default=None, help='TFDS data dir (default: TFDS)')
    parser.add_argument('--batch-size', type=arguments.at_least(1), default=128,
                        help='per-process batch')
    parser.add_argument('--image-size', type=arguments.at_least(1), default=224)
    parser.add_argument('--batches', type=arguments.at_least(1), default=20)
    parser.add_argument('--no-augment', action='store_true',
                        help='train stream without crop/flip/RandAugment/erasing')
    args = parser.parse_args(argv)
    augment = config_defaults.augment_config()
    if args.no_augment:
        augment = config_defaults.augment_config(crop_scale=None, flip=False,
                                                 randaugment=None, erase_prob=0.0)
    config = ml_collections.ConfigDict(dict(
        seed=0, image_size=args.image_size, eval_image_size=None, crop_pct=0.875,
        dataset=config_defaults.dataset_config(args.dataset, data_dir=args.data_dir),
        augment=augment))
    try:
        spec = pipeline.dataset_spec(config.dataset)
    except ValueError as e:
        parser.exit(2, f'error: {e}\n')
    train = _rate(pipeline.train_dataset(spec, config, args.batch_size, process_index=0,
                                         process_count=1), args.batches, args.batch_size)
    eval_ds, _ = pipeline.eval_dataset(spec, config, args.batch_size, process_index=0,
                                       process_count=1)
    evaluation = _rate(eval_ds, args.batches, args.batch_size, warmup=0)
    print(f'{spec.builder.name} at {args.image_size}px, batch {args.batch_size}: '
          f'train {train:.0f} images/s, eval {evaluation:.0f} images/s (this process)')
    return {'train_images_per_s': train, 'eval_images_per_s': evaluation}


if __name__ == '__main__':
    main()
