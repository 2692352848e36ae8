"""TFDS -> per-process shards -> augmented batches -> global, sharded ``jax.Array``s.

Every process reads its own disjoint part of a split (``tfds.even_splits``), decodes
and augments in parallel tf.data maps with per-example stateless seeds (derived from
the config seed, the process index and the example's position in the stream, so a
resumed stream repeats an uninterrupted one), batches its share of the global batch
and prefetches. ``GlobalBatches`` turns the local batches into global arrays sharded
over the mesh's batch axes with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import difflib
import errno
import math
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sequencer_jax import storage
from sequencer_jax.data import builders  # noqa: F401  (registers the embedded dataset)
from sequencer_jax.data import transforms
from sequencer_jax.data.batches import DatasetSpec, check_train_split
from sequencer_jax.errors import UserError, on_process_zero

IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
EVAL_SPLIT_CANDIDATES = ('validation', 'test')


def _data_dir(config) -> str | None:
    return os.path.expanduser(config.data_dir) if config.data_dir else None


def manual_dir(config) -> str:
    """Where TFDS looks for manually downloaded files (e.g. the ImageNet tars)."""
    root = _data_dir(config) or os.environ.get(
        'TFDS_DATA_DIR', os.path.join(os.path.expanduser('~'), 'tensorflow_datasets'))
    return os.path.join(root, 'downloads', 'manual')


def _base_name(name: str) -> str:
    """The dataset of a TFDS name: 'cifar10' of 'cifar10:3.0.2' or of 'cifar10/config'."""
    return name.split(':')[0].split('/')[0]


def _check_manual_files(config) -> None:
    if _base_name(config.name) != 'imagenet2012':
        return
    folder = manual_dir(config)
    missing = [f for f in IMAGENET_MANUAL_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise UserError(
            f'imagenet2012 needs a manual download: put {" and ".join(missing)} (from '
            f'https://image-net.org/download-images, "ILSVRC2012" training and validation '
            f'images) into {folder}/, or set config.dataset.data_dir to a directory whose '
            f'downloads/manual/ holds them.')


def check_key(builder, key: str, what: str) -> None:
    features = builder.info.features
    if key not in features:
        raise UserError(f'{builder.name} has no feature {key!r} for the {what}; its '
                         f'features are {sorted(features.keys())}. Set '
                         f'config.dataset.{what}_key.')


def unknown_dataset_message(name: str) -> str:
    """What to say of a dataset name TFDS does not know: the nearest names it does
    (TFDS's own error lists all ~450 of them)."""
    close = difflib.get_close_matches(_base_name(name).lower(),
                                      tfds.list_builders(with_community_datasets=False),
                                      n=3, cutoff=0.6)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    return (f'Unknown TFDS dataset {name!r}{hint}. Use a name from the TFDS catalogue '
            '(https://www.tensorflow.org/datasets/catalog/overview), e.g. imagenet2012 or '
            'cifar10, or sklearn_digits (embedded).')


def load_builder(config, prepare: bool = True):
    """The TFDS builder of ``config`` (``config.dataset``), prepared on first use.

    Of several processes, process 0 prepares first and the others after it, each only
    where it does not see the prepared dataset then (a data_dir on its own disk): processes
    sharing a data_dir (a bucket, NFS) would otherwise all write it, and all but one fail
    to move their copy into place. If process 0 fails, the others stop too, saying so,
    instead of waiting for it or preparing the dataset themselves."""
    if not prepare:
        return _open_builder(config)
    builder = on_process_zero(
        lambda: _prepared_builder(config),
        lambda: UserError(f'Process 0 could not prepare TFDS dataset {config.name} (its '
                          'output says why); fix that and rerun every process.'))
    return builder if jax.process_index() == 0 else _prepared_builder(config)


def _open_builder(config):
    try:
        return tfds.builder(config.name, data_dir=_data_dir(config))
    except ValueError as e:
        # Not found, or a name TFDS cannot even parse ('cifar-10'); other errors (an
        # unknown builder config, say) are TFDS's own, with their suggestions.
        parsable = _base_name(config.name).isidentifier()
        if isinstance(e, tfds.core.registered.DatasetNotFoundError) or not parsable:
            raise UserError(unknown_dataset_message(config.name)) from None
        raise


def _prepared_builder(config):
    builder = _open_builder(config)
    if not builder.is_prepared():
        _check_manual_files(config)
        if _data_dir(config):  # where TFDS would fail with a bare OSError, or blame a download
            storage.created_dir(_data_dir(config), 'the TFDS data_dir (config.dataset.data_dir)')
        print(f'Preparing TFDS dataset {builder.name} in {builder.data_dir} (first use only; '
              'ImageNet takes hours)...', flush=True)
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir(config)))
        except (OSError, RuntimeError, tf.errors.OpError) as e:
            if _out_of_space(e):
                # TFDS removes its incomplete folder on errors: nothing is left to clean.
                raise UserError(
                    f'Could not prepare TFDS dataset {builder.name} in {builder.data_dir}: '
                    f'the disk is full ({str(e).splitlines()[0]}). Free space there, or set '
                    'config.dataset.data_dir to a disk with room for the prepared dataset '
                    '(imagenet2012: about 156 GiB, besides the tars), and rerun.') from None
            if not isinstance(e, OSError):  # requests' connection errors are OSErrors too
                raise
            raise UserError(
                f'Could not prepare TFDS dataset {builder.name} in {builder.data_dir}: '
                f'{type(e).__name__}: {e}. TFDS downloads it on first use; without internet '
                f'access, prepare it where there is (tfds build {config.name} '
                '--data_dir=DIR), copy DIR here and set config.dataset.data_dir=DIR.') from None
        print(f'Prepared {builder.name}.', flush=True)
    return builder


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` or one it was raised from says the disk is full (TFDS wraps
    TensorFlow's write errors in a RuntimeError, and checks the free space first)."""
    while error is not None:
        if getattr(error, 'errno', None) == errno.ENOSPC or any(
                words in str(error) for words in ('No space left on device',
                                                  'Not enough disk space')):
            return True
        error = error.__cause__ or error.__context__
    return False


def dataset_spec(config) -> DatasetSpec:
    """Opens (and if needed prepares) ``config.dataset`` and validates its keys."""
    builder = load_builder(config)
    check_key(builder, config.image_key, 'image')
    check_key(builder, config.label_key, 'label')
    splits = builder.info.splits
    eval_split, num_eval = eval_split_of(builder, config)
    label = builder.info.features[config.label_key]
    multi_label = isinstance(label, tfds.features.Sequence)
    class_label = label.feature if multi_label else label
    if not hasattr(class_label, 'num_classes'):
        raise UserError(f'{config.label_key!r} of {builder.name} is not a class label.')
    # Evaluation-only datasets (ImageNet-A, ...) have no train split: 0 examples.
    return DatasetSpec(builder, config.train_split, eval_split, class_label.num_classes,
                       num_examples(splits, config.train_split) or 0, num_eval,
                       config.image_key, config.label_key, multi_label)


def eval_split_of(builder, config) -> tuple[str, int]:
    """The eval split of ``config`` (``config.dataset``; by default the dataset's
    validation, else its test split) and its number of examples."""
    split = config.eval_split or next(
        (s for s in EVAL_SPLIT_CANDIDATES if s in builder.info.splits), None)
    return split, split_examples(builder, split, 'Set config.dataset.eval_split.')


def split_examples(builder, split: str | None, fix: str) -> int:
    """Examples in ``split`` of ``builder``'s dataset; a UserError naming its splits,
    and ending with ``fix``, when it has no such split."""
    count = num_examples(builder.info.splits, split)
    if count is None:
        raise UserError(f'{builder.name} has no split {split!r}; it has '
                         f'{sorted(builder.info.splits.keys())}. {fix}')
    return count


def num_examples(splits, split: str | None) -> int | None:
    """Examples in a split expression ('train', 'train[:10%]', 'train+validation');
    None when the dataset has no such split."""
    if split is None:
        return None
    try:
        return splits[split].num_examples
    except (KeyError, ValueError):
        return None


def _decode(example, spec: DatasetSpec):
    image = transforms.decode(example[spec.image_key])
    label = example[spec.label_key]
    if spec.multi_label:  # a list of classes -> multi-hot [K]
        label = tf.reduce_max(tf.one_hot(label, spec.num_classes), axis=0)
        return image, tf.ensure_shape(label, [spec.num_classes])
    return image, tf.cast(label, tf.int32)


def read(spec: DatasetSpec, split: str, shuffle_files: bool = False) -> tf.data.Dataset:
    features = spec.builder.info.features
    # Images (and segmentation masks) stay encoded: decoded in the parallel map.
    raw = [k for k in (spec.image_key, spec.label_key)
           if isinstance(features[k], tfds.features.Image)]
    return spec.builder.as_dataset(
        split=split, shuffle_files=shuffle_files,
        decoders={k: tfds.decode.SkipDecoding() for k in raw},
        read_config=tfds.ReadConfig(try_autocache=False))


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.threading.private_threadpool_size = 0
    return options


def train_dataset(spec: DatasetSpec, config, local_batch: int, start_example: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  preprocess: Callable[[dict, tf.Tensor], dict] | None = None
                  ) -> tf.data.Dataset:
    """This process's infinite stream of augmented train batches (numpy dicts).

    ``preprocess(example, seed)`` turns one raw example and its ``[2]`` int32 seed into
    the arrays of a batch; the default (classification): ``image [S, S, 3]`` float32 and
    integer ``label``. ``start_example`` skips that many examples of this process's
    stream (for resume); the epochs before it are not read again.
    """
    check_train_split(spec)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    split = tfds.even_splits(spec.train_split, n=process_count,
                             drop_remainder=True)[process_index]
    examples_per_epoch = spec.num_train_examples // process_count
    seed = int(np.random.SeedSequence([config.seed, process_index]).generate_state(1)[0])
    base = read(spec, split)
    dcfg = config.dataset

    def epoch(e):
        order = base.shuffle(dcfg.shuffle_buffer, seed=seed + e,
                             reshuffle_each_iteration=False)
        index = tf.data.Dataset.range(e * examples_per_epoch, (e + 1) * examples_per_epoch)
        return tf.data.Dataset.zip((index, order))

    first_epoch, offset = divmod(start_example, examples_per_epoch)
    ds = tf.data.Dataset.range(first_epoch, 2**40).flat_map(epoch).skip(offset)

    def classify(example, example_seed):
        image, label = _decode(example, spec)
        image = transforms.train_transform(image, example_seed, config.image_size,
                                           config.augment)
        return {'image': image, 'label': label}

    def seeded(index, example):
        example_seed = tf.stack([tf.cast(seed % 2**31, tf.int64), index])
        return (preprocess or classify)(example, tf.cast(example_seed % 2**31, tf.int32))

    ds = ds.map(seeded, num_parallel_calls=tf.data.AUTOTUNE)
    if dcfg.skip_corrupt:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(dcfg.prefetch).with_options(_options(dcfg.deterministic))


def eval_dataset(spec: DatasetSpec, config, local_batch: int, image_size: int | None = None,
                 crop_pct: float | None = None, split: str | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 preprocessing: dict | None = None) -> tuple[tf.data.Dataset, int]:
    """This process's padded classification eval batches and how many there are (see
    ``padded_eval_batches``): ``image``, ``label`` and ``mask``.

    ``preprocessing``: the ``mean``, ``std`` (of [0, 1] images), ``interpolation`` and
    ``crop_mode`` the weights want (``weights.preprocessing``); None: ImageNet's, bicubic,
    'center'.
    """
    image_size = image_size or config.eval_image_size or config.image_size
    crop_pct = config.crop_pct if crop_pct is None else crop_pct
    normalisation = {}
    if preprocessing:
        normalisation = dict(mean=tuple(255 * m for m in preprocessing['mean']),
                             std=tuple(255 * s for s in preprocessing['std']),
                             interpolation=preprocessing['interpolation'],
                             crop_mode=preprocessing.get('crop_mode') or 'center')

    def preprocess(example):
        image, label = _decode(example, spec)
        return {'image': transforms.eval_transform(image, image_size, crop_pct, **normalisation),
                'label': label}

    no_label = tf.zeros([spec.num_classes]) if spec.multi_label else tf.constant(0, tf.int32)
    padding = {'image': tf.zeros([image_size, image_size, 3]), 'label': no_label}
    return padded_eval_batches(spec, config, local_batch, preprocess, padding, split,
                               process_index, process_count)


def padded_eval_batches(spec: DatasetSpec, config, local_batch: int,
                        preprocess: Callable[[dict], dict], padding: dict,
                        split: str | None = None, process_index: int | None = None,
                        process_count: int | None = None) -> tuple[tf.data.Dataset, int]:
    """This process's share of an eval split, ``preprocess``-ed and padded with copies of
    ``padding`` to the same number of batches on every process (returned with them).
    Each example gets ``mask``: 1 for real examples, 0 for padding, so that metrics summed
    over ``mask`` count every example of the split exactly once."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    split = split or spec.eval_split
    total = num_examples(spec.builder.info.splits, split)
    per_process_max = math.ceil(total / process_count)
    num_batches = math.ceil(per_process_max / local_batch)
    shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds = read(spec, shard).map(lambda e: preprocess(e) | {'mask': tf.constant(1, tf.int32)},
                                num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(padding | {'mask': tf.constant(0, tf.int32)})
    ds = ds.concatenate(padding.repeat()).take(num_batches * local_batch).batch(local_batch)
    return ds.prefetch(config.dataset.prefetch).with_options(_options(True)), num_batches


class GlobalBatches:
    """Iterates a tf.data dataset of local numpy batches as global sharded jax.Arrays.

    Args:
      dataset: yields dicts of per-process arrays with a leading local batch axis.
      sharding: a ``NamedSharding`` whose spec shards axis 0 over the batch mesh axes.
      description: named in the error raised when the input fails (e.g. corrupt data).
    """

    def __init__(self, dataset: tf.data.Dataset, sharding: jax.sharding.Sharding,
                 description: str = 'dataset', skippable: bool = False):
        self._iterator = dataset.as_numpy_iterator()
        self._sharding = sharding
        self._description = description
        self._skippable = skippable  # config.dataset.skip_corrupt applies (train streams)

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        try:
            local = next(self._iterator)
        except tf.errors.InvalidArgumentError as e:
            # TF prefixes the op's cause with the function it ran in: noise to a reader.
            cause = re.sub(r'\{\{[^}]*\}\}\s*', '', e.message.splitlines()[0])
            skip = (' Set config.dataset.skip_corrupt=True to skip such examples with a '
                    'warning.') if self._skippable else ''
            raise UserError(f'Reading {self._description} failed on a bad example (e.g. a '
                            f'corrupt image): {cause}.{skip}') from None
        return jax.tree.map(self._to_global, local)

    def _to_global(self, array: np.ndarray) -> jax.Array:
        global_shape = (array.shape[0] * jax.process_count(),) + array.shape[1:]
        return jax.make_array_from_process_local_data(self._sharding, array, global_shape)
