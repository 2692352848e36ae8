"""The training system on CPU with 8 fake devices: meshes, resume, multi-process, CLIs."""

import errno
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from etils import epath

import mini_imagenet
from sequencer_jax import config_defaults, weights
from sequencer_jax.data import pipeline
from sequencer_jax.errors import UserError
from sequencer_jax.models import layout
from sequencer_jax.train import checkpoint, loop, mesh as mesh_lib, preemption, reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_MODEL = dict(layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), embed_dims=(16, 24, 24, 24),
                  hidden_sizes=(4, 6, 6, 6), drop_path_rate=0.1)


def load_config(filename, arg=None):
    spec = importlib.util.spec_from_file_location('config', ROOT / 'configs' / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


def tiny_config(data_dir, steps=4, **overrides):
    config = load_config('default.py')
    config.model.args = TINY_MODEL
    return short_run(config, data_dir, steps, 16, overrides)


def short_run(config, data_dir, steps: int, batch_size: int, overrides):
    """``config`` as the tests run it: ``steps`` of ``batch_size`` on ``data_dir``, every
    step logged, a checkpoint every 2, evaluated at the end only; ``overrides`` (dotted
    keys) set, then locked."""
    config.dataset.data_dir = data_dir
    config.batch_size = batch_size
    config.num_train_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 2
    config.progress = 'lines'
    return locked_with(config, overrides)


def locked_with(config, overrides):
    """``config`` with ``overrides`` (dotted keys) set, then locked."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split('.')
        for p in parents:
            target = target[p]
        target[leaf] = value
    config.lock()
    return config


def losses(workdir):
    lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
    return {r['step']: r['train/loss'] for r in map(json.loads, lines) if 'train/loss' in r}


def final_params(workdir):
    params, _, _ = weights.load_params(str(workdir))
    return jax.tree.map(np.asarray, params)


def test_meshes_give_the_same_losses_as_one_device(data_dir, tmp_path):
    reference = tmp_path / 'one'
    # Only the final checkpoint: saving is not what this test is about.
    config = lambda mesh: tiny_config(data_dir, mesh=mesh,  # noqa: E731
                                      checkpoint_every_steps=1000)
    loop.train_and_evaluate(config([('data', 1), ('fsdp', 1)]), str(reference),
                            devices=jax.devices()[:1])
    expected = losses(reference)
    assert sorted(expected) == [1, 2, 3, 4]
    for mesh in ([('data', 8), ('fsdp', 1)], [('data', 4), ('fsdp', 2)],
                 [('data', 1), ('fsdp', 8)]):
        workdir = tmp_path / f'{mesh[0][1]}x{mesh[1][1]}'
        loop.train_and_evaluate(config(mesh), str(workdir))
        got = losses(workdir)
        np.testing.assert_allclose([got[s] for s in sorted(got)],
                                   [expected[s] for s in sorted(expected)], rtol=2e-5)


@pytest.mark.slow  # Pallas interpreted on CPU; its arithmetic is in test_pallas_recurrence
def test_pallas_recurrence_trains_on_a_mesh_like_the_default(data_dir, tmp_path):
    """The trainer runs under its mesh, so recurrence='pallas' splits its kernels over the
    8 devices (XLA cannot partition them); the losses equal the default path's."""
    runs = {}
    for recurrence in ('natural', 'pallas'):
        config = tiny_config(data_dir, steps=2, mesh=[('data', 4), ('fsdp', 2)],
                             checkpoint_every_steps=1000)
        with config.unlocked():
            config.model.args.recurrence = recurrence
        loop.train_and_evaluate(config, str(tmp_path / recurrence))
        runs[recurrence] = losses(tmp_path / recurrence)
    assert sorted(runs['pallas']) == [1, 2]
    np.testing.assert_allclose([runs['pallas'][s] for s in (1, 2)],
                               [runs['natural'][s] for s in (1, 2)], rtol=1e-5)


def test_fsdp_rules_shard_large_parameters():
    import sequencer_jax as sj
    model = sj.create_model('sequencer2d_s', num_classes=1000)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               np.zeros((1, 224, 224, 3), np.float32)))
    mesh = mesh_lib.make_mesh([('data', 1), ('fsdp', -1)])
    shardings = mesh_lib.tree_shardings(params, mesh, [('.*', 'fsdp')])['params']
    block = shardings['stages_1_blocks_0']
    assert block['mlp_channels']['fc1']['kernel'].spec == jax.sharding.PartitionSpec(None, 'fsdp')
    assert block['rnn_tokens']['rnn_v']['w_ih'].spec == \
        jax.sharding.PartitionSpec(None, 'fsdp')  # [2, 384, 384]: first largest dim
    assert block['norm1']['scale'].spec == jax.sharding.PartitionSpec()  # small: replicated
    replicate = mesh_lib.tree_shardings(params, mesh, [('head', 'fsdp'), ('.*', 'replicate')])
    assert replicate['params']['head']['kernel'].spec != jax.sharding.PartitionSpec()
    assert replicate['params']['stages_1_blocks_0']['mlp_channels']['fc1']['kernel'].spec == \
        jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match='needs 16 devices but 8'):
        mesh_lib.make_mesh([('data', 4), ('fsdp', 4)])
    with pytest.raises(ValueError, match='-1 for one axis only'):
        mesh_lib.make_mesh([('data', -1), ('fsdp', -1)])
    with pytest.raises(ValueError, match='Unknown param rule'):
        mesh_lib.tree_shardings(params, mesh, [('.*', 'tensor')])
    # What a forgotten comma or parenthesis on the command line gives:
    with pytest.raises(ValueError, match=re.escape("config.mesh must be (name, size) pairs, "
                                                   "e.g. (('data', -1), ('fsdp', 1)), got "
                                                   "('data', 8)")):
        mesh_lib.make_mesh(('data', 8))
    with pytest.raises(ValueError, match='note the comma after a single pair'):
        mesh_lib.tree_shardings(params, mesh, ('.*', 'fsdp'))
    with pytest.raises(ValueError, match=r"'\(' is not a regular expression"):
        mesh_lib.tree_shardings(params, mesh, [('(', 'fsdp')])


