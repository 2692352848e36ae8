"""Training CLI.

    python -m sequencer_jax.main --config=configs/default.py --workdir=/tmp/sequencer
    python -m sequencer_jax.main --config=configs/imagenet.py:model=sequencer2d_l,mesh=fsdp \
        --workdir=gs://bucket/run --config.batch_size=2048

Rerunning the same command resumes from the newest checkpoint in the workdir; so does
``--workdir`` alone (the run's saved config, ``configs/workdir.py``). On TPU
pods and SLURM clusters ``jax.distributed`` is initialised automatically; elsewhere pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` to every process.

Exit status: 0 when the run finished, 1 after an error (its message is the last line),
75 when SIGTERM or Ctrl-C stopped it after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from sequencer_jax import cli
from sequencer_jax.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints and logs')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes',
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'index of this process',
                                   lower_bound=0)
_FORCE_TAKEOVER = flags.DEFINE_bool(
    'force_takeover', False, "train in a workdir that another live run holds (its lease "
    "names it): that run stops without saving. Not saved with the run's config")
flags.declare_key_flag('config')


def _cluster_detected() -> bool:
    """True on a multi-process SLURM job or a multi-host TPU slice."""
    slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
    tpu_pod = len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
    return slurm or tpu_pod


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Starts jax.distributed when this is one process of several."""
    import jax  # after the flags: --help and flag errors need no JAX
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError('--coordinator_address, --num_processes and --process_id go '
                            'together.')
        if process_id >= num_processes:
            raise UserError(f'--process_id={process_id} must be below '
                            f'--num_processes={num_processes} (ids count from 0).')
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def main(argv) -> None:
    del argv
    cli.require(_WORKDIR)
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = cli.config_or_saved(_WORKDIR, 'the config of a new run, e.g. '
                                 '--config=configs/default.py')
    from sequencer_jax.train import loop  # TensorFlow and orbax: after the flags
    try:
        loop.train_and_evaluate(config, _WORKDIR.value, force_takeover=_FORCE_TAKEOVER.value)
    except loop.Interrupted as stop:
        print(stop, flush=True)
        sys.exit(loop.EXIT_INTERRUPTED)


if __name__ == '__main__':
    cli.run(main, huge_pages=True)
