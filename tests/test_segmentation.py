"""Segmentation: metrics as mmsegmentation computes them, the head, inference, data,
and training by the same loop as classification (learns, resumes bit-exactly)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import sequencer_jax as sj
from conftest import run_cli
from sequencer_jax import config_defaults, evaluate
from sequencer_jax.data import pipeline, segmentation as seg_data
from sequencer_jax.errors import UserError
from sequencer_jax.experiments import predictions
from sequencer_jax.models import segmentation as seg_models
from sequencer_jax.train import loop, mesh as mesh_lib, preemption, segmentation_metrics
from test_train import StopAfter, final_params, load_config, losses, short_run

TINY_BACKBONE = dict(layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1),
                     embed_dims=(16, 24, 24, 24), hidden_sizes=(4, 6, 6, 6))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


def tiny_config(data_dir, steps=4, **overrides):
    config = load_config('segmentation.py')
    config.model.args.update(**TINY_BACKBONE)
    config.segmentation.update(channels=16, aux_channels=8, eval_canvas=(64, 64))
    config.dataset.eval_split = 'test[:16]'  # compiles dominate; 16 canvases suffice
    config.image_size = 32
    return short_run(config, data_dir, steps, 8, overrides)


def direct_scores(labels, predictions, num_classes):
    """mIoU / mAcc / aAcc by their definitions, class by class over all pixels."""
    ious, accs = [], []
    for k in range(num_classes):
        label, pred = labels == k, predictions == k
        union = np.sum(label | pred)
        if union:
            ious.append(np.sum(label & pred) / union)
        if label.any():
            accs.append(np.sum(label & pred) / np.sum(label))
    return np.mean(ious), np.mean(accs), np.mean(labels == predictions)


def test_metrics_equal_their_definitions_with_absent_classes():
    rng = np.random.RandomState(0)
    # Class 3 is never labelled but predicted (IoU 0, no accuracy); class 4 neither.
    labels = rng.choice(3, size=(2, 5, 7))
    predictions = np.where(rng.rand(2, 5, 7) < 0.7, labels, rng.choice(4, size=(2, 5, 7)))
    ignored = rng.rand(2, 5, 7) < 0.2
    confusion = segmentation_metrics.confusion_matrix(
        jnp.asarray(labels), jnp.asarray(predictions), 5, jnp.asarray(~ignored))
    np.testing.assert_array_equal(
        confusion, np.histogram2d(labels[~ignored], predictions[~ignored], bins=5,
                                  range=[[0, 5], [0, 5]])[0])
    got = segmentation_metrics.scores(np.asarray(confusion))
    miou, macc, aacc = direct_scores(labels[~ignored], predictions[~ignored], 5)
    assert (3 in predictions[~ignored]) and (4 not in predictions)
    assert got == pytest.approx({'miou': miou, 'macc': macc, 'aacc': aacc}, rel=1e-12)
    # Summed over batches, the matrix gives the split's metrics, not a mean of batches'.
    halves = [segmentation_metrics.confusion_matrix(jnp.asarray(labels[i:i + 1]),
                                                    jnp.asarray(predictions[i:i + 1]), 5,
                                                    jnp.asarray(~ignored[i:i + 1]))
              for i in (0, 1)]
    assert segmentation_metrics.scores(np.asarray(halves[0] + halves[1])) == got
    perfect = segmentation_metrics.scores(np.diag([4, 0, 6]))
    assert perfect == {'miou': 1.0, 'macc': 1.0, 'aacc': 1.0}


def test_adaptive_pooling_is_pytorchs():
    x = np.random.RandomState(0).randn(2, 11, 7, 3).astype(np.float32)
    pooled = np.asarray(seg_models.adaptive_avg_pool(jnp.asarray(x), 3))
    for i in range(3):
        for j in range(3):
            rows = slice(i * 11 // 3, -(-(i + 1) * 11 // 3))
            cols = slice(j * 7 // 3, -(-(j + 1) * 7 // 3))
            np.testing.assert_allclose(pooled[:, i, j], x[:, rows, cols].mean(axis=(1, 2)),
                                       rtol=1e-5, atol=1e-7)


def test_upernet_parameter_counts_and_shapes():
    model = seg_models.SequencerUperNet(sj.create_model('sequencer2d_s', num_classes=0), 150)
    images = jnp.zeros((1, 512, 512, 3))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
    counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
              for k, v in params.items()}
    assert counts == {'backbone': 27_265_920, 'pyramid': 149_952,
                      'decode_head': 28_990_614, 'aux_head': 923_798}
    logits, aux = jax.eval_shape(
        lambda p, x: model.apply({'params': p}, x, train=True,
                                 rngs={'dropout': jax.random.PRNGKey(0)}), params, images)
    assert logits.shape == aux.shape == (1, 512, 512, 150)
    with pytest.raises(UserError, match='smallest size that works is 28x28'):
        model.check_input_shape((1, 27, 64, 3))


def test_sliding_windows_equal_the_whole_image_where_they_agree():
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randn(2, 20, 30, 3), jnp.float32)
    sizes = jnp.asarray([[20, 30], [13, 25]])
    kernel = jnp.asarray(rng.randn(3, 5), jnp.float32)
    pointwise = lambda x: x @ kernel  # noqa: E731  (no context: any windows agree)
    whole = seg_models.predict_logits(pointwise, images, sizes, 'whole')
    for crop, stride in (((20, 30), (20, 30)), ((8, 12), (5, 7)), ((32, 32), (16, 16))):
        slid = seg_models.predict_logits(pointwise, images, sizes, 'slide', crop, stride)
        for b, (h, w) in enumerate(np.asarray(sizes)):
            np.testing.assert_allclose(slid[b, :h, :w], whole[b, :h, :w], rtol=1e-5,
                                       atol=1e-6)
    # A network with context: one window covering the whole canvas is the whole image.
    model = sj.create_model('sequencer2d_s', num_classes=0, **TINY_BACKBONE)
    net = seg_models.SequencerUperNet(model, 4, 8, None)
    variables = net.init(jax.random.PRNGKey(0), images[:, :16, :24])
    apply = lambda x: net.apply(variables, x)  # noqa: E731
    canvas = images[:, :16, :24]
    full = jnp.asarray([[16, 24], [16, 24]])
    np.testing.assert_allclose(
        seg_models.predict_logits(apply, canvas, full, 'slide', (16, 24), (8, 8)),
        seg_models.predict_logits(apply, canvas, full, 'whole'), rtol=1e-5, atol=1e-5)
    # Test-time augmentation averages the views' probabilities. Flipping a context-free
    # network changes nothing (each image mirrors within its own size), and neither does
    # rescaling an image that is constant within each half.
    log_probabilities = jax.nn.log_softmax(whole, axis=-1)
    np.testing.assert_allclose(
        seg_models.predict_logits(pointwise, images, sizes, 'whole', flip=True)[1, :13, :25],
        log_probabilities[1, :13, :25], rtol=1e-5, atol=1e-5)
    halves = jnp.concatenate([jnp.ones((1, 20, 15, 3)), -jnp.ones((1, 20, 15, 3))], axis=2)
    full_size = jnp.asarray([[20, 30]])
    tta = seg_models.predict_logits(pointwise, halves, full_size, 'slide', (8, 12), (5, 7),
                                    flip=False, scales=(0.5, 1.0, 2.0))
    single = jax.nn.log_softmax(pointwise(halves), axis=-1)
    away_from_the_middle = np.r_[0:13, 17:30]
    np.testing.assert_allclose(tta[:, :, away_from_the_middle],
                               single[:, :, away_from_the_middle], rtol=1e-5, atol=1e-5)
    assert not np.allclose(tta, single, atol=1e-3)  # the middle columns blend


def pytorch_bilinear(x, out_h, out_w):
    """``F.interpolate(x, (out_h, out_w), mode='bilinear', align_corners=False)`` of one
    ``[h, w, C]`` image, written out: half-pixel centres, sources clamped at the edges."""
    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), 1 - (src - low))
        np.add.at(matrix, (np.arange(n_out), high), src - low)
        return matrix
    return np.einsum('ih,hwc,jw->ijc', weights(x.shape[0], out_h), x, weights(x.shape[1], out_w))


def test_logits_go_back_to_the_original_size_as_pytorch_resizes_them():
    rng = np.random.RandomState(0)
    canvas = rng.randn(2, 12, 16, 3).astype(np.float32)
    sizes, label_sizes = np.asarray([[9, 16], [12, 7]]), np.asarray([[20, 33], [5, 4]])
    out = np.asarray(seg_models.resized_to_labels(jnp.asarray(canvas), jnp.asarray(sizes),
                                                  jnp.asarray(label_sizes), (24, 40)))
    for b, ((h, w), (lh, lw)) in enumerate(zip(sizes, label_sizes)):
        np.testing.assert_allclose(out[b, :lh, :lw],
                                   pytorch_bilinear(canvas[b, :h, :w], lh, lw),
                                   rtol=1e-5, atol=1e-5)
    same = seg_models.resized_to_labels(jnp.asarray(canvas), jnp.asarray([[12, 16]] * 2),
                                        jnp.asarray([[12, 16]] * 2), (12, 16))
    np.testing.assert_allclose(same, canvas, rtol=1e-6, atol=1e-6)


def mmseg_window_starts(h, w, crop, stride):
    """mmsegmentation's ``slide_inference`` window corners, as its loop computes them."""
    rows = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    return {(max(min(i * stride[0], h - crop[0]), 0), max(min(j * stride[1], w - crop[1]), 0))
            for i in range(rows) for j in range(cols)}