def test_mesh_param_rules_and_every_model_option_override_from_the_command_line():
    from absl import flags
    from ml_collections import config_flags
    argv = ['main', f'--config={ROOT / "configs" / "imagenet.py"}',
            "--config.mesh=(('data', 2), ('fsdp', 4))",
            "--config.param_rules=(('head', 'replicate'), ('.*', 'fsdp'))",
            '--config.model.args.remat=true', '--config.model.args.layers=(1, 1, 2, 1)',
            '--config.model.args.drop_rate=0.5']
    flag_values = flags.FlagValues()
    # sys_argv: ml_collections defines the override flags from the command line it is given.
    config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.mesh == (('data', 2), ('fsdp', 4))
    assert mesh_lib.make_mesh(config.mesh).shape == {'data': 2, 'fsdp': 4}
    mesh_lib.check_rules(config.param_rules)
    model = config_defaults.model_from_config(config, 1000)
    assert (model.remat, model.layers, model.drop_rate) == (True, (1, 1, 2, 1), 0.5)
    assert (model.scan_blocks, model.drop_path_rate) == (True, 0.1)  # the config's
    assert model.embed_dims == (192, 384, 384, 384)  # unset: sequencer2d_s's own
    with pytest.raises(AttributeError):  # a misspelt option is still an error
        config.model.args.remta = True


class StopAfter(preemption.StopFlag):
    """Behaves as if SIGTERM arrived after ``n`` steps."""

    n = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def any_process(self, taken_over=False):
        self.calls += 1
        if self.calls >= self.n:
            self.received = 'SIGTERM'
        return super().any_process(taken_over)


def test_kill_and_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir, steps=6, mesh=[('data', 4), ('fsdp', 2)], ema_decay=0.9)
    metrics = loop.train_and_evaluate(config, str(tmp_path / 'straight'))
    assert {'eval/top1', 'eval/top5', 'eval_ema/top1', 'eval_ema/top5'} <= set(metrics)
    with monkeypatch.context() as patch:
        patch.setattr(preemption, 'StopFlag', StopAfter)
        with pytest.raises(loop.Interrupted, match=r'^Stopped \(SIGTERM\): saved step 3; '
                           'rerun the same command to resume.$'):
            loop.train_and_evaluate(config, str(tmp_path / 'resumed'))
    assert sorted(losses(tmp_path / 'resumed')) == [1, 2, 3]
    loop.train_and_evaluate(config, str(tmp_path / 'resumed'))
    assert losses(tmp_path / 'resumed') == losses(tmp_path / 'straight')
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / 'straight'),
                 final_params(tmp_path / 'resumed'))


@pytest.mark.parametrize('first', [pytest.param(False, marks=pytest.mark.slow), True])
def test_resume_with_scan_blocks_switched_goes_on_as_before(data_dir, tmp_path, capsys, first):
    """Params, EMA and both Adam moments are converted between the unrolled and the
    scanned block layouts: the steps after the checkpoint repeat the unswitched run's."""
    workdir = tmp_path / 'run'
    same = dict(drop_path_rate=0.0)  # drop path draws its keys per layout
    config = tiny_config(data_dir, steps=6, ema_decay=0.9, keep_checkpoints=3,
                         **{'model.args': dict(TINY_MODEL, scan_blocks=first, **same)})
    loop.train_and_evaluate(config, str(workdir))
    unswitched = losses(workdir)
    unswitched_weights = weights.load_params(str(workdir))[:2]  # params, EMA
    shutil.rmtree(workdir / 'checkpoints' / '6')
    capsys.readouterr()
    switched = tiny_config(data_dir, steps=6, ema_decay=0.9, keep_checkpoints=3,
                           **{'model.args': dict(TINY_MODEL, scan_blocks=not first, **same)})
    metrics = loop.train_and_evaluate(switched, str(workdir))
    out = capsys.readouterr().out
    assert (f'The checkpoint was written with scan_blocks={first}: its blocks are converted '
            f'to scan_blocks={not first}.') in out
    assert 'Resuming from step 4' in out
    assert f'model.args.scan_blocks: {str(first).lower()} -> {str(not first).lower()}' in out
    after = losses(workdir)
    assert sorted(after) == list(range(1, 7))
    np.testing.assert_allclose([after[5], after[6]], [unswitched[5], unswitched[6]],
                               rtol=1e-5)
    assert 'eval_ema/top1' in metrics
    first_layout = config_defaults.model_from_config(config, 10)
    for before, now in zip(unswitched_weights, weights.load_params(str(workdir))):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     before, layout.match_layout(now, first_layout))


def test_sigterm_or_a_first_ctrl_c_sets_the_stop_flag(capsys):
    for signum in (signal.SIGTERM, signal.SIGINT):
        before = signal.getsignal(signum)
        flag = preemption.StopFlag()
        try:
            assert flag.any_process() is None
            os.kill(os.getpid(), signum)
            assert flag.any_process() == preemption.SIGNALLED
            assert flag.received == signal.Signals(signum).name
            assert flag.any_process(taken_over=True) == preemption.TAKEN_OVER
        finally:
            flag.restore()
        assert signal.getsignal(signum) is before
    assert 'Ctrl-C: saving a checkpoint after this step' in capsys.readouterr().err
    flag = preemption.StopFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()


