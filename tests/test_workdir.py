"""A workdir one run owns (its lease), checkpoints that prove their integrity, and
processes that stop with our message when a peer dies."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sequencer_jax.train import checkpoint, lease as lease_lib, loop
from test_train import ROOT, _cli_env, _free_port, losses, tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


def _dead_pid():
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def _lease_of_another_run(workdir, age_s, job=None, host='node7', pid=4242):
    workdir.mkdir(parents=True, exist_ok=True)
    owner = {'run': 'other', 'host': host, 'pid': pid, 'job': job,
             'started': time.time() - 3600, 'renewed': time.time() - age_s, 'processes': 1}
    (workdir / lease_lib.LEASE_FILE).write_text(json.dumps(owner))


def test_a_second_trainer_on_a_live_workdir_refuses_and_touches_nothing(data_dir, tmp_path):
    workdir = tmp_path / 'run'
    loop.train_and_evaluate(tiny_config(data_dir, steps=2), str(workdir))
    assert not (workdir / lease_lib.LEASE_FILE).exists()  # released at the end
    before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
    with lease_lib.Lease(workdir):  # the first run, still training
        message = (r'^The workdir \S+/run is in use by another run: host \S+ \(pid '
                   rf'{os.getpid()}\), started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, its lease '
                   r'renewed \d+ s ago\. Wait for it to end, train in another --workdir, or, '
                   r'if it is surely gone \(its host lost\), take the workdir over with '
                   r'--force_takeover \(a lease not renewed for 120 s is taken over by '
                   r'itself\)\.$')
        with pytest.raises(lease_lib.WorkdirInUse, match=message):
            loop.train_and_evaluate(tiny_config(data_dir, steps=4), str(workdir))
        after = {p: p.read_bytes() for p in workdir.rglob('*')
                 if p.is_file() and p.name != lease_lib.LEASE_FILE}
    assert after == before  # metrics.jsonl, checkpoints and config.json untouched


_ENTER_THE_LEASE = """
import sys, jax
from etils import epath
from sequencer_jax.train import lease
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
try:
    with lease.Lease(epath.Path(sys.argv[3])):
        print('entered')
except Exception as e:
    print(f'{type(e).__name__}: {e}')
"""


@pytest.mark.parametrize('in_use', [True, False])
def test_every_process_of_a_job_stops_when_process_0_cannot_take_the_workdir(tmp_path,
                                                                              in_use):
    """Process 0 claims the lease and the others learn in a collective that it could
    not: because another run holds it, or because writing the lease failed (lease.json a
    directory), which used to leave them waiting for process 0."""
    workdir = tmp_path / 'run'
    if in_use:
        _lease_of_another_run(workdir, age_s=5)
    else:
        (workdir / lease_lib.LEASE_FILE / 'x').mkdir(parents=True)
    coordinator = f'localhost:{_free_port()}'
    procs = [subprocess.Popen([sys.executable, '-c', _ENTER_THE_LEASE, coordinator, str(i),
                               str(workdir)], cwd=ROOT, env=_cli_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    try:
        (first, err), (second, _) = [p.communicate(timeout=120) for p in procs]
    finally:  # a process left waiting in the collective must not outlive the test
        for p in procs:
            p.kill()
    # The last line: Gloo (CPU collectives) prints to stdout before.
    first, second = first.splitlines()[-1], second.splitlines()[-1]
    if in_use:
        assert first.startswith('WorkdirInUse: The workdir ') and 'host node7' in first, err
    else:
        assert first.startswith(('IsADirectoryError', 'OSError')), err[-2000:]
    assert second == ('UserError: Process 0 could not take the workdir (its output says '
                      'why, e.g. the run that holds it); this process stops too.')


@pytest.mark.parametrize('age_s, job, here, said', [
    (lease_lib.STALE_AFTER_S + 5, None, False, r'stopped renewing its lease 1\d\d s ago'),
    pytest.param(5, '77', False, None, marks=pytest.mark.slow),  # same SLURM job
    pytest.param(5, None, True, None, marks=pytest.mark.slow)])  # gone: killed, rerun
def test_a_stale_lease_or_one_of_the_same_job_is_taken_over(data_dir, tmp_path, capsys,
                                                            monkeypatch, age_s, job, here, said):
    monkeypatch.setenv('SLURM_JOB_ID', '77')
    workdir = tmp_path / 'run'
    owner = dict(host=socket.gethostname(), pid=_dead_pid()) if here else {}
    _lease_of_another_run(workdir, age_s, job, **owner)
    loop.train_and_evaluate(tiny_config(data_dir, steps=2), str(workdir))
    out = capsys.readouterr().out
    if said:
        assert re.search(rf'Warning: taking the workdir over from a run that {said} \(host '
                         r'node7 \(pid 4242\), started', out), out
    else:
        assert 'taking the workdir over' not in out
    assert max(losses(workdir)) == 2


def test_force_takeover_stops_the_live_owner_at_its_next_renewal(tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(lease_lib, 'RENEW_EVERY_S', 0.2)
    workdir = tmp_path / 'run'
    workdir.mkdir()
    with lease_lib.Lease(workdir) as first:
        with lease_lib.Lease(workdir, force_takeover=True):
            assert 'Warning: taking the workdir over from a live run (host' in \
                capsys.readouterr().out
            assert first.taken_over is not None and f'(pid {os.getpid()})' in first.taken_over
        # The first run must not delete the lease it lost.
        assert not (workdir / lease_lib.LEASE_FILE).exists()


def test_a_run_without_progress_for_hang_timeout_stops_with_every_threads_stack(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lease_lib, 'RENEW_EVERY_S', 0.1)
    exits = []
    with lease_lib.Lease(tmp_path, hang_timeout_s=0.5, exit=exits.append) as lease:
        for _ in range(5):  # progress keeps it alive
            time.sleep(0.2)
            lease.progressed()
        assert exits == []
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits == [1]
    stacks = (tmp_path / 'hang-process0.txt').read_text()
    assert 'Thread' in stacks and 'test_workdir.py' in stacks  # this test's own frame
    assert re.search(r'error: No train step or eval batch finished for \d+ s \(config.'
                     r'hang_timeout_s=0.5\): the run is hung\. Every thread\'s stack is in '
                     r'\S+/hang-process0\.txt\. Rerun it with the same command',
                     capsys.readouterr().err)


class _TakenOverAfter(lease_lib.Lease):
    """A lease that another run takes over after the second step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._checks = 0

    @property
    def taken_over(self):
        self._checks += 1
        return 'host node7 (pid 4242)' if self._checks > 2 else None

    @taken_over.setter
    def taken_over(self, value):
        pass