def test_windows_are_mmsegmentations_for_each_images_size():
    seen = []

    def corners(x):  # the images are their pixels' coordinates: a window's first pixel
        seen.append(np.asarray(x[:, 0, 0, :2]).astype(int))
        return jnp.ones((*x.shape[:3], 1))

    rows, cols = np.meshgrid(np.arange(20), np.arange(23), indexing='ij')
    canvas = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32)
    sizes = np.asarray([[20, 23], [14, 9], [20, 17]])
    out = seg_models.slide_logits(corners, jnp.asarray(np.stack([canvas] * 3)),
                                  jnp.asarray(sizes), (10, 10), (5, 6))
    windows = seen[0].reshape(3, -1, 2)
    for b, (h, w) in enumerate(sizes):
        # Unused windows repeat a corner; their logits are not counted.
        assert {tuple(c) for c in windows[b]} == mmseg_window_starts(h, w, (10, 10), (5, 6))
        np.testing.assert_array_equal(out[b, :h, :w], 1.0)
        np.testing.assert_array_equal(out[b, h:], 0.0)


def test_transforms_crop_flip_and_pad_with_the_ignore_label(data_dir):
    config = tiny_config(data_dir)
    spec = seg_data.dataset_spec(config, 11)
    train = pipeline.train_dataset(spec, config, 4, preprocess=seg_data.train_preprocess(
        spec, config))
    batch = next(train.as_numpy_iterator())
    assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].shape == (4, 32, 32)
    labels = set(np.unique(batch['label']))
    assert labels <= set(range(11)) and len(labels) > 2
    evaluation, count = seg_data.eval_dataset(
        spec, tiny_config(data_dir, **{'segmentation.eval_canvas': (70, 66)}), 64, 'test')
    batches = list(evaluation.as_numpy_iterator())
    assert count == len(batches) == 4  # 200 canvases, padded to 256
    first, last = batches[0], batches[-1]
    assert first['image'].shape == (64, 70, 66, 3)
    np.testing.assert_array_equal(first['size'], [[64, 64]] * 64)
    assert (first['label'][:, 64:] == 255).all() and (first['label'][:, :, 64:] == 255).all()
    assert (first['image'][:, 64:] == 0).all()
    assert last['mask'].sum() == 200 - 3 * 64 and (last['label'][8:] == 255).all()
    # Rescaled for the network, the masks stay at their original size.
    rescaled = tiny_config(data_dir, **{'segmentation.eval_scale': (48, 48),
                                        'segmentation.eval_canvas': (48, 48),
                                        'segmentation.eval_label_canvas': (70, 66)})
    batch = next(seg_data.eval_dataset(spec, rescaled, 8, 'test')[0].as_numpy_iterator())
    assert batch['image'].shape == (8, 48, 48, 3) and batch['label'].shape == (8, 70, 66)
    np.testing.assert_array_equal(batch['size'], [[48, 48]] * 8)
    np.testing.assert_array_equal(batch['label_size'], [[64, 64]] * 8)
    np.testing.assert_array_equal(batch['label'][:, :64, :64], first['label'][:8, :64, :64])


