"""Input pipeline: TFDS datasets (mini ImageNet, embedded digits), sharding, padding,
augmentation and on-device mixing."""

import hashlib
import re

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import mini_imagenet
from conftest import run_cli
from sequencer_jax import config_defaults
from sequencer_jax.errors import UserError
from sequencer_jax.data import batches, mixing, pipeline, randaugment, transforms


def make_config(name, data_dir, image_size=28, augment=True, **dataset):
    aug = config_defaults.augment_config()
    if not augment:
        aug = config_defaults.augment_config(crop_scale=None, flip=False, randaugment=None,
                                             erase_prob=0.0)
    return ml_collections.ConfigDict(dict(
        seed=0, image_size=image_size, eval_image_size=None, crop_pct=0.875,
        dataset=config_defaults.dataset_config(name, data_dir=str(data_dir),
                                               shuffle_buffer=512, **dataset),
        augment=aug))


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def digits_spec(digits_dir):
    return pipeline.dataset_spec(make_config('sklearn_digits', digits_dir).dataset)


def batch_sharding(devices=8):
    mesh = jax.make_mesh((devices,), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def digests(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def test_mini_imagenet_through_tfds_builder(tmp_path):
    expected = mini_imagenet.write_mini_imagenet(str(tmp_path / 'downloads' / 'manual'))
    config = make_config('imagenet2012', tmp_path, image_size=28, augment=False)
    spec = pipeline.dataset_spec(config.dataset)
    assert spec.num_classes == 1000 and spec.eval_split == 'validation'
    assert (spec.num_train_examples, spec.num_eval_examples) == (12, 6)
    colours = np.stack([mini_imagenet.class_colour(k) for k in range(1000)]).astype(np.float32)

    def decode_labels(images):
        centre = images[:, 14, 14] * np.array(transforms.IMAGENET_STD) \
            + np.array(transforms.IMAGENET_MEAN)
        return np.argmin(np.abs(centre[:, None] - colours[None]).sum(-1), axis=1)

    batches = pipeline.GlobalBatches(pipeline.train_dataset(spec, config, 8), batch_sharding())
    batch = next(batches)
    assert batch['image'].shape == (8, 28, 28, 3) and batch['image'].dtype == np.float32
    assert batch['image'].sharding.spec == jax.sharding.PartitionSpec('data')
    assert len(batch['image'].addressable_shards) == 8
    images, labels = np.asarray(batch['image']), np.asarray(batch['label'])
    np.testing.assert_array_equal(decode_labels(images), labels)
    assert set(labels) <= set(expected['train'])

    eval_ds, num_batches = pipeline.eval_dataset(spec, config, 4)
    got = [b for b in eval_ds.as_numpy_iterator()]
    assert num_batches == len(got) == 2
    mask = np.concatenate([b['mask'] for b in got]).astype(bool)
    labels = np.concatenate([b['label'] for b in got])[mask]
    assert sorted(labels) == sorted(expected['validation'])
    images = np.concatenate([b['image'] for b in got])[mask]
    np.testing.assert_array_equal(decode_labels(images), labels)


def test_missing_imagenet_tars_say_what_to_put_where(tmp_path):
    config = make_config('imagenet2012', tmp_path)
    with pytest.raises(ValueError) as err:
        pipeline.dataset_spec(config.dataset)
    msg = str(err.value)
    assert 'ILSVRC2012_img_train.tar' in msg and 'ILSVRC2012_img_val.tar' in msg
    assert str(tmp_path / 'downloads' / 'manual') in msg


def test_failed_download_says_how_to_prepare_the_dataset_elsewhere(tmp_path, monkeypatch):
    import requests
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
    config = make_config('sklearn_digits', tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            'Could not prepare TFDS dataset sklearn_digits in ' + str(tmp_path)) + '.*'
            + re.escape("ConnectionError: Failed to resolve 'www.cs.toronto.edu'. TFDS "
                        'downloads it on first use; without internet access, prepare it where '
                        'there is (tfds build sklearn_digits --data_dir=DIR)')):
        pipeline.dataset_spec(config.dataset)


@pytest.mark.parametrize('failure', ['tensorflow', 'os', 'tfds_check'])
def test_a_full_disk_while_preparing_says_so(tmp_path, monkeypatch, failure):
    """TFDS wraps TensorFlow's write errors (as seen on a full tmpfs) in a RuntimeError;
    Python's own writes raise OSError(ENOSPC); TFDS checks the free space before it
    starts. None is a download problem."""
    import errno
    import shutil

    import tensorflow as tf
    import tensorflow_datasets as tfds

    def full_disk(self, *args, **kwargs):
        if failure == 'os':
            raise OSError(errno.ENOSPC, 'No space left on device')
        try:
            raise tf.errors.ResourceExhaustedError(
                None, None, 'sklearn_digits-train.tfrecord-00000-of-00001; No space left on device')
        except tf.errors.ResourceExhaustedError as e:
            raise RuntimeError(f'ResourceExhaustedError: Failed to finalize writing of split '
                               f'"train": {e.message}') from e

    if failure == 'tfds_check':
        disk_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, 'disk_usage', lambda path: disk_usage(path)._replace(
            free=0 if str(path).startswith(str(tmp_path)) else disk_usage(path).free))
    else:
        monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', full_disk)
    config = make_config('sklearn_digits', tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            'Could not prepare TFDS dataset sklearn_digits in ' + str(tmp_path)) + r'\S*: the '
            r'disk is full \(.*(No space left on device|Not enough disk space)'
            r'.*\)\. Free space there, or set config\.dataset\.data_dir to a disk with room'):
        pipeline.dataset_spec(config.dataset)


