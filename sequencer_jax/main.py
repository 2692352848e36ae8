"""Training CLI.

    python -m sequencer_jax.main --config=configs/default.py --workdir=/tmp/sequencer
    python -m sequencer_jax.main --config=configs/imagenet.py:model=sequencer2d_l,mesh=fsdp \
        --workdir=gs://bucket/run --config.batch_size=2048

Rerunning the same command resumes from the newest checkpoint in the workdir; so does
``--workdir`` alone (the run's saved config, ``configs/workdir.py``). On TPU
pods and SLURM clusters ``jax.distributed`` is initialised automatically; elsewhere pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` to every process.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from sequencer_jax import cli, host_memory

_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints and logs')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes',
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'index of this process',
                                   lower_bound=0)


def _cluster_detected() -> bool:
    """True on a multi-process SLURM job or a multi-host TPU slice."""
    slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
    tpu_pod = len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
    return slurm or tpu_pod


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Starts jax.distributed when this is one process of several."""
    import jax
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError('--coordinator_address, --num_processes and --process_id '
                                 'go together.')
        if process_id >= num_processes:
            raise app.UsageError(f'--process_id={process_id} must be below '
                                 f'--num_processes={num_processes} (ids count from 0).')
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def main(argv) -> None:
    cli.check_args(argv, workdir=_WORKDIR)
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = cli.config_or_saved(_WORKDIR, 'the config of a new run, e.g. '
                                 '--config=configs/default.py')
    from sequencer_jax.train import checkpoint, loop
    try:
        with cli.stop_with_message(ValueError, loop.TrainingStopped):
            loop.train_and_evaluate(config, _WORKDIR.value)
    except checkpoint.CheckpointSaveError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        # The failed write's threads print hundreds of tensorstore "Event loop is closed"
        # tracebacks while the interpreter shuts down, which would bury the message; nothing
        # is left to write (metrics and checkpoints are closed).
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # fd 2: Python and C++ threads write there
        raise SystemExit(1) from None


if __name__ == '__main__':
    host_memory.rerun_with_huge_pages()
    app.run(main, flags_parser=cli.parse_flags)