@pytest.mark.slow
def test_restore_on_fewer_devices_and_corrupt_latest_fallback(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / 'run')
    loop.train_and_evaluate(tiny_config(data_dir, steps=4, mesh=[('data', 1), ('fsdp', 8)]),
                            workdir)
    # Continue the 8-device fsdp checkpoint on 4 devices with another mesh.
    loop.train_and_evaluate(tiny_config(data_dir, steps=6, mesh=[('data', 2), ('fsdp', 2)]),
                            workdir, devices=jax.devices()[:4])
    out = capsys.readouterr().out
    assert 'Resuming from step 4' in out
    assert ('Config changed since the last start: mesh: [["data", 1], ["fsdp", 8]] -> '
            '[["data", 2], ["fsdp", 2]]; num_train_steps: 4 -> 6') in out
    assert max(losses(workdir)) == 6
    # Corrupt the newest checkpoint: the run falls back to the one before it.
    newest = pathlib.Path(workdir) / 'checkpoints' / '6' / 'state'
    for f in newest.rglob('*'):
        if f.is_file():
            f.write_bytes(b'garbage')
    metrics_file = pathlib.Path(workdir) / 'metrics.jsonl'
    with metrics_file.open('a') as f:
        f.write('{"step": 7, "train/lo')  # torn by a crash mid-write
    loop.train_and_evaluate(tiny_config(data_dir, steps=8), workdir)
    out = capsys.readouterr().out
    assert re.search(r'WARNING: the checkpoint at step 6 \(\S+/checkpoints/6\) is unreadable: '
                     r'\w+: .+\. Moved aside to \S+/checkpoints_unreadable/6_\d+; falling back '
                     r'to the previous one\.', out), out
    assert 'Resuming from step 4' in out
    # Steps 5 and 6 were logged again after the fallback: each is in metrics.jsonl once.
    steps = [json.loads(line)['step'] for line in metrics_file.read_text().splitlines()]
    assert steps == list(range(1, 9))
    # Another model in this workdir is refused, naming what changed, and nothing is moved
    # (once, every checkpoint was taken for corrupt and training began again from step 0).
    checkpoints = sorted(os.listdir(pathlib.Path(workdir) / 'checkpoints'))
    wider = tiny_config(data_dir, steps=10, **{'model.args': dict(TINY_MODEL,
                                                                  embed_dims=(16, 32, 24, 24))})
    message = (r"The checkpoint at step 8 in \S+ was written with another model or optimizer "
               r"config: its params/stages_1_\S+ is \(\d+,( \d+)?\), this run's \(\d+,( \d+)?\)\. "
               r'Changed since its last start: model.args.embed_dims: \[16, 24, 24, 24\] -> '
               r'\[16, 32, 24, 24\]; num_train_steps: 8 -> 10\. Resume with the config')
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(wider, workdir)
    assert sorted(os.listdir(pathlib.Path(workdir) / 'checkpoints')) == checkpoints
    assert max(losses(workdir)) == 8
    # With its own config the run goes on; at its last step there is only the evaluation.
    capsys.readouterr()
    metrics = loop.train_and_evaluate(tiny_config(data_dir, steps=8), workdir)
    out = capsys.readouterr().out
    assert 'Resuming from step 8' in out and 'evaluating it only' in out
    assert f'--config=configs/workdir.py:dir={workdir} --config.num_train_steps=N' in out
    assert 0 <= metrics['eval/top1'] <= 1


@pytest.mark.parametrize('metric, values, best', [('eval/top1', [0.3, 0.9, 0.5], 2),
                                                  ('eval/loss', [3.0, 1.0, 2.0], 2),
                                                  ('eval/loss', [1.0, 3.0, 2.0], 1)])
def test_the_best_checkpoint_is_kept_by_its_metric(tmp_path, metric, values, best):
    """The newest checkpoint and the best one: highest accuracy, lowest loss."""
    from sequencer_jax.train import checkpoint
    manager = checkpoint.make_manager(tmp_path, 1, metric)
    for step, value in enumerate(values, start=1):
        checkpoint.save(manager, step, {'w': np.full(3, step, np.float32)}, {'step': step},
                        {metric: value})
    manager.wait_until_finished()
    assert manager.all_steps() == sorted({best, len(values)})
    manager.close()


def test_a_head_narrower_than_the_dataset_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, **{'model.num_classes': 5})
    with pytest.raises(ValueError, match='config.model.num_classes: 5 classes, but '
                                         'sklearn_digits has 10; use a model with at least'):
        loop.train_and_evaluate(config, str(tmp_path))


def test_non_finite_loss_stops_with_the_step_and_says_what_is_kept(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=6, **{'optimizer.base_lr': 1e30,
                                               'optimizer.warmup_epochs': 0})
    with pytest.raises(loop.TrainingStopped, match=r'Non-finite training loss at step \d') as e:
        loop.train_and_evaluate(config, str(tmp_path))
    # The first update already diverges, before the first checkpoint (step 2).
    assert 'at step 2 ' in str(e.value)
    assert 'No checkpoint was written before it. Lower' in str(e.value)
    assert checkpoint.open_read_only(str(tmp_path)) is None