def test_a_data_dir_that_cannot_be_written_is_named_before_preparing(tmp_path):
    (tmp_path / 'a_file').write_text('')
    config = make_config('sklearn_digits', tmp_path / 'a_file' / 'tfds')
    with pytest.raises(ValueError, match=re.escape(
            f'Cannot create the TFDS data_dir (config.dataset.data_dir) {tmp_path}/a_file/tfds '
            '([Errno 20] Not a directory')):
        pipeline.dataset_spec(config.dataset)


def test_corrupt_images_fail_clearly_or_are_skipped(tmp_path):
    mini_imagenet.write_mini_imagenet(str(tmp_path / 'downloads' / 'manual'), per_class=2,
                                      corrupt_train=1)
    config = make_config('imagenet2012', tmp_path, augment=False)
    spec = pipeline.dataset_spec(config.dataset)
    batches = pipeline.GlobalBatches(pipeline.train_dataset(spec, config, 8),
                                     batch_sharding(), 'imagenet2012 train', skippable=True)
    with pytest.raises(ValueError, match='skip_corrupt=True'):
        for _ in range(3):
            next(batches)
    # Evaluation reads every example: skip_corrupt is not offered there.
    evaluation = pipeline.GlobalBatches(pipeline.train_dataset(spec, config, 8),
                                        batch_sharding(), 'imagenet2012 validation')
    with pytest.raises(ValueError, match=r'^Reading imagenet2012 validation failed on a bad '
                                         r'example \(e.g. a corrupt image\): [^{]*\.$'):
        for _ in range(3):
            next(evaluation)
    config.dataset.skip_corrupt = True
    batches = pipeline.GlobalBatches(pipeline.train_dataset(spec, config, 8), batch_sharding())
    assert next(batches)['image'].shape == (8, 28, 28, 3)


def test_bad_dataset_config_errors(digits_dir):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_set'. Use a name "):
        pipeline.dataset_spec(make_config('no_such_set', digits_dir).dataset)
    assert pipeline.unknown_dataset_message('Cifar-10:3.0.2').startswith(
        "Unknown TFDS dataset 'Cifar-10:3.0.2' (did you mean cifar10, cifar100")
    assert '(did you mean sklearn_digits' in pipeline.unknown_dataset_message('sklearn_digit')
    with pytest.raises(ValueError, match=r"Unknown TFDS dataset 'cifar-10' \(did you mean "):
        pipeline.dataset_spec(make_config('cifar-10', digits_dir).dataset)  # TFDS: unparsable
    with pytest.raises(ValueError, match="no feature 'img'.*config.dataset.image_key"):
        pipeline.dataset_spec(make_config('sklearn_digits', digits_dir, image_key='img').dataset)
    with pytest.raises(ValueError, match="no split 'dev'"):
        pipeline.dataset_spec(make_config('sklearn_digits', digits_dir, eval_split='dev').dataset)
    # Batch sizes are checked with the config, before any work.
    config = config_defaults.base_config()
    config.batch_size, config.eval_batch_size = 12, 16
    with pytest.raises(UserError, match=re.escape(
            'config.batch_size=12 must divide by the number of processes (1) and of batch '
            'shards on the mesh (8); use a multiple of 8.')):
        config_defaults.validate(config)  # on 8 devices
    assert batches.local_batch_size(16) == 16


def test_two_processes_read_disjoint_shards_covering_the_split(digits_spec, digits_dir):
    config = make_config('sklearn_digits', digits_dir, augment=False)
    seen = []
    for process in range(2):
        ds, n = pipeline.eval_dataset(digits_spec, config, 32, process_index=process,
                                      process_count=2)
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == n == 6  # ceil(ceil(360 / 2) / 32): equal on both processes
        mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
        seen.append(set(digests(np.concatenate([b['image'] for b in batches])[mask])))
    everything, n = pipeline.eval_dataset(digits_spec, config, 360, process_count=1,
                                          process_index=0)
    all_images = next(everything.as_numpy_iterator())['image']
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(digests(all_images))

    train = []
    for process in range(2):  # one epoch of each process's train stream
        ds = pipeline.train_dataset(digits_spec, config, 718 // 2, process_index=process,
                                    process_count=2)
        it = ds.as_numpy_iterator()
        train.append(np.concatenate([next(it)['image'], next(it)['image']]))
    a, b = (set(digests(x)) for x in train)
    assert len(a) > 500 and len(b) > 500 and not a & b


