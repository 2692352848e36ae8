"""Checkpoints with orbax: periodic/final saves, keep-last-N plus best-by-metric, and
restore into an abstract sharded target (so a run can resume on another mesh).

Each checkpoint holds the full TrainState (params, optimizer state, EMA, step) and a
JSON ``meta`` item: how many examples each process has read (the data iterator's
position), the global batch size, and the metrics of that step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy_lib

from sequencer_jax import storage

CHECKPOINT_DIR = 'checkpoints'


def make_manager(workdir: str | epath.Path, keep: int, best_metric: str | None
                 ) -> ocp.CheckpointManager:
    """A manager of ``<workdir>/checkpoints`` (local or ``gs://``) keeping the last ``keep``
    checkpoints and the best one by ``best_metric`` (the lowest for a loss, else the
    highest)."""
    policies = [policy_lib.LatestN(keep)]
    if best_metric:
        policies.append(policy_lib.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric], n=1,
            reverse=best_metric.endswith('loss'), keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy_lib.AnyPreservationPolicy(policies), create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(storage.resolve(workdir) / CHECKPOINT_DIR, options=options,
                                 item_names=('state', 'meta'))


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


def open_read_only(workdir: str | epath.Path) -> ocp.CheckpointManager | None:
    """A read-only manager of ``<workdir>/checkpoints``, or None when it holds no
    checkpoint. Nothing is created or cleaned up there: the workdir may be another run's,
    still training (a writing manager would delete its unfinished checkpoint)."""
    directory = storage.resolve(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(create=False, read_only=True,
                                           save_interval_steps=0,
                                           cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
    # Orbax warns 'Given directory is read only' for every read-only manager: that is
    # what was asked for, and the line alarmed users of evaluate and init_from.
    absl_logger = logging.getLogger('absl')
    absl_logger.addFilter(_not_read_only_notice)
    try:
        manager = ocp.CheckpointManager(directory, options=options,
                                        item_names=('state', 'meta'))
    finally:
        absl_logger.removeFilter(_not_read_only_notice)
    if manager.latest_step() is None:
        manager.close()
        return None
    return manager


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: dict[str, float] | None = None) -> None:
    """Saves (all processes take part) and waits until it is on disk."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics=metrics, force=True)
    manager.wait_until_finished()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings``: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores, as (state, meta); None when there is none.

    A corrupt or partly written newest checkpoint is skipped with a warning, moved aside
    to ``<workdir>/checkpoints_unreadable/<step>`` (kept for inspection, and out of the way
    of the step that will be saved again), and the one before it is used.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure means: try the previous one
            logging.warning('Checkpoint at step %d could not be restored (%s: %s).',
                            step, type(e).__name__, e)
            print(f'WARNING: checkpoint at step {step} is unreadable ({type(e).__name__}); '
                  'falling back to the previous one.', flush=True)
            _move_aside(manager, step)
            continue
        return restored['state'], restored['meta']
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
    directory = epath.Path(manager.directory)
    target = directory.parent / f'{CHECKPOINT_DIR}_unreadable'
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        (directory / str(step)).rename(target / f'{step}_{int(time.time())}')
    multihost_utils.sync_global_devices(f'move aside checkpoint {step}')
    manager.reload()