@pytest.mark.slow
def test_a_failed_checkpoint_save_stops_training_and_the_rerun_resumes(data_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """A save fails in the background (here its final rename, as on a full disk): training
    stops by the next save at the latest, saying why and which checkpoint is kept."""
    # Orbax's own rename of a finished checkpoint directory fails: a full disk or lost
    # permissions cannot be made here portably (tests may run as root, on any filesystem).
    from orbax.checkpoint._src.path import async_path
    workdir = str(tmp_path / 'w')
    rename = async_path.rename

    async def full_disk_for_step_8(source, target):
        if epath.Path(target).name == '8':
            raise OSError(errno.ENOSPC, 'No space left on device')
        return await rename(source, target)

    monkeypatch.setattr(async_path, 'rename', full_disk_for_step_8)
    config = tiny_config(data_dir, steps=16, checkpoint_every_steps=4)
    message = (r'A checkpoint could not be written in \S+/checkpoints: \[Errno 28\] No space '
               r'left on device\. Training stopped; the newest complete checkpoint there is step '
               r'4\. Make room there \(or fix its permissions\) and rerun the same command to '
               r"resume from it\. Orbax's log: \S+/orbax\.log\.")
    with pytest.raises(checkpoint.CheckpointSaveError, match=message):
        loop.train_and_evaluate(config, workdir)
    assert 8 < max(losses(workdir)) <= 12
    with checkpoint.open_read_only(workdir) as manager:
        assert manager.all_steps() == [4]
    monkeypatch.setattr(async_path, 'rename', rename)
    capsys.readouterr()
    loop.train_and_evaluate(config, workdir)
    assert 'Resuming from step 4' in capsys.readouterr().out
    assert max(losses(workdir)) == 16


class _ManagerWithSteps:
    def __init__(self, directory, steps):
        self.directory, self._steps = directory, steps

    def all_steps(self):
        return self._steps


@pytest.mark.parametrize('free_mib, steps, said', [
    (3, [], 'error'), (15, [], 'room for 3 more'), (15, [1, 2], None), (100, [], None)])
def test_the_room_for_checkpoints_is_checked_before_training(tmp_path, monkeypatch, capsys,
                                                             free_mib, steps, said):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=free_mib * 2**20))
    state = {'params': jax.ShapeDtypeStruct((2**20,), np.float32)}  # 4 MiB
    manager = _ManagerWithSteps(str(tmp_path), steps)
    if said == 'error':
        with pytest.raises(ValueError, match=re.escape(
                f'The disk of {tmp_path} has 3 MiB free, less than one checkpoint of this run '
                '(4.0 MiB: parameters, optimizer state and EMA, if any). Free space there or '
                'give another --workdir.')):
            checkpoint.check_room(manager, state, held=3)
        return
    checkpoint.check_room(manager, state, held=3)
    out = capsys.readouterr().out
    if said is None:
        assert out == ''  # 15 MiB: room for the 2 that a run with 2 checkpoints wants
    else:
        assert (f'Warning: the disk of {tmp_path} has 15 MiB free: room for 3 more checkpoints '
                'of 4.0 MiB, and this run will want 4 (it keeps 3') in out


def test_training_on_a_full_disk_stops_before_writing_anything(data_dir, tmp_path,
                                                               monkeypatch):
    workdir = tmp_path / 'w'
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: disk_usage(path)._replace(
        free=0 if str(path).startswith(str(workdir)) else disk_usage(path).free))
    with pytest.raises(ValueError, match='has 0 MiB free, less than one checkpoint'):
        loop.train_and_evaluate(tiny_config(data_dir), str(workdir))
    assert [p.name for p in workdir.iterdir()] == ['checkpoints']  # no config.json, no logs


class _ManagerOfAFailedWrite:
    """Orbax's CheckpointManager after a background write failed in two of its threads:
    waiting raises one error, closing the other (as measured on a full disk)."""

    directory = '/ckpt/checkpoints'

    def __init__(self):
        self.closed = False

    def wait_until_finished(self):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "_sharding": No space '
                         'left on device')

    def close(self):
        self.closed = True
        raise OSError(errno.ENOSPC, 'No space left on device')

    def latest_step(self):
        return 4


def test_closing_after_a_failed_write_raises_one_explained_error():
    manager = _ManagerOfAFailedWrite()
    with pytest.raises(checkpoint.CheckpointSaveError, match=re.escape(
            'A checkpoint could not be written in /ckpt/checkpoints: RESOURCE_EXHAUSTED: Error '
            'writing local file "_sharding": No space left on device. Training stopped; the '
            "newest complete checkpoint there is step 4. Make room there (or fix its "
            "permissions) and rerun the same command to resume from it. Orbax's log: "
            '/ckpt/orbax.log.')):
        checkpoint.close(manager)
    assert manager.closed
    checkpoint.close(manager, raise_errors=False)  # another error is on its way: quiet


_FULL_DISK_AT_STEP_2 = """
import atexit, errno, sys
from etils import epath
from orbax.checkpoint._src.path import async_path
from sequencer_jax import cli, main
rename = async_path.rename

async def full_disk_at_step_2(source, target):
    if epath.Path(target).name == '2':
        raise OSError(errno.ENOSPC, 'No space left on device')
    return await rename(source, target)

async_path.rename = full_disk_at_step_2
# What orbax's and tensorstore's threads print while the interpreter shuts down.
atexit.register(lambda: print('Traceback: Event loop is closed', file=sys.stderr))
cli.run(main.main)
"""