def test_eval_padding_counts_every_example_once(digits_spec, digits_dir):
    config = make_config('sklearn_digits', digits_dir)
    ds, num_batches = pipeline.eval_dataset(digits_spec, config, 8, split='test[:13]',
                                            process_index=0, process_count=1)
    batches = list(ds.as_numpy_iterator())
    assert num_batches == len(batches) == 2
    assert all(b['image'].shape == (8, 28, 28, 3) for b in batches)
    mask = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(mask, [1] * 13 + [0] * 3)
    images = np.concatenate([b['image'] for b in batches])[:13]
    assert len(set(digests(images))) == 13


def test_train_stream_is_deterministic_and_resumable(digits_spec, digits_dir):
    config = make_config('sklearn_digits', digits_dir)
    take = lambda ds, n: [b for _, b in zip(range(n), ds.as_numpy_iterator())]  # noqa: E731
    first = take(pipeline.train_dataset(digits_spec, config, 64), 30)  # crosses an epoch
    again = take(pipeline.train_dataset(digits_spec, config, 64), 30)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x['image'], y['image'])
    resumed = take(pipeline.train_dataset(digits_spec, config, 64, start_example=25 * 64), 5)
    for x, y in zip(first[25:], resumed):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['label'], y['label'])
    # Augmentation is on: the two epochs' views of the data differ.
    assert not np.allclose(first[0]['image'], first[23]['image'])


def test_randaugment_ops_keep_shape_and_range():
    image = tf.constant(np.random.RandomState(0).randint(0, 256, (20, 24, 3)), tf.float32)
    for index in range(len(randaugment.OPS)):
        out = randaugment.apply_op(tf.constant(index), image, tf.constant(9.0),
                                   tf.constant([1, 2]))
        assert out.shape == image.shape, randaugment.OPS[index]
        assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 255
    assert np.allclose(randaugment.apply_op(tf.constant(2), image, tf.constant(5.0),
                                            tf.constant([0, 0])), 255 - image)
    out = randaugment.rand_augment(image, tf.constant([3, 4]))
    assert out.shape == image.shape


def test_train_transform_normalises_and_erases():
    image = tf.constant(np.full((30, 30, 3), 128, np.uint8))
    aug = config_defaults.augment_config(randaugment=None, erase_prob=1.0, flip=False)
    out = transforms.train_transform(image, tf.constant([0, 1]), 16, aug)
    assert out.shape == (16, 16, 3)
    plain = transforms.normalize(tf.fill([16, 16, 3], 128.0))
    erased = np.any(np.abs(out - plain) > 1e-4, axis=-1)
    assert 0 < erased.mean() < 1


def test_mixup_and_cutmix_labels_and_images_agree():
    rng = np.random.RandomState(0)
    images = jax.numpy.asarray(rng.randn(8, 16, 16, 3), np.float32)
    labels = jax.numpy.asarray(np.arange(8) % 5)
    for seed in range(12):
        key = jax.random.PRNGKey(seed)
        mixed, targets = mixing.mix_batch(key, images, labels, 5, smoothing=0.0)
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-6)
        lam = float(targets[0, 0]) if labels[0] != labels[-1] else None
        flipped = np.asarray(images)[::-1]
        from_original = np.isclose(np.asarray(mixed), np.asarray(images)).all(-1)
        if from_original.all() or not from_original.any() or \
                not np.isclose(mixed, np.where(from_original[..., None], images, flipped)).all():
            # Mixup: every pixel a blend with the same ratio as the labels.
            np.testing.assert_allclose(mixed, lam * np.asarray(images) + (1 - lam) * flipped,
                                       atol=1e-5)
        else:
            # CutMix: the fraction of original pixels equals the label ratio.
            np.testing.assert_allclose(from_original[0].mean(), lam, atol=1e-6)
    smoothed = mixing.smooth_one_hot(labels, 5, 0.1)
    np.testing.assert_allclose(np.asarray(smoothed)[0], [0.92, 0.02, 0.02, 0.02, 0.02],
                               atol=1e-6)
    same_images, only_smoothed = mixing.mix_batch(jax.random.PRNGKey(0), images, labels, 5,
                                                  mixup_alpha=0.0, cutmix_alpha=0.0)
    np.testing.assert_array_equal(same_images, images)
    np.testing.assert_allclose(only_smoothed, smoothed)


def test_data_benchmark_cli(digits_spec, digits_dir, capsys):
    from sequencer_jax.data import benchmark
    rates = run_cli(benchmark.main, '--dataset=sklearn_digits', f'--data_dir={digits_dir}',
                    '--image_size=28', '--batch_size=16', '--batches=3')
    assert rates['train_images_per_s'] > 0 and rates['eval_images_per_s'] > 0
    assert 'images/s' in capsys.readouterr().out
    with pytest.raises(UserError, match="Unknown TFDS dataset 'no_such_set'"):
        run_cli(benchmark.main, '--dataset=no_such_set', f'--data_dir={digits_dir}')
    with pytest.raises(SystemExit) as err:  # was a tf.data error from inside the pipeline
        run_cli(benchmark.main, f'--data_dir={digits_dir}', '--batch_size=0')
    assert err.value.code == 1
    assert 'flag --batch_size=0: 0 is not a positive integer' in capsys.readouterr().err