def encoded(array):
    return tf.io.encode_png(tf.constant(array, tf.uint8)).numpy()


def test_bad_masks_are_named_before_training(data_dir, tmp_path):
    config = tiny_config(data_dir)
    spec = seg_data.dataset_spec(config, 11)
    image = encoded(np.zeros((6, 8, 3)))
    cases = {r'A mask \(segmentation_mask\) of another size than its image \(image\); .* '
             r'sizes:\] \[6 7\] \[6 8\]\.$': np.zeros((6, 7, 1)),
             r'not one of the 11 classes .*The largest label:\] \[11\]': np.full((6, 8, 1), 11)}
    for message, mask in cases.items():
        example = {'image': image, 'segmentation_mask': encoded(mask)}
        read = tf.data.Dataset.from_tensors(example).map(
            lambda e: seg_data.decode(e, spec, config.segmentation))
        with pytest.raises(UserError, match=message):  # as the train input reports it
            next(pipeline.GlobalBatches(read.batch(1), mesh_lib.batch_sharding(
                mesh_lib.make_mesh(config.mesh)), 'the masks'))
    # The embedded data labels up to 10: a 5-class model is refused before any work.
    workdir = tmp_path / 'w'
    with pytest.raises(UserError, match=(
            r"^digit_canvases, the first example of split 'train': A mask label is not one "
            r'of the 5 classes .* Its largest label is 10.$')):
        loop.train_and_evaluate(tiny_config(data_dir, **{'model.num_classes': 5}),
                                str(workdir))
    assert list(workdir.iterdir()) == []
    with pytest.raises(UserError, match='config.model.num_classes must be set for '
                                        'segmentation'):
        config_defaults.validate(tiny_config(data_dir, **{'model.num_classes': None}))
    with pytest.raises(UserError, match=r'slide_stride=\(40, 8\) leaves pixels between the '
                                        r'32 px windows'):
        config_defaults.validate(tiny_config(data_dir, **{
            'segmentation.inference': 'slide', 'segmentation.slide_stride': (40, 8)}))