def test_the_cli_ends_a_run_whose_checkpoint_fails_with_its_message_last(data_dir, tmp_path):
    driver = tmp_path / 'full_disk.py'
    driver.write_text(_FULL_DISK_AT_STEP_2)
    tiny = [f'--config.model.args.{key}={value}' for key, value in TINY_MODEL.items()]
    run = subprocess.run(
        [sys.executable, str(driver), '--config=configs/default.py',
         f'--workdir={tmp_path / "w"}', f'--config.dataset.data_dir={data_dir}',
         '--config.num_train_steps=2', '--config.progress=lines', *tiny],
        cwd=ROOT, env=_cli_env(),
        timeout=600, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.rstrip().splitlines()[-1] == (
        f'error: A checkpoint could not be written in {tmp_path / "w"}/checkpoints: [Errno 28] '
        'No space left on device. Training stopped; no checkpoint there is complete yet. Make '
        'room there (or fix its permissions) and rerun the same command to start again. '
        f"Orbax's log: {tmp_path / 'w' / 'orbax.log'}.")
    # Orbax's report of the failure (its tracebacks) is in its log, not on the terminal;
    # nothing comes after the message, no flag help.
    assert 'Traceback' not in run.stderr and 'USAGE' not in run.stderr, run.stderr[-3000:]
    assert 'No space left on device' in (tmp_path / 'w' / 'orbax.log').read_text()


def test_metrics_that_cannot_be_written_are_reported_once_and_training_goes_on(
        data_dir, tmp_path, monkeypatch, capsys):
    if not os.path.exists('/dev/full'):
        pytest.skip('needs /dev/full, a file whose writes fail with ENOSPC')
    workdir = tmp_path / 'w'
    path_type = type(epath.Path(str(workdir)))
    open_path = path_type.open

    def full_metrics_file(self, mode='r', **kwargs):
        if self.name == reporting.METRICS_FILE and mode == 'a':
            return open('/dev/full', mode)
        return open_path(self, mode, **kwargs)

    monkeypatch.setattr(path_type, 'open', full_metrics_file)
    loop.train_and_evaluate(tiny_config(data_dir, steps=4), str(workdir))
    out = capsys.readouterr().out
    assert out.count('Warning: could not write') == 1
    assert (f'Warning: could not write the metrics of step 1 to {workdir}/metrics.jsonl '
            '([Errno 28] No space left on device). Training goes on (a checkpoint that cannot '
            'be written stops it); further failures to write there are not reported until '
            'one succeeds.') in out
    assert 'Final eval: top-1' in out
    with checkpoint.open_read_only(str(workdir)) as manager:
        assert manager.all_steps() == [2, 4]


def test_tensorboard_write_failures_are_reported_again_after_a_success(tmp_path, capsys,
                                                                       monkeypatch):
    flush = reporting.EventFileWriter.flush
    disk_full = False

    def flush_or_fail(writer):
        if disk_full:
            raise OSError(errno.ENOSPC, 'No space left on device', 'events.out.tfevents')
        flush(writer)

    monkeypatch.setattr(reporting.EventFileWriter, 'flush', flush_or_fail)
    writer = reporting.MetricWriter(epath.Path(str(tmp_path)))
    for step, disk_full in zip(range(1, 6), [True, True, False, True, False]):
        writer.write(step, {'train/loss': float(step)})
    writer.close()
    warnings = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith('Warning')]
    assert [w.split(' to ')[0] for w in warnings] == [
        'Warning: could not write the TensorBoard events of step 1',
        'Warning: could not write the TensorBoard events of step 4']
    assert (f'{tmp_path}/tensorboard ([Errno 28] No space left on device: '
            "'events.out.tfevents').") in warnings[0]
    assert losses(tmp_path) == {step: float(step) for step in range(1, 6)}
    # Each write that succeeded is in TensorBoard's events, read back as TensorBoard does.
    from tensorboard.backend.event_processing import event_accumulator
    scalars = {}
    for events in (tmp_path / 'tensorboard').iterdir():
        accumulator = event_accumulator.EventAccumulator(str(events))
        accumulator.Reload()
        if 'train/loss' in accumulator.Tags()['scalars']:
            scalars |= {e.step: e.value for e in accumulator.Scalars('train/loss')}
    assert {3: 3.0, 5: 5.0}.items() <= scalars.items()


def _traced_train_steps(logdir):
    """The number of train steps dispatched in each trace under ``logdir`` (the nested
    events of one dispatch count once), and whether any trace holds Python calls."""
    counts, python_calls = [], False
    for path in sorted(pathlib.Path(logdir).glob('plugins/profile/*/*.xplane.pb')):
        host = jax.profiler.ProfileData.from_file(str(path)).find_plane_with_name('/host:CPU')
        events = [e for line in host.lines for e in line.events]
        python_calls |= any(e.name.startswith('$') for e in events)  # the Python tracer's
        spans = sorted((e.start_ns, e.end_ns) for e in events
                       if e.name == 'PjitFunction(train_step)')
        count, end = 0, -math.inf
        for start, stop in spans:
            count, end = (count + 1, stop) if start >= end else (count, end)
        counts.append(count)
    return counts, python_calls


@pytest.mark.slow  # 170 s: three runs, two traced
def test_a_profile_traces_the_chosen_steps_and_never_stops_training(data_dir, tmp_path,
                                                                    capsys, monkeypatch):
    workdir = tmp_path / 'w'
    config = tiny_config(data_dir, steps=6, **{'profile.start_step': 2, 'profile.num_steps': 3})
    loop.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert f'Profiling steps 3-5 into {workdir}/tensorboard' in out
    assert f'Profile written to {workdir}/tensorboard/plugins/profile' in out
    assert _traced_train_steps(workdir / 'tensorboard') == ([3], False)
    # Resumed past the window: no second trace.
    loop.train_and_evaluate(tiny_config(data_dir, steps=8, **{'profile.start_step': 2}),
                            str(workdir))
    assert ('Not profiling: config.profile.start_step=2 is outside the steps this run trains '
            '(6-8).') in capsys.readouterr().out
    assert _traced_train_steps(workdir / 'tensorboard') == ([3], False)

    def profiler_busy(logdir, **options):
        raise RuntimeError('Profile has already been started.')

    monkeypatch.setattr(jax.profiler, 'start_trace', profiler_busy)
    other = tmp_path / 'other'
    loop.train_and_evaluate(tiny_config(data_dir, steps=4, **{'profile.start_step': 0}),
                            str(other))
    assert (f'Warning: the JAX profiler could not start the trace in {other}/tensorboard '
            '(RuntimeError: Profile has already been started.); training goes on without '
            'it.') in capsys.readouterr().out
    assert max(losses(other)) == 4


def test_out_of_memory_errors_say_what_to_change():
    def failing_step(error):
        def step(*args):
            raise error
        return step

    out_of_memory = jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory')
    with pytest.raises(loop.TrainingStopped, match='Out of memory in the train step. Lower '
                       'config.batch_size, set config.model.args.remat=True') as explained:
        loop._run(failing_step(out_of_memory), None, None, None)
    assert explained.value.__cause__ is out_of_memory
    other = jax.errors.JaxRuntimeError('INTERNAL: something else')
    with pytest.raises(jax.errors.JaxRuntimeError, match='something else'):
        loop._run(failing_step(other), None, None, None)


