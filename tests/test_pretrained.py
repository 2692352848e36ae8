"""Published weights from the Hugging Face Hub, served by a local Hub on 127.0.0.1: one
call, its cache, offline use, a corrupt cached file, and Hub sources in evaluate,
init_from, convert and the experiments."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from safetensors.numpy import save as safetensors_bytes

import local_hub
import sequencer_jax as sj
from conftest import run_cli
from sequencer_jax import evaluate, hub, weights
from sequencer_jax.convert import __main__ as convert_cli
from sequencer_jax.experiments import erf, linear_probe, robustness
from sequencer_jax.errors import UserError
from sequencer_jax.train import loop
from test_experiments import PNG_MAGIC
from test_train import ROOT, final_params, tiny_config

REPO = 'test/sequencer2d_s.tiny'
NOT_SEQUENCER = 'test/not-a-sequencer'
CROP_PCT = 0.9  # not our configs' 0.875: the weights' own preprocessing is used
SIZE = 42


def hub_files(timm_fixture) -> dict[str, dict[str, bytes]]:
    """A repository as timm publishes one: the fixture's tiny sequencer2d_s (whose logits
    timm computed) with its head widened from 5 to 10 classes (the digits'), and a
    repository whose weights are not a Sequencer's."""
    info = timm_fixture.case('sequencer2d_s')
    state_dict = dict(timm_fixture.state_dict('sequencer2d_s'))
    rng = np.random.RandomState(0)
    for key, extra in (('head.fc.weight', (5, 24)), ('head.fc.bias', (5,))):
        state_dict[key] = np.concatenate([state_dict[key],
                                          rng.randn(*extra).astype(np.float32)])
    config = {'architecture': 'sequencer2d_s', 'num_classes': 10,
              'model_args': info['overrides'],
              'pretrained_cfg': {'tag': 'tiny', 'input_size': [3, SIZE, SIZE],
                                 'interpolation': 'bicubic', 'crop_pct': CROP_PCT,
                                 'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225],
                                 'num_classes': 10}}
    other = {'encoder.weight': np.zeros((4, 4), np.float32)}
    return {REPO: {'config.json': json.dumps(config).encode(),
                   'model.safetensors': safetensors_bytes(state_dict)},
            NOT_SEQUENCER: {'config.json': json.dumps(dict(config)).encode(),
                            'model.safetensors': safetensors_bytes(other)}}


_LOAD = """
import sys
import numpy as np
import sequencer_jax as sj
from sequencer_jax.errors import UserError
model, variables, preprocessing = sj.load_pretrained(sys.argv[1])
np.save(sys.argv[2], np.asarray(model.apply(variables, np.load(sys.argv[3]))))
print('preprocessing', preprocessing['crop_pct'], preprocessing['input_size'])
try:
    sj.load_pretrained(sys.argv[4])
except UserError as e:
    print('refused:', str(e).splitlines()[0], str(e).splitlines()[1])
"""


def _load_through(hub_server, cache: pathlib.Path, tmp_path: pathlib.Path, images):
    """Runs sj.load_pretrained in a fresh process whose Hub is ``hub_server`` (HF_ENDPOINT,
    as for a mirror); its logits and stdout."""
    np.save(tmp_path / 'images.npy', images)
    run = subprocess.run(
        [sys.executable, '-c', _LOAD, REPO, str(tmp_path / 'logits.npy'),
         str(tmp_path / 'images.npy'), NOT_SEQUENCER], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=hub_server.endpoint,
                 HF_HUB_CACHE=str(cache)))
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(tmp_path / 'logits.npy'), run.stdout


@pytest.fixture(scope='module')
def hub_cache(timm_fixture, tmp_path_factory):
    """A Hub cache holding REPO, fetched from the local Hub by sj.load_pretrained."""
    cache = tmp_path_factory.mktemp('hub_cache')
    with local_hub.LocalHub(hub_files(timm_fixture)) as server:
        logits, out = _load_through(server, cache, tmp_path_factory.mktemp('load'),
                                    timm_fixture.images(SIZE, SIZE))
    assert server.downloads == {'config.json': 2, 'model.safetensors': 2}  # both repos
    return cache, logits, out


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """This process on the fetched cache, without a Hub (HF_HUB_OFFLINE)."""
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(hub_cache[0]))
    return hub_cache[0]


