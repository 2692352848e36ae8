"""The paper's experiments as tools: resolution sweep + plot, robustness scoring, ERF,
fine-tuning from a checkpoint, and the linear-probe feature-extraction example."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sequencer_jax as sj
from conftest import run_cli
from sequencer_jax import config_defaults, convert, weights
from sequencer_jax.convert import __main__ as convert_cli
from sequencer_jax.errors import UserError
from sequencer_jax.experiments import erf, linear_probe, resolution, robustness
from sequencer_jax.train import loop, steps
from test_train import ROOT, TINY_MODEL, final_params, load_config, losses, tiny_config

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """A tiny model trained for a few steps on the digits (a training workdir)."""
    workdir = str(tmp_path_factory.mktemp('trained'))
    loop.train_and_evaluate(tiny_config(data_dir, steps=4), workdir)
    return workdir


def _run(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2')
    return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, timeout=600,
                          capture_output=True, text=True)


@pytest.mark.slow  # 270 s: three CLI runs, each compiling four sizes
def test_resolution_sweep_writes_json_and_png(trained, data_dir, tmp_path):
    args = ['sequencer_jax.evaluate', '--config=configs/default.py', f'--checkpoint={trained}',
            f'--config.dataset.data_dir={data_dir}',
            "--config.model.args={'layers': (1, 1, 1, 1), 'patch_sizes': (4, 2, 1, 1), "
            "'embed_dims': (16, 24, 24, 24), 'hidden_sizes': (4, 6, 6, 6)}"]
    # Without --config: the workdir's own (saved by training: the same as args).
    # Sides that are not multiples of the total stride 8 work, as in timm.
    first = _run(['sequencer_jax.evaluate', f'--checkpoint={trained}', '--resolutions=20,32,36',
                  f'--output_json={tmp_path / "a.json"}', '--label=tiny'])
    assert first.returncode == 0, first.stderr[-3000:]
    assert f'Config: {trained}/config.json, the latest start of that run' in first.stdout
    rows = json.loads((tmp_path / 'a.json').read_text())['rows']
    assert [r['resolution'] for r in rows] == [20, 32, 36]
    assert all(r['examples'] == 360 for r in rows)
    second = _run(args + ['--resolutions=32,48', '--crop_pct=1.0', '--label=crop1',
                          f'--output_json={tmp_path / "new" / "b.json"}',
                          f'--plot={tmp_path / "plots" / "sweep.png"}',
                          f'--compare={tmp_path / "a.json"}'])
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / 'plots' / 'sweep.png').read_bytes()[:8] == PNG_MAGIC
    second_rows = json.loads((tmp_path / 'new' / 'b.json').read_text())['rows']
    assert [r['resolution'] for r in second_rows] == [32, 48]
    assert second_rows[0] == pytest.approx(rows[1], rel=1e-6)  # default.py's crop is 1.0
    bad = _run(['sequencer_jax.evaluate', f'--checkpoint={tmp_path}'])
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
    assert (f'Missing --config: --checkpoint={tmp_path} holds no config.json (the config a '
            'training run saves in its workdir) to use instead; give the config that names '
            'the dataset to evaluate on, e.g. --config=configs/imagenet.py.') in bad.stderr
    bad = _run(args + ['--resolutions=30,4'])
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.rstrip().splitlines()[-1] == (
        'error: Images of 4x4 pixels are too small: each downsampling (patch sizes (4, 2, 1, '
        '1)) must leave at least one patch, so the smallest size that works is 8x8.')
    bad = _run(args + ['--split=dev'])
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
    assert ("sklearn_digits has no split 'dev'; it has ['test', 'train']. Give --split one "
            'of them') in bad.stderr
    # Output problems stop the run before the evaluation, whose results they would lose.
    (tmp_path / 'a_file').write_text('')
    for flags, message in [
            ([f'--output_json={tmp_path / "a_file" / "c.json"}'],
             f'--output_json={tmp_path / "a_file" / "c.json"}: Cannot create the output '
             f'directory {tmp_path / "a_file"}'),
            ([f'--plot={tmp_path / "a_file" / "c.png"}'], 'Cannot create the output directory'),
            ([f'--compare={tmp_path / "a.json"}'], '--compare adds curves to --plot'),
            ([f'--plot={tmp_path / "c.png"}', f'--compare={tmp_path / "missing.json"}'],
             'missing.json')]:
        bad = _run(args + flags)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr[-3000:]
        assert 'Traceback' not in bad.stderr and 'top-1' not in bad.stdout
    assert not (tmp_path / 'c.png').exists()


def test_a_workdir_exports_to_timm_and_converts_back_to_its_params(trained, data_dir, tmp_path,
                                                                    capsys, monkeypatch):
    params = weights.load_params(trained)[0]
    exported = tmp_path / 'w.npz'
    run_cli(convert_cli.main, '--to_timm', f'--input={trained}', f'--output={exported}')
    with np.load(exported) as f:
        state_dict = {k: f[k] for k in f.files}
    count = sum(x.size for x in jax.tree.leaves(params))
    # A custom size: code that builds timm's model of that size (was timm.create_model(NAME)).
    assert capsys.readouterr().out.startswith(
        f'Wrote {len(state_dict)} arrays ({count:,} parameters) to {exported}; in PyTorch: '
        'timm.models.sequencer.Sequencer2d(layers=[1, 1, 1, 1], patch_sizes=[4, 2, 1, 1], '
        'embed_dims=[16, 24, 24, 24], hidden_sizes=[4, 6, 6, 6], num_classes=10)'
        '.load_state_dict(...)')
    back = convert.from_torch_state_dict(state_dict, 'sequencer2d_s', **TINY_MODEL)['params']
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # The file is a checkpoint source like the workdir (its model from the config).
    from sequencer_jax import evaluate
    config = tiny_config(data_dir)
    assert evaluate.evaluate_checkpoint(config, str(exported), [32]) == \
        evaluate.evaluate_checkpoint(config, trained, [32])
    for args, message in [
            ([f'--output={exported}'], 'already exists; choose a new --output file'),
            ([f'--output={tmp_path / "w.pth"}'], 'give a .safetensors or .npz file'),
            ([f'--output={tmp_path / "e.npz"}', '--ema'], 'holds no EMA weights'),
            ([f'--output={tmp_path / "m.npz"}', '--model=sequencer2d_s'],
             '--to_timm reads the model from --input: drop --model')]:
        with pytest.raises(UserError, match=re.escape(message)):
            run_cli(convert_cli.main, '--to_timm', f'--input={trained}', *args)
    assert not (tmp_path / 'e.npz').exists()
    try:
        from safetensors.numpy import load_file
    except ImportError:  # in the torch extra
        with pytest.raises(UserError, match=re.escape(
                'Writing .safetensors files (or give an .npz --output) needs the safetensors '
                'package: pip install safetensors.')):
            run_cli(convert_cli.main, '--to_timm', f'--input={trained}',
                    f'--output={tmp_path / "w.safetensors"}')
    else:
        run_cli(convert_cli.main, '--to_timm', f'--input={trained}',
                f'--output={tmp_path / "w.safetensors"}')
        from_file = load_file(str(tmp_path / 'w.safetensors'))
        assert sorted(from_file) == sorted(state_dict)
        for key, value in state_dict.items():
            np.testing.assert_array_equal(from_file[key], value)
    # --ema takes the EMA weights where a workdir has them.
    doubled = jax.tree.map(lambda x: 2 * x, params)
    monkeypatch.setattr(weights, 'load_params', lambda source: (params, doubled, None))
    run_cli(convert_cli.main, '--to_timm', '--ema', f'--input={trained}',
            f'--output={tmp_path / "e.npz"}')
    with np.load(tmp_path / 'e.npz') as f:
        for key, value in state_dict.items():
            np.testing.assert_array_equal(f[key], 2 * value)


def test_the_timm_loading_hint_names_timms_variants_and_spells_out_the_others(tmp_path,
                                                                             capsys):
    """timm registers only sequencer2d_s/m/l, and its Sequencer2d has LSTM cells only (the
    printed code is run against timm in test_torch_parity.py)."""
    code = lambda name, **args: convert_cli.timm_model_code(  # noqa: E731
        name, sj.create_model(name, **args))
    assert code('sequencer2d_m') == "timm.create_model('sequencer2d_m', num_classes=1000)"
    assert code('sequencer2d_s_add', num_classes=3) == (
        'timm.models.sequencer.Sequencer2d(layers=[4, 3, 8, 3], patch_sizes=[7, 2, 1, 1], '
        "embed_dims=[192, 384, 384, 384], hidden_sizes=[48, 96, 96, 96], union='add', "
        'num_classes=3)')
    assert 'in_chans=1, ' in code('sequencer2d_s', in_chans=1)
    assert code('gru_sequencer2d_s') is None and code('v_sequencer_s') is None
    tiny = dict(TINY_MODEL, cell='gru')
    model = sj.create_model('sequencer2d_s', 5, **tiny)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))
    convert.save_converted(str(tmp_path / 'gru'), 'sequencer2d_s', 5, variables, tiny)
    run_cli(convert_cli.main, '--to_timm', f'--input={tmp_path / "gru"}',
            f'--output={tmp_path / "gru.npz"}')
    assert capsys.readouterr().out.endswith(
        "timm has no module for this model (sequencer2d_s: cell 'gru', token mixer '2d', "
        'position embedding False); read it with sequencer-jax (--checkpoint=FILE with '
        '--config naming the model).\n')


@pytest.mark.slow
def test_main_resumes_a_workdir_with_its_saved_config(trained, tmp_path):
    workdir = tmp_path / 'resumed'
    shutil.copytree(trained, workdir)
    run = _run(['sequencer_jax.main', f'--config=configs/workdir.py:dir={workdir}',
                f'--workdir={workdir}', '--config.num_train_steps=6'])
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Resuming from step 4' in run.stdout
    assert 'Config changed since the last start: num_train_steps: 4 -> 6' in run.stdout
    assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]
    new = tmp_path / 'new'
    bad = _run(['sequencer_jax.main', f'--workdir={new}'])
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
    assert (f'Missing --config: --workdir={new} holds no config.json (the config a training '
            'run saves in its workdir) to use instead; give the config of a new run, e.g. '
            '--config=configs/default.py.') in bad.stderr
    assert not new.exists()
    bad = _run(['sequencer_jax.evaluate', f'--checkpoint={workdir}', '--config.batch_size=8'])
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
    assert ('--config.batch_size change keys of --config, which is not given; give it too (for '
            'the config a training run saved in its workdir: '
            f'--config=configs/workdir.py:dir={workdir})') in bad.stderr
    # A run that stops (here: diverging) says why in one line, without the flag help.
    diverged = _run(['sequencer_jax.main', f'--config=configs/workdir.py:dir={workdir}',
                     f'--workdir={workdir}', '--config.num_train_steps=8',
                     '--config.optimizer.base_lr=1e30'])
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    assert diverged.stderr.rstrip().splitlines()[-1].startswith(
        'error: Non-finite training loss at step 8 (mean over steps 8-8). The last good '
        f'checkpoint (step 6) is kept in {workdir}. Lower config.optimizer.base_lr')
    assert 'Traceback' not in diverged.stderr and 'flags:' not in diverged.stderr


def test_resolution_plot_of_several_checkpoints(tmp_path):
    curves = [('a', [{'resolution': 224, 'top1': 0.8}, {'resolution': 160, 'top1': 0.7}]),
              ('b', [{'resolution': 224, 'top1': 0.75}])]
    resolution.plot_resolution_sweep(curves, str(tmp_path / 'p.png'))
    assert (tmp_path / 'p.png').read_bytes()[:8] == PNG_MAGIC
    (tmp_path / 'bad.json').write_text('{}')
    with pytest.raises(ValueError, match='not an evaluate --output_json'):
        resolution.load_rows(str(tmp_path / 'bad.json'))


def test_mce_arithmetic_on_known_tables():
    alexnet = {c: {s: e for s in robustness.SEVERITIES}
               for c, e in robustness.ALEXNET_ERRORS.items()}
    assert robustness.mean_corruption_error(alexnet)['mCE'] == pytest.approx(100.0)
    half = {c: {s: e / 2 for s in robustness.SEVERITIES}
            for c, e in robustness.ALEXNET_ERRORS.items()}
    assert robustness.mean_corruption_error(half)['mCE'] == pytest.approx(50.0)
    # One corruption differs per severity: CE is the mean error over severities / AlexNet's.
    table = {c: {s: 0.5 for s in robustness.SEVERITIES} for c in robustness.ALEXNET_ERRORS}
    table['fog'] = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}
    scores = robustness.mean_corruption_error(table)
    assert scores['fog'] == pytest.approx(100 * 0.3 / 0.819324)
    expected = np.mean([0.5 / a for c, a in robustness.ALEXNET_ERRORS.items() if c != 'fog']
                       + [0.3 / 0.819324])
    assert scores['mCE'] == pytest.approx(100 * expected)
    assert scores['mCE_unnormalized'] == pytest.approx(100 * (14 * 0.5 + 0.3) / 15)
    del table['snow']
    with pytest.raises(ValueError, match="missing \\['snow'\\]"):
        robustness.mean_corruption_error(table)


def test_class_subsets_and_multi_label_scoring():
    assert len(robustness.IMAGENET_A_CLASSES) == len(set(robustness.IMAGENET_A_CLASSES)) == 200
    assert len(robustness.IMAGENET_R_CLASSES) == len(set(robustness.IMAGENET_R_CLASSES)) == 200
    assert max(robustness.IMAGENET_A_CLASSES + robustness.IMAGENET_R_CLASSES) < 1000
    model = sj.create_model('sequencer2d_s', num_classes=6, layers=(1, 1, 1, 1),
                            embed_dims=(8, 8, 8, 8), hidden_sizes=(2, 2, 2, 2))
    images = jnp.zeros((3, 14, 14, 3))
    params = model.init(jax.random.PRNGKey(0), images)['params']
    params['head']['bias'] = jnp.arange(6.0)  # always predicts 5, then 4, 3, ...
    batch = {'image': images, 'label': jnp.array([4, 4, 1]), 'mask': jnp.array([1, 1, 1])}
    mask = robustness.class_mask(6, [1, 4])  # class 5 is not in the subset: 4 wins
    out = steps.eval_step(params, batch, model=model, class_mask=jnp.asarray(mask))
    assert (float(out['top1']), float(out['top5']), float(out['count'])) == (2, 3, 3)
    multi_hot = jnp.array([[0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0], [0] * 6], jnp.float32)
    real = steps.eval_step(params, {**batch, 'label': multi_hot}, model=model)
    assert (float(real['top1']), float(real['count'])) == (1, 2)  # unlabeled: not counted


def test_erf_of_vertical_only_model_is_its_column(tmp_path):
    # Only vertical recurrences: the centre output sees exactly its column of patches.
    model = sj.create_model('sequencer2d_vertical', num_classes=0, layers=(1, 1, 1, 1),
                            patch_sizes=(4, 2, 1, 1), embed_dims=(8, 16, 16, 16),
                            hidden_sizes=(4, 8, 8, 8))
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    grad_map = np.asarray(erf.centre_gradient_map(model, variables, images))
    stride = 8
    centre = (32 // stride) // 2
    band = np.zeros((32, 32), bool)
    band[:, centre * stride:(centre + 1) * stride] = True
    assert np.all(grad_map[~band] == 0)
    assert np.all(grad_map[band].reshape(32, stride).sum(1) > 0)  # every row of the band
    full = sj.create_model('sequencer2d_s', num_classes=0, layers=(1, 1, 1, 1),
                           patch_sizes=(4, 2, 1, 1), embed_dims=(8, 16, 16, 16),
                           hidden_sizes=(2, 4, 4, 4))
    full_map = np.asarray(erf.centre_gradient_map(
        full, full.init(jax.random.PRNGKey(1), images), images))
    assert np.all(full_map > 0)  # both axes: the whole image
    assert 0 < erf.high_contribution_area(grad_map, 0.99) <= band.mean() + 1e-9
    erf.save_png(grad_map, str(tmp_path / 'erf.png'))
    assert (tmp_path / 'erf.png').read_bytes()[:8] == PNG_MAGIC
    shown = erf.normalise_for_display(grad_map)
    assert shown.max() == pytest.approx(1.0) and shown.min() == 0


@pytest.mark.slow
def test_erf_cli(trained, data_dir, tmp_path):
    result = _run(['sequencer_jax.experiments.erf', '--config=configs/default.py',
                   f'--checkpoint={trained}', f'--config.dataset.data_dir={data_dir}',
                   "--config.model.args={'layers': (1, 1, 1, 1), 'patch_sizes': (4, 2, 1, 1), "
                   "'embed_dims': (16, 24, 24, 24), 'hidden_sizes': (4, 6, 6, 6)}",
                   '--num_images=4', f'--output={tmp_path / "maps" / "erf.png"}'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'maps' / 'erf.png').read_bytes()[:8] == PNG_MAGIC
    assert np.load(tmp_path / 'maps' / 'erf.npy').shape == (32, 32)
    assert 'high-contribution area ratio' in result.stdout
    for flag, message in [('--num_images=0', 'flag --num_images=0: 0 is not a positive integer'),
                          ('--config.imagesize=32', '(did you mean image_size'),
                          (f'--output={tmp_path / "erf.jpg"}', 'give a .png file')]:
        bad = _run(['sequencer_jax.experiments.erf', '--config=configs/default.py',
                    f'--checkpoint={trained}', flag])
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr[-3000:]
        assert 'Traceback' not in bad.stderr


def test_finetune_loads_backbone_and_reinitialises_head(trained, data_dir, tmp_path, capsys):
    source = final_params(trained)
    config = tiny_config(data_dir, steps=1, init_from=trained, **{'model.num_classes': 12})
    config.unlock()
    config.optimizer.base_lr = 0.0  # keep the loaded weights as they are
    config.optimizer.warmup_lr = 0.0
    config.optimizer.min_lr = 0.0
    config.optimizer.weight_decay = 0.0
    config.lock()
    loop.train_and_evaluate(config, str(tmp_path))
    assert (f"Initialised from {trained} (a new head for 12 classes; the checkpoint's has "
            '10)') in capsys.readouterr().out
    tuned = final_params(tmp_path)
    assert tuned['head']['kernel'].shape == (24, 12)
    assert np.all(tuned['head']['kernel'] == 0)  # fresh head (zero-initialised)
    for name in source:
        if name != 'head':
            jax.tree.map(np.testing.assert_array_equal, source[name], tuned[name])
    (tmp_path / 'empty').mkdir()
    for source in ('nothing', 'empty'):
        config = tiny_config(data_dir, steps=1, init_from=str(tmp_path / source))
        with pytest.raises(ValueError, match='neither a converted checkpoint'):
            loop.train_and_evaluate(config, str(tmp_path / 'other'))
    assert not (tmp_path / 'other').exists()  # refused before any work
    assert not any((tmp_path / 'empty').iterdir())  # sources are only read


def test_loading_from_a_workdir_leaves_its_unfinished_checkpoint_alone(trained, tmp_path,
                                                                       caplog):
    """init_from or evaluate may read the workdir of a run that is still training: its
    checkpoint in progress (orbax's temporary directory) must survive. Reading it logs no
    warnings (orbax's notices about read-only managers are what was asked for)."""
    workdir = tmp_path / 'running'
    shutil.copytree(trained, workdir)
    in_progress = workdir / 'checkpoints' / '99.orbax-checkpoint-tmp-1764480000000000'
    in_progress.mkdir()
    with caplog.at_level(logging.WARNING):
        params, _, _ = weights.load_params(str(workdir))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params),
                 final_params(trained))
    assert in_progress.is_dir()
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_init_from_keeps_a_fitting_head_unless_reinit_head(trained, data_dir):
    source = final_params(trained)
    assert np.any(source['head']['kernel'] != 0)  # trained: unlike a fresh (zero) head
    for reinit_head in (False, True):
        config = tiny_config(data_dir, init_from=trained, reinit_head=reinit_head)
        model = config_defaults.model_from_config(config, 10)  # the digits' 10: the head fits
        size = config.image_size
        fresh = model.init(jax.random.PRNGKey(1), jnp.zeros((1, size, size, 3)))['params']
        loaded, head = weights.initial_params(config, model, fresh)
        loaded = jax.tree.map(np.asarray, loaded)
        assert head == ('a new head, as config.reinit_head asks' if reinit_head
                        else 'its head kept')
        expected_head = fresh['head'] if reinit_head else source['head']
        jax.tree.map(np.testing.assert_array_equal, loaded['head'], expected_head)
        jax.tree.map(np.testing.assert_array_equal, loaded['stem'], source['stem'])
    # A checkpoint of another architecture names the first parameter that differs.
    wider = tiny_config(data_dir, init_from=trained, **{'model.args': dict(
        TINY_MODEL, embed_dims=(16, 32, 24, 24))})
    model = config_defaults.model_from_config(wider, 10)
    size = wider.image_size
    fresh = model.init(jax.random.PRNGKey(1), jnp.zeros((1, size, size, 3)))['params']
    message = (f"config.init_from='{trained}' does not fit sequencer2d_s with "
               'config.model.args: its parameter stages_1_blocks_0/mlp_channels/fc1/bias is '
               "(72,), the model's (96,). Use the model it was trained with: config.model in "
               f'{trained}/config.json (or that whole config: '
               f'--config=configs/workdir.py:dir={trained}).')
    with pytest.raises(ValueError, match=re.escape(message)):
        weights.initial_params(wider, model, fresh)
    from sequencer_jax import evaluate
    with pytest.raises(ValueError, match=f'The checkpoint {re.escape(trained)} does not fit'):
        evaluate.evaluate_checkpoint(wider, trained, [32])
    narrow = tiny_config(data_dir, **{'model.num_classes': 5})
    with pytest.raises(ValueError, match='5 classes, but sklearn_digits has 10'):
        evaluate.evaluate_checkpoint(narrow, trained, [32])