@pytest.mark.slow
def test_input_wait_is_the_share_of_time_spent_waiting_for_batches(data_dir, tmp_path,
                                                                    monkeypatch):
    def input_waits(workdir):
        lines = (workdir / 'metrics.jsonl').read_text().splitlines()
        return [r['train/input_wait'] for r in map(json.loads, lines)][1:]  # 1: compiles

    config = tiny_config(data_dir, checkpoint_every_steps=1000)  # no saves in the windows
    loop.train_and_evaluate(config, str(tmp_path / 'fast'))
    next_batch = pipeline.GlobalBatches.__next__

    def slow_input(self):  # long beside a step's compute, however loaded the machine
        time.sleep(2.0)
        return next_batch(self)

    monkeypatch.setattr(pipeline.GlobalBatches, '__next__', slow_input)
    loop.train_and_evaluate(config, str(tmp_path / 'slow'))
    assert all(0 <= wait < 0.5 for wait in input_waits(tmp_path / 'fast'))
    assert all(0.7 < wait <= 1 for wait in input_waits(tmp_path / 'slow'))


def test_default_main_job_learns_the_digits(data_dir, tmp_path):
    config = load_config('default.py')
    config.dataset.data_dir = data_dir
    config.num_epochs = 8
    config.progress = 'lines'
    config.lock()
    metrics = loop.train_and_evaluate(config, str(tmp_path))
    history = losses(tmp_path)
    assert history[max(history)] < 0.5 * history[min(history)]
    assert metrics['eval/top1'] > 0.8  # chance is 0.1


def test_config_changes_name_every_changed_added_and_dropped_key():
    saved = json.loads(load_config('default.py').to_json_best_effort())
    saved['old_key'] = 1
    del saved['model']['args']['remat']  # None in config: the default either way
    config = load_config('default.py', 'mesh=fsdp')
    config.batch_size = 32
    assert config_defaults.config_changes(saved, config) == [
        'batch_size: 64 -> 32', 'mesh: [["data", -1], ["fsdp", 1]] -> [["data", 1], '
        '["fsdp", -1]]', 'old_key: 1 -> unset']
    del saved['old_key']
    assert config_defaults.config_changes(saved, load_config('default.py')) == []


@pytest.mark.parametrize('filename, arg', [('default.py', None),
                                           ('imagenet.py', 'model=sequencer2d_l,mesh=fsdp'),
                                           ('finetune.py', 'task=oxford_flowers102')])
def test_saved_config_is_the_config_that_was_saved(filename, arg, tmp_path):
    config = load_config(filename, arg)
    (tmp_path / 'config.json').write_text(config.to_json_best_effort(indent=1))
    saved = load_config('workdir.py', f'dir={tmp_path}')
    assert saved.to_dict() == config.to_dict()  # tuples stay tuples, None stays None
    # Every key can still be set from the command line, None-valued ones included.
    from absl import flags
    from ml_collections import config_flags
    argv = ['prog', f'--config={ROOT}/configs/workdir.py:dir={tmp_path}', '--config.ema_decay=0.99',
            '--config.num_train_steps=7', "--config.mesh=(('data', 2), ('fsdp', 4))",
            '--config.model.args.remat=true']
    holder = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=holder, lock_config=True,
                                    sys_argv=argv)
    holder(argv)
    overridden = holder.config
    assert (overridden.ema_decay, overridden.num_train_steps) == (0.99, 7)
    assert overridden.mesh == (('data', 2), ('fsdp', 4)) and overridden.model.args.remat


def test_saved_config_errors_say_what_to_give(tmp_path):
    variant = f'dir={tmp_path}'
    with pytest.raises(ValueError, match=f'{tmp_path} has no config.json .* give the '
                                         'directory of a training run, or the config file'):
        load_config('workdir.py', variant)
    for bad in (None, str(tmp_path), 'dir='):
        with pytest.raises(ValueError, match=re.escape(
                f'Bad config variant {bad!r}: configs/workdir.py needs the workdir of a '
                'training run, --config=configs/workdir.py:dir=DIR.')):
            load_config('workdir.py', bad)
    (tmp_path / 'config.json').write_text('{"batch_size": 8, "crop_pct": "wide"')
    with pytest.raises(ValueError, match='config.json is not valid JSON'):
        load_config('workdir.py', variant)
    (tmp_path / 'config.json').write_text('{"optimizer": {"b1": "high"}}')
    with pytest.raises(ValueError, match="config.json: optimizer.b1='high' does not fit"):
        load_config('workdir.py', variant)
    # Unreadable (as a bucket without credentials would be): named, with what to give.
    (tmp_path / 'config.json').unlink()
    (tmp_path / 'config.json').mkdir()
    with pytest.raises(ValueError, match=re.escape(
            f'Cannot read {tmp_path}/config.json (IsADirectoryError: ') + r'.*\); check that '
            r'it is a readable file \(for gs://: your credentials and network\), or give the '
            r'config file instead'):
        load_config('workdir.py', variant)


def test_grad_accumulation_trains_and_must_split_each_devices_share(data_dir, tmp_path):
    # 32 images, 4 per device (data and fsdp both split the batch): 4 micro-batches.
    config = tiny_config(data_dir, steps=2, batch_size=32, grad_accum_steps=4,
                         mesh=[('data', 2), ('fsdp', 4)])
    metrics = loop.train_and_evaluate(config, str(tmp_path / 'run'))
    assert sorted(losses(tmp_path / 'run')) == [1, 2] and 0 <= metrics['eval/top1'] <= 1
    on_8 = tiny_config(data_dir, steps=2, grad_accum_steps=3, mesh=[('data', 8), ('fsdp', 1)])
    with pytest.raises(ValueError, match=re.escape(
            "config.grad_accum_steps=3 must divide each device's share of the batch, 16 / 8 "
            'batch shards = 2 images; use one of [1, 2], or a config.batch_size that 3 x 8 '
            'divides.')):
        loop.train_and_evaluate(on_8, str(tmp_path / 'refused'))
    assert not (tmp_path / 'refused').exists()