@pytest.mark.slow
def test_segmentation_resumes_bit_identically(data_dir, tmp_path, monkeypatch):
    # Evaluated by sliding windows over rescaled images, the logits resized back to the
    # masks' size, on a 4x2 mesh.
    config = tiny_config(data_dir, steps=4, mesh=(('data', 4), ('fsdp', 2)), **{
        'segmentation.eval_scale': (48, 48), 'segmentation.eval_canvas': (48, 48),
        'segmentation.eval_label_canvas': (64, 64), 'segmentation.inference': 'slide',
        'segmentation.slide_stride': (16, 16)})
    metrics = loop.train_and_evaluate(config, str(tmp_path / 'straight'))
    assert {'eval/miou', 'eval/macc', 'eval/aacc', 'eval/loss'} <= set(metrics)
    with monkeypatch.context() as patch:
        patch.setattr(preemption, 'StopFlag', StopAfter)
        with pytest.raises(loop.Interrupted, match='saved step 3'):
            loop.train_and_evaluate(config, str(tmp_path / 'resumed'))
    final = loop.train_and_evaluate(config, str(tmp_path / 'resumed'))
    assert losses(tmp_path / 'resumed') == losses(tmp_path / 'straight')
    untimed = lambda m: {k: v for k, v in m.items() if 'images_per_s' not in k  # noqa: E731
                         and 'input_wait' not in k}
    assert untimed(final) == untimed(metrics)
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / 'straight'),
                 final_params(tmp_path / 'resumed'))