def test_finetune_configs_follow_the_official_recipes():
    cifar = load_config('finetune.py', 'task=cifar100')
    assert (cifar.dataset.name, cifar.num_epochs, cifar.optimizer.base_lr,
            cifar.optimizer.weight_decay, cifar.optimizer.grad_clip_norm,
            cifar.optimizer.warmup_epochs, cifar.model.args.drop_path_rate,
            cifar.image_size) == ('cifar100', 200, 1e-4, 1e-4, 1.0, 5, 0.1, 224)
    cars = load_config('finetune.py', 'task=cars196')
    assert cars.dataset.name == 'cars196' and cars.augment.randaugment is not None
    high = load_config('finetune.py', 'task=imagenet392')
    assert (high.num_epochs, high.optimizer.weight_decay, high.model.args.drop_path_rate) == \
        (30, 1e-8, 0.4)
    # The 392 px fine-tune keeps ImageNet's trained head; transfer tasks get fresh ones.
    assert (high.reinit_head, cifar.reinit_head, cars.reinit_head) == (False, True, True)
    assert load_config('finetune.py', 'task=imagenet392,task=cifar10').reinit_head


def test_linear_probe_example_on_converted_weights(timm_fixture, data_dir, tmp_path):
    info = timm_fixture.case('sequencer2d_s')
    variables = convert.from_torch_state_dict(timm_fixture.state_dict('sequencer2d_s'),
                                              'sequencer2d_s', **info['overrides'])
    convert.save_converted(str(tmp_path / 'ckpt'), 'sequencer2d_s', 5, variables,
                           info['overrides'])
    results = run_cli(linear_probe.main, f'--checkpoint={tmp_path / "ckpt"}', '--image_size=28',
                      f'--data_dir={data_dir}')
    assert set(results) == {'stage0', 'stage1', 'stage2', 'stage3', 'all_stages'}
    assert results['all_stages'] > 0.5  # chance is 0.1