def test_a_run_whose_workdir_was_taken_over_stops_without_saving(data_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(lease_lib, 'Lease', _TakenOverAfter)
    workdir = tmp_path / 'run'
    with pytest.raises(loop.TrainingStopped, match=re.escape(
            'Another run took this workdir over (host node7 (pid 4242)). This run stops at '
            'step 3 without saving, so as not to overwrite its checkpoints.')):
        loop.train_and_evaluate(tiny_config(data_dir, steps=6), str(workdir))
    with checkpoint.open_read_only(workdir) as manager:
        assert manager.all_steps() == [2]


def test_checksums_name_every_array_agree_across_meshes_and_see_any_change():
    x = jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6) / 7
    tree = {'a': x, 'b': {'c': jnp.ones((3,), jnp.bfloat16), 'n': jnp.int32(5)}}
    sums = checkpoint.array_checksums(tree)
    assert sorted(sums) == ['a', 'b/c', 'b/n']
    assert sums['a'][0] == 'float32' and sums['b/c'][0] == 'bfloat16'
    mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
    sharded = dict(tree, a=jax.device_put(x, NamedSharding(mesh, P('data', 'fsdp'))))
    assert checkpoint.array_checksums(sharded) == sums
    for changed in (x.at[5, 3].add(1e-6), x.at[jnp.array([1, 2])].set(x[jnp.array([2, 1])]),
                    x.reshape(6, 64).T * 1.0):
        assert checkpoint.array_checksums(dict(tree, a=changed))['a'] != sums['a']
    assert checkpoint.checksum_mismatch(dict(tree, a=x.at[0, 0].set(1e38)), sums) == 'a'
    assert checkpoint.checksum_mismatch(tree, sums) is None
    assert checkpoint.checksum_mismatch(tree, None) is None  # written before checksums


_RESTORE_LATEST = """
import sys
import jax, jax.numpy as jnp
from sequencer_jax.train import checkpoint
manager = checkpoint.make_manager(sys.argv[1], 3, None)
target = {'nu': jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
          'count': jax.ShapeDtypeStruct((), jnp.int32)}
state, meta = checkpoint.restore_latest(manager, target)
print('restored step', meta['step'], 'max', float(jnp.max(state['nu'])))
checkpoint.close(manager)
"""


