"""Eval preprocessing equal to timm's: ``sj.preprocess`` (PIL) exactly, the tf.data
transform within half a level of 255 on average, on real photographs."""

import json
import pathlib

import numpy as np
import pytest

import photos
import sequencer_jax as sj
from sequencer_jax import images
from sequencer_jax.errors import UserError

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'timm_eval_pixels.json'


@pytest.fixture(scope='module')
def png_files(tmp_path_factory):
    return photos.write(tmp_path_factory.mktemp('photos'))


def _levels(normalised):
    return np.round(photos.to_levels(normalised)).astype(np.uint8)


@pytest.mark.parametrize('config', photos.CONFIGS, ids=lambda c: '/'.join(map(str, c)))
def test_preprocess_gives_timms_pixels_exactly(png_files, config):
    expected = json.loads(FIXTURE.read_text())['sha256']
    for name, path in png_files.items():
        x = sj.preprocess(path, photos.preprocessing(*config))
        assert x.shape == (config[0], config[0], 3) and x.dtype == np.float32
        assert photos.digest(_levels(x)) == expected['/'.join([name, *map(str, config)])], name


@pytest.mark.parametrize('config', photos.CONFIGS, ids=lambda c: '/'.join(map(str, c)))
def test_the_tf_data_transform_is_within_half_a_level_of_timms(png_files, config):
    import tensorflow as tf
    from sequencer_jax.data import transforms

    size, crop_pct, crop_mode, interpolation = config
    errors = []
    for path in png_files.values():
        image = transforms.decode(tf.io.read_file(str(path)))
        ours = transforms.eval_transform(
            image, size, crop_pct, tuple(255 * m for m in photos.IMAGENET['mean']),
            tuple(255 * s for s in photos.IMAGENET['std']), interpolation, crop_mode).numpy()
        timm = sj.preprocess(path, photos.preprocessing(*config))  # timm's, as tested above
        errors.append(np.abs(photos.to_levels(ours) - photos.to_levels(timm)).ravel())
    errors = np.concatenate(errors)
    assert errors.mean() <= 0.5 and np.percentile(errors, 99) <= 3, (
        errors.mean(), np.percentile(errors, 99))


def test_geometry_follows_torchvision_and_timm():
    # Resize(256) of 427x640 truncates the long side (640 * 256 / 427 = 383.7).
    assert images.resized_size(427, 640, 224, 0.875) == (256, 383)
    assert images.resized_size(640, 427, 224, 0.875) == (383, 256)
    assert images.resized_size(427, 640, 224, 0.875, 'squash') == (256, 256)
    assert images.resized_size(427, 640, 224, 0.875, 'border') == (171, 256)
    assert images.crop_offset(383, 224) == 80  # 79.5 rounds to even
    assert images.crop_offset(381, 224) == 78  # 78.5 too
    assert images.padding(171, 224) == (26, 27)


def test_every_kind_of_input_gives_the_same_tensor(tmp_path):
    from PIL import Image

    rgb = photos.photos()['flower_thumbnail']
    cfg = photos.preprocessing(*photos.CONFIGS[0])
    expected = sj.preprocess(rgb, cfg)
    np.testing.assert_array_equal(sj.preprocess(Image.fromarray(rgb), cfg), expected)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    np.testing.assert_array_equal(sj.preprocess(rgba, cfg), expected)
    grey = rgb[..., 0]
    as_rgb = sj.preprocess(np.repeat(grey[..., None], 3, -1), cfg)
    np.testing.assert_array_equal(sj.preprocess(grey, cfg), as_rgb)
    np.testing.assert_array_equal(sj.preprocess(grey[..., None], cfg), as_rgb)


def test_bad_images_say_what_is_wrong(tmp_path):
    from PIL import Image

    cfg = photos.preprocessing(*photos.CONFIGS[0])
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    with pytest.raises(UserError, match=f'^{text}: not an image PIL can read.$'):
        sj.preprocess(text, cfg)
    with pytest.raises(UserError, match=f'^{tmp_path}/missing.png: no such file.$'):
        sj.preprocess(tmp_path / 'missing.png', cfg)
    photo = tmp_path / 'photo.jpg'
    Image.fromarray(photos.photos()['china']).save(photo)
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(photo.read_bytes()[:5000])
    with pytest.raises(UserError, match=f'^{truncated}: cannot be decoded'):
        sj.preprocess(truncated, cfg)
    deep = tmp_path / 'deep.png'
    Image.fromarray(np.full((20, 20), 4000, np.uint16)).save(deep)
    with pytest.raises(UserError, match='16-bit or float pixels'):
        sj.preprocess(deep, cfg)
    with pytest.raises(UserError, match=r'expected a uint8 array .* got float32 \[4, 4\]'):
        sj.preprocess(np.zeros((4, 4), np.float32), cfg)


@pytest.mark.torch
def test_live_against_timm_on_png_and_jpeg_files(tmp_path):
    pytest.importorskip('timm')
    import tensorflow as tf
    from PIL import Image
    from timm.data import create_transform
    from sequencer_jax.data import transforms

    for fmt in ('png', 'jpg'):
        paths = photos.write(tmp_path, fmt)
        for config in photos.CONFIGS:
            transform = create_transform(**photos.preprocessing(*config))
            for path in paths.values():
                with Image.open(path) as image:
                    timm = transform(image.convert('RGB')).permute(1, 2, 0).numpy()
                ours = sj.preprocess(path, photos.preprocessing(*config))
                np.testing.assert_allclose(ours, timm, atol=1e-5)
                decoded = transforms.decode(tf.io.read_file(str(path)))
                tf_side = transforms.eval_transform(
                    decoded, config[0], config[1],
                    tuple(255 * m for m in photos.IMAGENET['mean']),
                    tuple(255 * s for s in photos.IMAGENET['std']), config[3], config[2])
                levels = np.abs(photos.to_levels(tf_side.numpy()) - photos.to_levels(timm))
                assert levels.mean() <= 0.5 and np.percentile(levels, 99) <= 3, path
