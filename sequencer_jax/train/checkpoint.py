"""Checkpoints with orbax: periodic/final saves, keep-last-N plus best-by-metric, and
restore into an abstract sharded target (so a run can resume on another mesh).

Each checkpoint holds the full TrainState (params, optimizer state, EMA, step) and a
JSON ``meta`` item: how many examples each process has read (the data iterator's
position), the global batch size, the metrics of that step, and a checksum of every
saved array. Orbax does not verify the data of large arrays on restore (tensorstore's
OCDBT checksums its B-tree nodes, not the data files they point to), so flipped bits
there restored as silently wrong moments; ``restore_latest`` compares the checksums.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy_lib

from sequencer_jax import storage
from sequencer_jax.errors import UserError

CHECKPOINT_DIR = 'checkpoints'


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (a full disk, lost permissions, bucket errors);
    the message says why, which checkpoint is the newest complete one and how to resume."""


def make_manager(workdir: str | epath.Path, keep: int, best_metric: str | None
                 ) -> ocp.CheckpointManager:
    """A manager of ``<workdir>/checkpoints`` (local or ``gs://``) keeping the last ``keep``
    checkpoints and the best one by ``best_metric`` (the lowest for a loss, else the
    highest). Its saves finish in the background: ``manager.wait_until_finished()`` (or
    ``close()``) before relying on them."""
    policies = [policy_lib.LatestN(keep)]
    if best_metric:
        policies.append(policy_lib.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric], n=1,
            reverse=best_metric.endswith('loss'), keep_checkpoints_without_metrics=False))
    # Asynchronous: a save blocks training only while the state is copied to host memory
    # (0.13-0.25 s instead of 1.5 s for Sequencer2D-S on a local disk, more on buckets).
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy_lib.AnyPreservationPolicy(policies), create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(storage.resolve(workdir) / CHECKPOINT_DIR, options=options,
                                 item_handlers=_item_handlers())