def test_a_checkpoint_with_flipped_bytes_inside_a_data_file_falls_back_naming_the_array(
        tmp_path):
    """Large arrays lie in OCDBT data files that nothing checks: 400 bytes XOR-ed there
    (size unchanged) restored as moments of 1e38. Restored in a new process, as after a
    crash (tensorstore would serve this process's own writes from its cache)."""
    manager = checkpoint.make_manager(tmp_path, 3, None)
    for step in (1, 2):
        state = {'nu': jax.random.uniform(jax.random.PRNGKey(step), (1024, 1024)),
                 'count': jnp.int32(step)}
        checkpoint.save(manager, step, state, {'step': step})
    checkpoint.close(manager)
    data_files = (tmp_path / 'checkpoints' / '2' / 'state').rglob('d/*')
    largest = max(data_files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 400):
        data[i] ^= 0x5A
    largest.write_bytes(bytes(data))
    run = subprocess.run([sys.executable, '-c', _RESTORE_LATEST, str(tmp_path)], cwd=ROOT,
                         env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r'WARNING: the checkpoint at step 2 \(\S+/checkpoints/2\) is unreadable: '
                     r'its array nu does not match the checksum saved with it\. Moved aside to '
                     r'\S+/checkpoints_unreadable/2_\d+; falling back to the previous one\.',
                     run.stdout), run.stdout
    assert 'restored step 1 max 0.99' in run.stdout


def _two_processes(workdir, data_dir, steps, kill_step=None, timeout=900):
    """The training CLI as two processes of one job (2 CPU devices each). With
    ``kill_step``, process 1 is killed (SIGKILL) once it has logged that step; returns
    each process's (returncode, stdout, stderr) and the seconds from the kill to the end
    of process 0."""
    args = ['sequencer_jax.main', '--config=configs/default.py', f'--workdir={workdir}',
            f'--coordinator_address=localhost:{_free_port()}', '--num_processes=2',
            f'--config.num_train_steps={steps}', '--config.log_every_steps=1',
            '--config.checkpoint_every_steps=2', f'--config.eval_every_steps={steps}',
            f'--config.dataset.data_dir={data_dir}', '--config.progress=lines']
    env = _cli_env(XLA_FLAGS='--xla_force_host_platform_device_count=2')
    procs = [subprocess.Popen([sys.executable, '-m', *args, f'--process_id={i}'], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    since_kill = None
    if kill_step is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not any(
                r.get('step', 0) >= kill_step for r in _records(workdir)):
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=timeout)
        since_kill = time.monotonic() - killed
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)], since_kill


def _records(workdir):
    path = pathlib.Path(workdir) / 'metrics.jsonl'
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith('}')]


@pytest.mark.slow
def test_when_a_process_dies_the_other_stops_with_our_message_and_both_resume(data_dir,
                                                                               tmp_path):
    straight, _ = _two_processes(tmp_path / 'straight', data_dir, steps=8)
    assert [r for r, _, _ in straight] == [0, 0], straight[0][2][-3000:]
    workdir = tmp_path / 'killed'
    results, since_kill = _two_processes(workdir, data_dir, steps=8, kill_step=3)
    (code, _, err), _ = results
    # Silent for PEER_TIMEOUT_S, noticed at the next check, then 2 renewals for the others.
    bound = lease_lib.PEER_TIMEOUT_S + 3 * lease_lib.RENEW_EVERY_S
    assert code == 1 and since_kill < bound + 5, (since_kill, err[-3000:])
    assert re.search(r'error: Process 1 of 2 \(host \S+, pid \d+\) has not been heard from for '
                     r'\d+ s: it died or lost its host\. Process 0 stops too\. Rerun every '
                     r'process with the same command to resume from the newest checkpoint\.',
                     err), err[-3000:]
    assert 'Fatal Python error' not in err
    # Process 0 released the lease as it stopped: the rerun starts at once.
    rerun, _ = _two_processes(workdir, data_dir, steps=8)
    assert [r for r, _, _ in rerun] == [0, 0], rerun[0][2][-3000:]
    assert 'Resuming from step 2' in rerun[0][1]
    # Every logged value but the timings, the final evaluation (of the final weights)
    # included, equals the uninterrupted run's.
    untimed = lambda w: [{k: v for k, v in r.items() if k not in (  # noqa: E731
        'train/images_per_s', 'train/input_wait')} for r in _records(w)]
    assert untimed(workdir) == untimed(tmp_path / 'straight')
    assert 'eval/loss' in untimed(workdir)[-1]