def test_published_weights_in_one_call_give_timms_logits(hub_cache, timm_fixture):
    cache, logits, out = hub_cache
    np.testing.assert_allclose(logits[:, :5], timm_fixture.logits('sequencer2d_s', SIZE, SIZE),
                               atol=1e-4, rtol=0)
    assert f'preprocessing {CROP_PCT} (3, {SIZE}, {SIZE})' in out
    converted = cache / 'sequencer_jax' / 'test--sequencer2d_s.tiny' / local_hub.COMMIT
    assert json.loads((converted / 'model.json').read_text())['model'] == 'sequencer2d_s'
    # A Hub file that is not a Sequencer state_dict names the keys that do not fit.
    assert ("refused: The state_dict does not match 'sequencer2d_s' with 10 classes. "
            "Missing (no torch key maps to): ['head/bias', 'head/kernel', 'norm/bias'") in out


def test_the_cache_serves_offline_and_a_revision_pins_it(offline, hub_cache, timm_fixture,
                                                         capsys):
    images = timm_fixture.images(SIZE, SIZE)
    for name, revision in [(REPO, None), (REPO, local_hub.COMMIT)]:
        model, variables, preprocessing = weights.load_pretrained(name, revision)
        np.testing.assert_allclose(np.asarray(model.apply(variables, images))[:, :5],
                                   timm_fixture.logits('sequencer2d_s', SIZE, SIZE), atol=1e-4)
        assert preprocessing['crop_pct'] == CROP_PCT
    # sj.load of the Hub source is the same call; a Hub repository with its crop mode.
    model, variables, preprocessing = sj.load(f'hf-hub:{REPO}')
    np.testing.assert_allclose(np.asarray(model.apply(variables, images))[:, :5],
                               timm_fixture.logits('sequencer2d_s', SIZE, SIZE), atol=1e-4)
    assert preprocessing['crop_mode'] == 'center'
    # Converted once, by the first load (the fixture's process), then read from the cache.
    assert hub_cache[2].count(f'Converted {REPO} ') == 1
    assert 'Converted' not in capsys.readouterr().out
    with pytest.raises(UserError, match=re.escape(
            "No published weights for 'sequencer2d_xs'; the variants with weights are "
            'sequencer2d_s, sequencer2d_m, sequencer2d_l')):
        weights.load_pretrained('sequencer2d_xs')
    with pytest.raises(UserError, match=re.escape(
            'Cannot fetch config.json of timm/sequencer2d_m.in1k: no network (or '
            'HF_HUB_OFFLINE is set) and no copy in the Hub cache. Fetch it where there is '
            'network (hf download timm/sequencer2d_m.in1k --cache-dir DIR)')):
        weights.load_pretrained('sequencer2d_m')


def test_a_corrupt_cached_file_is_fetched_again(timm_fixture, tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    files = hub_files(timm_fixture)
    with local_hub.LocalHub(files) as server:
        first, _ = _load_through(server, cache, tmp_path, timm_fixture.images(SIZE, SIZE))
        blob = cache / 'models--test--sequencer2d_s.tiny' / 'blobs' / local_hub.etag(
            'model.safetensors', files[REPO]['model.safetensors'])
        data = bytearray(blob.read_bytes())
        data[-400:] = bytes(b ^ 0xFF for b in data[-400:])  # size unchanged
        blob.write_bytes(bytes(data))
        monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
        monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(cache))
        with pytest.raises(UserError, match='The cached model.safetensors of test/sequencer2d_s'
                           r'.tiny is corrupt \(its content does not match its hash\), and '
                           'HF_HUB_OFFLINE is set'):
            hub.fetch(hub.PREFIX + REPO)
        again, _ = _load_through(server, cache, tmp_path, timm_fixture.images(SIZE, SIZE))
    assert server.downloads['model.safetensors'] == 2 + 1  # both repos, then the repair
    np.testing.assert_array_equal(again, first)
    assert blob.read_bytes() == files[REPO]['model.safetensors']