def test_config_variants_and_errors():
    config = load_config('imagenet.py', 'model=sequencer2d_l,mesh=4x2,dtype=bfloat16,'
                                         'remat=true,recurrence=pallas')
    assert (config.model.name, config.model.args.drop_path_rate) == ('sequencer2d_l', 0.4)
    assert config.mesh == (('data', 4), ('fsdp', 2)) and config.compute_dtype == 'bfloat16'
    assert (config.model.args.remat, config.model.args.recurrence) == (True, 'pallas')
    assert load_config('imagenet.py').model.args.remat is None  # the variant's (False)
    assert load_config('finetune.py', 'remat=false').model.args.remat is False
    finetune = load_config('finetune.py', 'task=imagenet392')
    assert (finetune.image_size, finetune.crop_pct, finetune.optimizer.base_lr) == (392, 1.0, 5e-5)
    flowers = load_config('finetune.py', 'task=oxford_flowers102')
    assert flowers.dataset.train_split == 'train+validation'
    with pytest.raises(ValueError, match="Bad config variant 'modle=x'"):
        load_config('imagenet.py', 'modle=x')
    with pytest.raises(ValueError, match='Unknown mesh'):
        load_config('imagenet.py', 'mesh=huge')
    with pytest.raises(ValueError, match="Bad remat 'yes': use remat=true or remat=false"):
        load_config('imagenet.py', 'remat=yes')
    with pytest.raises(ValueError, match="Unknown recurrence 'cudnn'"):
        load_config('imagenet.py', 'recurrence=cudnn')
    with pytest.raises(ValueError, match='Unknown fine-tuning task'):
        load_config('finetune.py', 'task=mnist')
    locked = config_defaults.base_config()
    locked.lock()
    with pytest.raises(AttributeError):
        locked.batchsize = 3


def test_out_of_range_numbers_stop_training_and_evaluation_before_any_work(tmp_path):
    for filename, arg in [('default.py', None), ('imagenet.py', 'model=sequencer2d_l'),
                          ('finetune.py', 'task=oxford_flowers102')]:
        config_defaults.validate(load_config(filename, arg), training=False)
    finetune = load_config('finetune.py', 'task=cifar10')
    with pytest.raises(ValueError, match=re.escape(
            'Bad config: config.init_from is not set, and this config fine-tunes trained '
            'weights: give --config.init_from=DIR')):
        config_defaults.validate(finetune)
    finetune.init_from = str(tmp_path)
    config_defaults.validate(finetune)
    config_defaults.validate(load_config('imagenet.py'))  # trains from scratch
    config = tiny_config(str(tmp_path), batch_size=0, num_train_steps=-1,
                         **{'optimizer.b2': 1.0, 'optimizer.grad_clip_norm': 0.0})
    message = ('Bad config: config.batch_size=0 must be at least 1; config.num_train_steps=-1 '
               'must be at least 1 (or None: from num_epochs); config.optimizer.b2=1.0 must '
               'be in [0, 1); config.optimizer.grad_clip_norm=0.0 must be positive')
    workdir = tmp_path / 'work'
    with pytest.raises(ValueError, match=re.escape(message)):
        loop.train_and_evaluate(config, str(workdir))
    for overrides, error in [({'model.name': 'sequencer2d_xl'}, "Unknown model 'sequencer2d_xl'"),
                             ({'compute_dtype': 'float16'}, 'config.compute_dtype must be one'),
                             ({'model.args': {'layers': (1, 2)}}, 'layers, patch_sizes'),
                             ({'best_metric': 'eval/acc'}, "config.best_metric='eval/acc' must "
                              "be one of \\['eval/top1'"),
                             ({'best_metric': 'eval_ema/top1'}, 'needs EMA weights'),
                             ({'eval_image_size': 7}, 'the smallest size that works is 8x8'),
                             ({'profile.num_steps': 0},
                              'config.profile.num_steps=0 must be at least 1')]:
        with pytest.raises(ValueError, match=error):
            loop.train_and_evaluate(tiny_config(str(tmp_path), **overrides), str(workdir))
    assert not workdir.exists()
    from sequencer_jax import evaluate
    for kwargs, error in [({'config': config}, 'Bad config: config.batch_size=0'),
                          ({'config': tiny_config(str(tmp_path)), 'crop_pct': 1.5},
                           r'--crop_pct=1.5 must be in \(0, 1\]'),
                          ({'config': tiny_config(str(tmp_path)), 'resolutions': [32, 0]},
                           r'--resolutions must be positive image sizes, got \[0\]')]:
        with pytest.raises(ValueError, match=error):
            evaluate.evaluate_checkpoint(**{'checkpoint_dir': str(workdir),
                                            'resolutions': [32], **kwargs})


def _cli_env(**extra):
    """The environment of a CLI run from this checkout, with ``extra`` variables."""
    return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2', **extra)


def _cli(args, timeout=600):
    return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=_cli_env(),
                          timeout=timeout, capture_output=True, text=True)


def test_a_missing_train_split_stops_before_the_workdir_gets_anything(data_dir, tmp_path):
    workdir = tmp_path / 'work'
    config = tiny_config(data_dir, **{'dataset.train_split': 'trian'})
    with pytest.raises(ValueError, match=re.escape(
            "sklearn_digits has no examples in the train split 'trian'; it has ['test', "
            "'train']. Set config.dataset.train_split.")):
        loop.train_and_evaluate(config, str(workdir))
    assert list(workdir.iterdir()) == []  # no checkpoints/, config.json or logs