def test_linear_probe_reads_a_training_workdir_and_a_state_dict_file(trained, data_dir,
                                                                     tmp_path):
    """A workdir's model comes from the config its run saved (it was refused: 'not a
    converted checkpoint'); a state_dict file's from --config."""
    probe = lambda *args: run_cli(linear_probe.main, '--image_size=32',  # noqa: E731
                                  f'--data_dir={data_dir}', *args)
    results = probe(f'--checkpoint={trained}')
    assert all(0 <= accuracy <= 1 for accuracy in results.values())
    assert results['all_stages'] > 0.3  # 4 steps of training; chance is 0.1
    exported = tmp_path / 'w.npz'
    run_cli(convert_cli.main, '--to_timm', f'--input={trained}', f'--output={exported}')
    assert probe(f'--checkpoint={exported}', f'--config=configs/workdir.py:dir={trained}') \
        == results
    with pytest.raises(UserError, match=re.escape(
            f'{exported} names no model (no model.json or config.json in it); give the config '
            'of that model, e.g. --config=')):
        probe(f'--checkpoint={exported}')


def test_robustness_suites_run_end_to_end(trained, data_dir, monkeypatch):
    # The real suites need ImageNet-scale downloads; the embedded digits stand in for
    # them, through the same code path (dataset name, class subset, scoring).
    config = tiny_config(data_dir, **{'model.num_classes': 10})
    monkeypatch.setattr(robustness, 'SUITES', {
        'imagenet_a': ('sklearn_digits', 'test', 'label', (0, 1, 2, 3, 4))})
    subset = robustness.run_suite(config, trained, 'imagenet_a')
    assert subset['table'][0]['examples'] == 360
    assert 0 <= subset['scores']['top1'] <= 100
    monkeypatch.setattr(robustness, 'CORRUPTED_DATASET', ('sklearn_digits', 'test'))
    monkeypatch.setattr(robustness, 'ALEXNET_ERRORS', {'fog': 0.8, 'snow': 0.9})
    corrupted = robustness.run_suite(config, trained, 'imagenet_c')
    assert len(corrupted['table']) == 10  # 2 corruptions x 5 severities
    error = 1 - corrupted['table'][0]['top1']
    assert corrupted['scores']['fog'] == pytest.approx(100 * error / 0.8)
    assert corrupted['scores']['mCE'] == pytest.approx(
        (corrupted['scores']['fog'] + corrupted['scores']['snow']) / 2)


