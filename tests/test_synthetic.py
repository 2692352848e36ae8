"""The ``synthetic`` dataset: batches made on the devices, and the trainer without
TensorFlow."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sequencer_jax.data import batches, synthetic
from sequencer_jax.train import loop

from test_train import TINY_MODEL, final_params, load_config, locked_with, losses

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKED_IMPORTS = pathlib.Path(__file__).parent / 'blocked_imports'


def _sharding(num_devices):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ('data',))
    return NamedSharding(mesh, PartitionSpec('data'))


def test_batches_depend_on_the_seed_and_index_alone_and_are_placed_by_the_sharding():
    data = synthetic.Synthetic(num_classes=7, seed=3)
    stream = data.train_batches(16, 20, 0, _sharding(8))
    first = [jax.device_get(next(stream)) for _ in range(3)]
    assert first[0]['image'].shape == (16, 20, 20, 3)
    assert first[0]['image'].dtype == np.float32 and first[0]['label'].dtype == np.int32
    assert 0 <= first[0]['label'].min() and first[0]['label'].max() < 7
    assert not np.array_equal(first[0]['image'], first[1]['image'])
    resumed = next(data.train_batches(16, 20, 2, _sharding(2)))  # another mesh too
    assert resumed['image'].sharding == _sharding(2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), first[2])
    other_seed = next(synthetic.Synthetic(7, 4).train_batches(16, 20, 0, _sharding(8)))
    assert not np.array_equal(jax.device_get(other_seed['image']), first[0]['image'])


def test_images_carry_their_class_and_the_eval_split_is_padded_and_masked():
    data = synthetic.Synthetic(num_classes=3, seed=0)
    split, count = data.eval_batches(16, 12, 40, _sharding(8))
    # Each evaluation asks again: the same jitted function, compiled once.
    assert data._maker(16, 12, _sharding(8)) is data._maker(16, 12, _sharding(8))
    split = [jax.device_get(b) for b in split]
    assert count == len(split) == 3
    assert [int(b['mask'].sum()) for b in split] == [16, 16, 8]
    assert split[2]['mask'].tolist() == [1] * 8 + [0] * 8
    # Images of one class are closer to that class's mean image than to the others'.
    images = np.concatenate([b['image'] for b in split]).reshape(48, -1)
    labels = np.concatenate([b['label'] for b in split])
    means = np.stack([images[labels == k].mean(0) for k in range(3)])
    nearest = np.argmin(((images[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.9


def _config():
    config = load_config('default.py', 'dataset=synthetic')
    config.model.args = TINY_MODEL
    config.dataset.synthetic.update(train_examples=640, eval_examples=40)
    return locked_with(config, {'num_train_steps': 40, 'batch_size': 16,
                                'log_every_steps': 1, 'checkpoint_every_steps': 2,
                                'eval_every_steps': 1000, 'progress': 'lines',
                                'optimizer.warmup_steps': 2, 'optimizer.base_lr': 1e-2})


def _main(workdir, steps):
    """``main`` on the synthetic dataset, TensorFlow and TFDS unimportable, as a process
    on one device."""
    args = [sys.executable, '-m', 'sequencer_jax.main', '--config=configs/default.py:dataset='
            'synthetic', f'--workdir={workdir}', f'--config.num_train_steps={steps}',
            '--config.batch_size=16', '--config.log_every_steps=1',
            '--config.checkpoint_every_steps=2', '--config.eval_every_steps=1000',
            '--config.progress=lines', '--config.optimizer.warmup_steps=2',
            '--config.optimizer.base_lr=1e-2',
            '--config.dataset.synthetic.train_examples=640',
            '--config.dataset.synthetic.eval_examples=40', *[f'--config.model.args.{k}={v}' for k, v in TINY_MODEL.items()]]
    env = dict(os.environ, PYTHONPATH=f'{BLOCKED_IMPORTS}{os.pathsep}{ROOT}',
               SEQUENCER_JAX_BLOCKED_IMPORTS='tensorflow,tensorflow_datasets',
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_trainer_runs_without_tensorflow_and_a_killed_run_resumes_bit_identically(
        tmp_path):
    straight = tmp_path / 'straight'
    out, err = _main(straight, 40).communicate(timeout=300)
    final = out.splitlines()[-1]
    assert final.startswith('Final eval: top-1'), err
    history = [loss for _, loss in sorted(losses(straight).items())]
    assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.1  # it learns
    killed = tmp_path / 'killed'
    run = _main(killed, 40)
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:
        if any(path.name.isdigit() for path in (killed / 'checkpoints').glob('*')):
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    out, err = run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL, (out, err)
    assert max(losses(killed)) < 40
    resumed = _main(killed, 40)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert 'Resuming from step' in out
    assert 'Training sequencer2d_s (10 classes) on synthetic' in out
    assert out.splitlines()[-1] == final
    assert losses(killed) == losses(straight)
    jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(killed))
    assert json.loads((killed / 'config.json').read_text())['dataset']['name'] == 'synthetic'


def test_synthetic_serves_classification_only(tmp_path):
    segmentation = load_config('segmentation.py')
    segmentation.dataset.name = 'synthetic'
    with pytest.raises(ValueError, match="config.dataset.name='synthetic' serves "
                       'classification only'):
        loop.train_and_evaluate(segmentation, str(tmp_path / 'seg'))
    assert not (tmp_path / 'seg').exists()


def test_the_trainer_imports_no_tensorflow_for_synthetic_data():
    result = subprocess.run(
        [sys.executable, '-c', 'import sys\n'
         'from sequencer_jax import main\n'
         'from sequencer_jax.train import loop, tasks\n'
         'assert "tensorflow" not in sys.modules, "tensorflow imported"\n'],
        cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    assert batches.open_dataset(_config().dataset).name == 'synthetic'