def test_hub_sources_in_evaluate_init_from_and_convert(offline, timm_fixture, tmp_path):
    source = hub.PREFIX + REPO
    data_dir = str(tmp_path / 'tfds')
    # evaluate: the weights' own resolution and crop unless the flags say otherwise.
    run = subprocess.run(
        [sys.executable, '-m', 'sequencer_jax.evaluate', '--config=configs/default.py',
         f'--checkpoint={source}', f'--config.dataset.data_dir={data_dir}',
         f'--output_json={tmp_path / "eval.json"}'], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE='1',
                              HF_HUB_CACHE=str(offline)))
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads((tmp_path / 'eval.json').read_text())['rows']
    assert row['resolution'] == SIZE and row['examples'] == 360 and 0 <= row['top1'] <= 1
    # init_from: fine-tuning starts from the Hub's weights (a learning rate of 0 keeps them).
    info = timm_fixture.case('sequencer2d_s')
    config = tiny_config(data_dir, steps=1, init_from=source, image_size=28,
                         **{'model.args': dict(info['overrides'], drop_path_rate=0.0),
                            'optimizer.base_lr': 0.0, 'optimizer.warmup_lr': 0.0,
                            'optimizer.min_lr': 0.0, 'optimizer.weight_decay': 0.0})
    loop.train_and_evaluate(config, str(tmp_path / 'tuned'))
    published, _, _ = weights.load_params(source)
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / 'tuned'),
                 jax.tree.map(np.asarray, published))
    # convert: the architecture comes from the Hub repository; --model is refused.
    run_cli(convert_cli.main, f'--input={source}', f'--output={tmp_path / "copy"}')
    model, variables = weights.load_converted(tmp_path / 'copy')
    assert (model.num_classes, tuple(model.layers)) == (10, (1, 1, 2, 1))
    assert weights.preprocessing(tmp_path / 'copy')['crop_pct'] == CROP_PCT
    with pytest.raises(UserError, match='A Hub repository names its model'):
        run_cli(convert_cli.main, f'--input={source}', '--model=sequencer2d_s',
                f'--output={tmp_path / "other"}')
    with pytest.raises(UserError, match="'hf-hub:timm' is not a Hub source"):
        weights.load_params('hf-hub:timm')


def test_hub_sources_in_the_experiments(offline, tmp_path, monkeypatch):
    source = hub.PREFIX + REPO
    data_dir = str(tmp_path / 'tfds')
    config = tiny_config(data_dir, image_size=SIZE)
    # ImageNet-C's images are crops already: its suite crops none (crop 1.0), not the
    # weights' 0.9, which the other suites use. The digits stand in for its datasets.
    monkeypatch.setattr(robustness, 'CORRUPTED_DATASET', ('sklearn_digits', 'test'))
    monkeypatch.setattr(robustness, 'ALEXNET_ERRORS', {'fog': 0.8})
    monkeypatch.setattr(robustness, 'SEVERITIES', (1,))
    assert config.crop_pct == 1.0
    uncropped, cropped, weights_crop = (
        evaluate.evaluate_checkpoint(config, source, [SIZE], crop_pct=c)[0]
        for c in (1.0, None, CROP_PCT))
    # Without --crop_pct, evaluation crops as the weights say, not as the config does.
    assert cropped == weights_crop and cropped['top1'] != uncropped['top1']
    (row,) = robustness.run_suite(config, source, 'imagenet_c')['table']
    assert row['top1'] == uncropped['top1']
    assert erf.compute_erf(config, source, num_images=2, image_size=SIZE).shape == (SIZE, SIZE)
    probe = run_cli(linear_probe.main, f'--checkpoint={source}', f'--image_size={SIZE}',
                    f'--data_dir={data_dir}')
    assert probe['all_stages'] > 0.5  # chance is 0.1


@pytest.mark.slow  # 8 resolutions up to 384 px, each compiled
def test_the_readme_resolution_sweep_runs_as_written(hub_cache, tmp_path):
    """The README's sweep of the published weights, as written but for the weights (the
    local Hub's tiny sequencer2d_s, total stride 14 as the published: 7 of the 8 sizes
    are not multiples of it) and the data (the embedded digits instead of ImageNet)."""
    command = re.search(r'^python -m sequencer_jax\.evaluate .*--resolutions=.*$',
                        (ROOT / 'README.md').read_text(), re.MULTILINE).group(0)
    swapped = {'--config=configs/imagenet.py': f'--config={ROOT}/configs/default.py',
               '--checkpoint=hf-hub:timm/sequencer2d_s.in1k': f'--checkpoint=hf-hub:{REPO}'}
    args = [swapped.get(a, a) for a in shlex.split(command)[2:]]
    assert len(set(args) & set(swapped.values())) == 2, command
    run = subprocess.run(
        [sys.executable, '-m', *args, f'--config.dataset.data_dir={tmp_path / "tfds"}'],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,  # its files go there
        env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE='1',
                 HF_HUB_CACHE=str(hub_cache[0])))
    assert run.returncode == 0, run.stderr[-3000:]
    resolutions = [int(r) for r in re.search(r'--resolutions=([\d,]+)', command)[1].split(',')]
    assert resolutions == [128, 160, 192, 224, 256, 288, 320, 384]
    written = {a.split('=')[0]: tmp_path / a.split('=')[1] for a in args
               if a.startswith(('--output_json=', '--plot='))}
    rows = json.loads(written['--output_json'].read_text())['rows']
    assert [r['resolution'] for r in rows] == resolutions
    assert all(r['examples'] == 360 and 0 <= r['top1'] <= 1 for r in rows)
    assert written['--plot'].read_bytes()[:8] == PNG_MAGIC