@pytest.mark.slow  # 240 s: six CLI processes
def test_mini_imagenet_trains_and_evaluates_through_the_clis(tmp_path):
    mini_imagenet.write_mini_imagenet(str(tmp_path / 'tfds' / 'downloads' / 'manual'),
                                      per_class=6)
    workdir = tmp_path / 'work'
    common = [f'--config.dataset.data_dir={tmp_path / "tfds"}', '--config.image_size=28',
              '--config.batch_size=8', '--config.eval_batch_size=8']
    run = _cli(['sequencer_jax.main', '--config=configs/imagenet.py:model=sequencer2d_s',
                f'--workdir={workdir}', '--config.num_train_steps=2',
                '--config.log_every_steps=1', '--config.checkpoint_every_steps=2',
                '--config.progress=lines', *common])
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Final eval: top-1' in run.stdout
    assert sorted(losses(workdir)) == [1, 2]
    # Orbax's INFO lines (dozens per save) stay hidden without --verbosity.
    assert 'checkpoint_manager.py' not in run.stderr, run.stderr[-3000:]
    out = tmp_path / 'eval.json'
    evaluation = _cli(['sequencer_jax.evaluate', '--config=configs/imagenet.py',
                       f'--checkpoint={workdir}', '--resolutions=28,42',
                       f'--output_json={out}', *common])
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert [r['resolution'] for r in rows] == [28, 42]
    assert all(r['examples'] == 6 and 0 <= r['top1'] <= 1 for r in rows)
    for cli, flag in [('main', f'--workdir={workdir}'), ('evaluate', f'--checkpoint={workdir}')]:
        bad = _cli([f'sequencer_jax.{cli}', '--config=configs/imagenet.py', flag,
                    '--config.optimizer.base_lrr=1', '--config.no_such_key=1'])
        assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr[-3000:]
        assert ("--config.optimizer.base_lrr: the config has no key 'optimizer.base_lrr' "
                '(did you mean optimizer.base_lr') in bad.stderr
        assert "--config.no_such_key: the config has no key 'no_such_key'" in bad.stderr
        # A bad value: its message alone, not after the module's flag help.
        bad = _cli([f'sequencer_jax.{cli}', '--config=configs/imagenet.py', flag,
                    '--config.batch_size=0'])
        assert bad.returncode == 1 and bad.stderr.rstrip().splitlines()[-1] == (
            'error: Bad config: config.batch_size=0 must be at least 1.'), bad.stderr[-3000:]
        assert 'flags:' not in bad.stderr and 'Traceback' not in bad.stderr


def test_workdirs_in_buckets_stay_urls_and_bad_local_ones_are_refused(tmp_path, monkeypatch):
    from sequencer_jax import storage
    bucket = storage.resolve('gs://bucket/run')  # os.path.abspath made it ./gs:/bucket/run
    assert str(bucket / 'checkpoints') == 'gs://bucket/run/checkpoints'
    assert storage.is_bucket(bucket) and not storage.is_bucket(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert str(storage.resolve('run')) == str(tmp_path / 'run')
    assert str(storage.resolve('~/run')) == str(tmp_path / 'home' / 'run')
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(ValueError, match='Cannot create the workdir .*a_file/run'):
        loop.train_and_evaluate(tiny_config(str(tmp_path)), str(tmp_path / 'a_file' / 'run'))


def test_explicit_multi_process_flags_are_checked_before_connecting():
    from sequencer_jax import main
    with pytest.raises(UserError, match='go together'):
        main.initialize_distributed('localhost:1234', None, 0)
    with pytest.raises(UserError, match='--process_id=2 must be below --num_processes=2'):
        main.initialize_distributed('localhost:1234', 2, 2)


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _two_processes(workdir, data_dir, timeout=600):
    """Runs the training CLI as two processes of one job (2 CPU devices each); their
    (returncode, stdout, stderr)."""
    args = ['sequencer_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
            f'--coordinator_address=localhost:{_free_port()}', '--num_processes=2',
            '--config.num_train_steps=4', '--config.log_every_steps=2',
            '--config.checkpoint_every_steps=2', '--config.eval_every_steps=4',
            f'--config.dataset.data_dir={data_dir}', '--config.progress=lines']
    env = _cli_env(XLA_FLAGS='--xla_force_host_platform_device_count=2')
    procs = [subprocess.Popen([sys.executable, '-m', *args, f'--process_id={i}'], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_processes_train_together_and_log_once(tmp_path):
    workdir = tmp_path / 'work'
    # Not prepared yet: both processes read it, one writes it.
    results = _two_processes(workdir, tmp_path / 'tfds')
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    (_, first, _), (_, second, _) = results
    assert "mesh {'data': 4, 'fsdp': 1}" in first
    assert 'Preparing TFDS dataset sklearn_digits' in first and 'Preparing' not in second
    assert 'Final eval' in first and 'Final eval' not in second
    assert sorted(losses(workdir)) == [2, 4]  # one metrics.jsonl, written once per step
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_when_process_0_cannot_prepare_the_dataset_the_others_stop_too(tmp_path):
    """They used to wait for it in a barrier until jax.distributed noticed its exit."""
    (tmp_path / 'a_file').write_text('')
    results = _two_processes(tmp_path / 'work', tmp_path / 'a_file' / 'tfds', timeout=300)
    assert [returncode for returncode, _, _ in results] == [1, 1], results[1][2][-3000:]
    assert 'Cannot create the TFDS data_dir' in results[0][2], results[0][2][-3000:]
    assert ('Process 0 could not prepare TFDS dataset sklearn_digits (its output says '
            'why); fix that and rerun every process.') in results[1][2], results[1][2][-3000:]
    assert 'Traceback' not in results[0][2] + results[1][2]
    assert not (tmp_path / 'work' / 'checkpoints').exists()