def test_sj_load_gives_every_source_kind_as_the_clis_read_it(trained, tmp_path):
    images = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    cli_model, cli_params = weights.load_model(trained, 32)  # what evaluate and the probe use
    expected = np.asarray(cli_model.apply({'params': cli_params}, images))
    model, variables, preprocessing = sj.load(trained)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, images)), expected)
    assert preprocessing == {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
                             'interpolation': 'bicubic', 'crop_pct': 1.0,
                             'crop_mode': 'center', 'input_size': (3, 32, 32)}
    with pytest.raises(UserError, match='has no EMA weights .* drop ema=True'):
        sj.load(trained, ema=True)
    exported = tmp_path / 'w.npz'
    run_cli(convert_cli.main, '--to_timm', f'--input={trained}', f'--output={exported}')
    model, variables, _ = sj.load(exported, config=config_defaults.saved_config(trained))
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)), expected, atol=1e-6)
    with pytest.raises(UserError, match='names no model .*config= to sj.load'):
        sj.load(exported)
    converted = tmp_path / 'converted'  # written by convert, which names no preprocessing
    run_cli(convert_cli.main, f'--input={exported}', '--model=sequencer2d_s',
            '--num_classes=10', f'--model_args={json.dumps(TINY_MODEL)}',
            f'--output={converted}')
    model, variables, preprocessing = sj.load(converted)
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)), expected, atol=1e-6)
    assert preprocessing['input_size'] == (3, 224, 224)  # timm's, for want of its own
    # Fine-tuning in one's own code: train=True, and no rng while every drop rate is 0.
    zero = model.clone(drop_path_rate=0.0)
    assert zero.apply(variables, images, train=True).shape == expected.shape