def check_room(manager: ocp.CheckpointManager, abstract_state: Any, held: int) -> None:
    """Before training: a UserError when the local disk of the checkpoints has no room
    for one checkpoint of ``abstract_state`` (its arrays' bytes; orbax writes ~1.1x that),
    and a warning when it has room for fewer than the run will hold: ``held`` and the one
    being written, less those already there. Buckets have no free space to ask for."""
    directory = epath.Path(manager.directory)
    if storage.is_bucket(directory):
        return
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) / 2**20
    # In MiB (an int32 on the way), and process 0's view for all: all stop or none.
    free = int(multihost_utils.broadcast_one_to_all(
        shutil.disk_usage(directory).free // 2**20))
    if free < size:
        raise UserError(f'The disk of {directory} has {free:,} MiB free, less than one '
                         f'checkpoint of this run ({size:,.1f} MiB: parameters, optimizer '
                         'state and EMA, if any). Free space there or give another --workdir.')
    wanted = held + 1 - len(manager.all_steps())
    if free < wanted * size:
        print(f'Warning: the disk of {directory} has {free:,} MiB free: room for '
              f'{int(free // size)} more checkpoints of {size:,.1f} MiB, and this run will '
              f'want {wanted} (it keeps {held}: config.keep_checkpoints and the best by '
              'config.best_metric, and writes the next before deleting the oldest). Training '
              'stops with a message when a checkpoint cannot be written; free space there, or '
              'lower config.keep_checkpoints.', flush=True)


def orbax_log_path(workdir: str | epath.Path) -> str:
    """Where ``orbax_log_to_file`` writes this process's orbax log: ``<workdir>/orbax.log``
    (``orbax-process<i>.log`` for process i > 0), a local temporary file for a bucket."""
    index = jax.process_index()
    name = 'orbax.log' if index == 0 else f'orbax-process{index}.log'
    if storage.is_bucket(workdir):
        return os.path.join(tempfile.gettempdir(), f'sequencer_jax-{os.getpid()}-{name}')
    return str(storage.resolve(workdir) / name)


class _QuietFileHandler(logging.FileHandler):
    """A log file that never reports failing to write itself (on a full disk, which is
    when it matters, that report would be the traceback it keeps off the terminal)."""

    def handleError(self, record: logging.LogRecord) -> None:
        del record


class _Divert(logging.Filter):
    """Sends orbax's records to ``handler`` instead of the loggers' own handlers."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if f'{os.sep}orbax{os.sep}' not in record.pathname:
            return True
        self._handler.handle(record)
        return False


@contextlib.contextmanager
def orbax_log_to_file(workdir: str | epath.Path) -> Iterator[None]:
    """Orbax's log records (it logs a failed save with its tracebacks, ~180 lines on a
    full disk) go to ``orbax_log_path(workdir)``, not the terminal: the trainer explains
    failures itself, in one line that names the file."""
    handler = _QuietFileHandler(orbax_log_path(workdir), delay=True)
    handler.setFormatter(logging.Formatter(
        '%(asctime)s %(levelname)s %(pathname)s:%(lineno)d] %(message)s'))
    divert = _Divert(handler)
    absl_logger = logging.getLogger('absl')  # orbax logs through absl.logging only
    absl_logger.addFilter(divert)
    try:
        yield
    finally:
        absl_logger.removeFilter(divert)
        handler.close()


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The handlers of a checkpoint's items; given up front (not only at save or
    restore), they also let a manager read the items' metadata."""
    return {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


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
                                        item_handlers=_item_handlers())
    finally:
        absl_logger.removeFilter(_not_read_only_notice)
    if manager.latest_step() is None:
        manager.close()
        return None
    return manager


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: dict[str, float] | None = None) -> None:
    """Starts saving (all processes take part): returns once ``state`` is copied to host
    memory, so that training can go on (and donate it) while the files are written.
    CheckpointSaveError if the previous save failed."""
    meta = {**meta, 'checksums': array_checksums(state)}
    with _save_errors_explained(manager):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)),
                     metrics=metrics, force=True)


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until the save in flight, if any, is written; CheckpointSaveError if it
    failed."""
    with _save_errors_explained(manager):
        manager.wait_until_finished()


def check_saves(manager: ocp.CheckpointManager) -> None:
    """CheckpointSaveError if the last save has failed, without waiting for one in
    flight: a save fails in the background, and training should not run on for a whole
    checkpoint interval whose result cannot be kept."""
    if not manager.is_saving_in_progress():
        wait(manager)


def close(manager: ocp.CheckpointManager, raise_errors: bool = True) -> None:
    """Waits for the save in flight and releases ``manager``. A failed save raises
    CheckpointSaveError unless ``raise_errors`` is False (another error is already on its
    way and must not be replaced)."""
    failure = None
    for finish in (manager.wait_until_finished, manager.close):
        try:
            with _save_errors_explained(manager):
                finish()
        except CheckpointSaveError as e:
            # Orbax's close raises an error of the background write again: report it once.
            failure = failure or e
    if failure is not None and raise_errors:
        raise failure


@contextlib.contextmanager
def _save_errors_explained(manager: ocp.CheckpointManager) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        # Orbax has dropped the failed step by now: the latest step is a complete one.
        latest = manager.latest_step()
        kept = (f'the newest complete checkpoint there is step {latest}. Make room there (or '
                'fix its permissions) and rerun the same command to resume from it'
                if latest is not None else 'no checkpoint there is complete yet. Make room '
                'there (or fix its permissions) and rerun the same command to start again')
        log = orbax_log_path(epath.Path(manager.directory).parent)
        raise CheckpointSaveError(f'A checkpoint could not be written in {manager.directory}: '
                                  f'{cause}. Training stopped; {kept}. Orbax\'s log: {log}.'
                                  ) from e


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator='/')


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32, one per element (two for 8-byte types, folded)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B9))
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
    return bits.astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
    """Each element's bits mixed with its position (murmur3's finaliser), summed mod 2^32:
    an integer sum, so the same on every mesh and sharding; a changed, swapped or shifted
    element changes it. No reshape: sharded arrays are summed where they lie."""
    h = _as_uint32(x)
    for axis in range(h.ndim):
        stride = math.prod(h.shape[axis + 1:]) & 0xFFFFFFFF
        h = h ^ (jax.lax.broadcasted_iota(jnp.uint32, h.shape, axis)
                 * jnp.uint32(stride) * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def array_checksums(state: Any) -> dict[str, list]:
    """``{'params/stem/kernel': [dtype, checksum], ...}`` of every array of ``state``
    (computed on its devices; one pass over the state)."""
    sums = jax.device_get(_checksums(state))
    return {_leaf_name(path): [str(x.dtype), int(sums_leaf)]
            for (path, x), sums_leaf in zip(jax.tree_util.tree_leaves_with_path(state),
                                            jax.tree.leaves(sums))}


def checksum_mismatch(state: Any, saved: dict[str, list] | None) -> str | None:
    """The first array of a restored ``state`` whose checksum differs from the one saved
    with it, or None. Arrays restored in another dtype than saved (a cast on restore) and
    checkpoints written before checksums were recorded are not compared."""
    if not saved:
        return None
    for name, (dtype, checksum) in array_checksums(state).items():
        if name in saved and saved[name][0] == dtype and saved[name][1] != checksum:
            return name
    return None


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings``: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class StateMismatchError(UserError):
    """A readable checkpoint whose arrays differ from the state it was to restore into:
    it was written with another model or optimizer configuration."""


def shape_difference(saved: Any, expected: Any) -> tuple[str, Any, Any] | None:
    """The first leaf, by path ('params/stem/kernel'), where two trees (of arrays,
    ShapeDtypeStructs or orbax's array metadata) differ in presence or shape, as
    (path, saved shape, expected shape) with 'missing' for an absent leaf; None when
    they agree."""
    shapes = [{_leaf_name(path): tuple(x.shape)
               for path, x in jax.tree_util.tree_leaves_with_path(tree)}
              for tree in (saved, expected)]
    if shapes[0] == shapes[1]:
        return None
    # A train state's params first: the likeliest difference, and the clearest to name.
    names = sorted(set(shapes[0]) | set(shapes[1]),
                   key=lambda name: (not name.startswith('params/'), name))
    first = next(n for n in names if shapes[0].get(n) != shapes[1].get(n))
    return first, shapes[0].get(first, 'missing'), shapes[1].get(first, 'missing')


def _saved_state_difference(manager: ocp.CheckpointManager, step: int,
                            abstract_state: Any) -> tuple[str, Any, Any] | None:
    """How the state saved at ``step`` differs from ``abstract_state`` in its arrays'
    names and shapes; None when they agree or the checkpoint's metadata is unreadable."""
    try:
        saved = manager.item_metadata(step)['state']
    except Exception:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
        return None
    return None if saved is None else shape_difference(saved, abstract_state)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict] | None:
    """The newest checkpoint that restores, as (state, meta); None when there is none.

    A corrupt or partly written newest checkpoint is skipped with a warning, moved aside
    to ``<workdir>/checkpoints_unreadable/<step>`` (kept for inspection, and out of the way
    of the step that will be saved again), and the one before it is used. A readable one
    whose arrays differ from ``abstract_state`` (another model or optimizer config) raises
    ``StateMismatchError`` and is left where it is: falling back would move every
    checkpoint of the run aside and train from scratch.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        difference = _saved_state_difference(manager, step, abstract_state)
        if difference is not None:
            path, saved, expected = difference
            raise StateMismatchError(
                f'The checkpoint at step {step} in {manager.directory} was written with '
                f"another model or optimizer config: its {path} is {saved}, this run's "
                f'{expected}')
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            corrupt = checksum_mismatch(restored['state'], restored['meta'].get('checksums'))
            cause = corrupt and f'its array {corrupt} does not match the checksum saved with it'
        except Exception as e:  # noqa: BLE001 - any failure means: try the previous one
            cause = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else "no message"}'
        if cause:
            path = epath.Path(manager.directory) / str(step)
            moved = _move_aside(manager, step)
            print(f'WARNING: the checkpoint at step {step} ({path}) is unreadable: {cause}. '
                  f'Moved aside to {moved}; falling back to the previous one.', flush=True)
            continue
        return restored['state'], restored['meta']
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint ``step`` to ``<workdir>/checkpoints_unreadable/<step>_<time>``."""
    directory = epath.Path(manager.directory)
    target = directory.parent / f'{CHECKPOINT_DIR}_unreadable' / f'{step}_{int(time.time())}'
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        (directory / str(step)).rename(target)
    multihost_utils.sync_global_devices(f'move aside checkpoint {step}')
    manager.reload()
    return target