@pytest.mark.slow
def test_backbone_comes_from_a_classification_run(data_dir, tmp_path, capsys):
    classifier = load_config('default.py')
    classifier.model.args.update(**TINY_BACKBONE)
    classifier.dataset.data_dir = data_dir
    classifier.dataset.eval_split = 'test[:16]'
    classifier.update(num_train_steps=2, batch_size=8, log_every_steps=1, progress='lines')
    one_device = jax.devices()[:1]  # compiles for one device are the quickest
    loop.train_and_evaluate(classifier, str(tmp_path / 'classifier'), one_device)
    backbone = final_params(tmp_path / 'classifier')
    # A step at learning rate 0 keeps the loaded weights as they are.
    loop.train_and_evaluate(tiny_config(data_dir, steps=1, init_from=str(tmp_path / 'classifier'),
                                        **{'optimizer.base_lr': 0.0}), str(tmp_path / 'seg'),
                            one_device)
    assert f'Initialised from {tmp_path / "classifier"} (the backbone loaded, new heads)' in \
        capsys.readouterr().out
    loaded = final_params(tmp_path / 'seg')['backbone']
    assert set(loaded) == set(backbone) - {'head', 'norm'}
    jax.tree.map(np.testing.assert_array_equal, loaded,
                 {k: v for k, v in backbone.items() if k in loaded})
    wider = tiny_config(data_dir, init_from=str(tmp_path / 'classifier'),
                        **{'model.args.embed_dims': (16, 32, 32, 32)})
    with pytest.raises(UserError, match=r"\(the backbone\) does not fit sequencer2d_s .*its "
                       r"parameter stages_1_blocks_0/mlp_channels/fc1/bias is \(72,\), the "
                       r"model's \(96,\)"):
        loop.train_and_evaluate(wider, str(tmp_path / 'wider'), one_device)


def trained_digits(data_dir, workdir, steps):
    """The default segmentation job for ``steps`` steps on one device: its final eval and
    its metrics records."""
    config = load_config('segmentation.py')
    config.dataset.data_dir = data_dir
    config.num_train_steps = config.eval_every_steps = steps
    config.progress = 'lines'
    final = loop.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return final, records


@pytest.fixture(scope='module')
def digits_run(data_dir, tmp_path_factory):
    """The default job, 300 steps: (workdir, final eval, metrics records)."""
    workdir = tmp_path_factory.mktemp('digits') / 'w'
    return (workdir, *trained_digits(data_dir, workdir, 300))


def test_segmentation_training_beats_chance(digits_run):
    # Background everywhere scores mIoU 0.08 (its IoU 0.87, the ten digits' 0); 300 steps
    # reached 0.20 here.
    _, final, records = digits_run
    assert final['eval/miou'] > 0.15, final
    assert records[-1]['train/loss'] < records[0]['train/loss'] / 2


@pytest.mark.slow
def test_default_segmentation_job_segments_the_digits(data_dir, tmp_path):
    final, _ = trained_digits(data_dir, tmp_path / 'w', 1000)  # the job as configured
    assert final['eval/miou'] > 0.6, final  # 0.733 measured (README)


def test_evaluate_and_the_png_tool_take_a_segmentation_run(digits_run, tmp_path, capsys):
    workdir, final, _ = digits_run
    out = tmp_path / 'eval.json'
    run_cli(evaluate.main, f'--checkpoint={workdir}', f'--output_json={out}')
    row = json.loads(out.read_text())
    assert row['examples'] == 200
    assert {k: row[k] for k in ('miou', 'macc', 'aacc', 'loss')} == pytest.approx(
        {k: final[f'eval/{k}'] for k in ('miou', 'macc', 'aacc', 'loss')}, rel=1e-6)
    with pytest.raises(UserError, match='--resolutions, --crop_pct and --plot are for '
                                        'classification'):
        run_cli(evaluate.main, f'--checkpoint={workdir}', '--resolutions=32')
    run_cli(predictions.main, f'--checkpoint={workdir}', '--num_drawn=3',
            f'--output={tmp_path / "png"}')
    drawn = sorted((tmp_path / 'png').iterdir())
    assert [p.name for p in drawn] == ['0.png', '1.png', '2.png']
    assert tf.io.decode_png(drawn[0].read_bytes()).shape[:2] == (64, 3 * 64)
    assert f'wrote 3 images (image | label | prediction) to {tmp_path / "png"}/' in \
        capsys.readouterr().out
