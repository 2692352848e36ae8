"""The training loop: ``train_and_evaluate(config, workdir)``.

It reads top to bottom: set up (config checks, dataset, model, optimizer), restore the
newest checkpoint or initialise, compile, then the loop, whose periodic actions (log,
evaluate, checkpoint, stop on a signal) are separate blocks. Rerunning it on the same
workdir resumes from the newest readable checkpoint; the data stream and the per-step
random keys depend only on the config's seed, the step and the process index, so a
resumed run repeats an uninterrupted one exactly (on the same mesh).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from etils import epath

from sequencer_jax import config_defaults, storage, weights, xla_options
from sequencer_jax.data import batches as batches_lib
from sequencer_jax.errors import UserError
from sequencer_jax.models import layout
from sequencer_jax.train import checkpoint, lease as lease_lib, mesh as mesh_lib
from sequencer_jax.train import preemption, profiling
from sequencer_jax.train import state as state_lib, steps, tasks
from sequencer_jax.train.reporting import (TENSORBOARD_DIR, MetricWriter, Progress,
                                           StepTimer)


# The exit status of a run stopped by a signal after saving (sysexits' EX_TEMPFAIL: try
# again later): a scheduler tells it from a finished run (0) and an error (1).
EXIT_INTERRUPTED = 75


class TrainingStopped(UserError):
    """Training stopped for a reason its message explains: what happened, what is kept,
    what to change."""


class Interrupted(Exception):
    """Training stopped by SIGTERM or Ctrl-C after saving a checkpoint: rerunning the same
    command resumes it. The CLI exits with ``EXIT_INTERRUPTED``."""


def train_and_evaluate(config, workdir: str, devices=None,
                       force_takeover: bool = False) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the
    final evaluation metrics, or raises ``Interrupted`` after a stop signal.
    ``devices`` (default: all) are laid out as ``config.mesh``; ``workdir`` is a local
    directory or a bucket (``gs://``), held by this run alone (``lease``; another live
    run's is refused unless ``force_takeover``)."""
    # Set-up. Every check of the config and of init_from runs before the dataset is
    # prepared (hours for ImageNet) and before the workdir gets anything.
    config_defaults.validate(config, devices)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    if config.init_from:
        weights.checked_source(config.init_from)
    workdir = storage.created_dir(workdir, 'the workdir')
    task = tasks.get_task(config)
    spec = task.dataset()
    model = task.model(spec)
    steps_per_epoch = max(spec.num_train_examples // config.batch_size, 1)
    total_steps = config.num_train_steps or int(config.num_epochs * steps_per_epoch)
    schedule = state_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = state_lib.make_optimizer(config, schedule)
    local_batch = batches_lib.local_batch_size(config.batch_size)
    image_shape = (1, config.image_size, config.image_size, 3)

    def init_state(rng, net=model):
        params = net.init(rng, jnp.zeros(image_shape))['params']
        return state_lib.create_train_state(params, tx, config.ema_decay is not None)

    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    abstract = jax.eval_shape(init_state, init_rng)
    shardings = mesh_lib.tree_shardings(abstract, mesh, config.param_rules)

    with contextlib.ExitStack() as stack:
        # Before anything in the workdir is touched: another run may be using it.
        lease = stack.enter_context(lease_lib.Lease(workdir, force_takeover,
                                                    config.hang_timeout_s))
        stack.enter_context(checkpoint.orbax_log_to_file(workdir))
        # The mesh in context: recurrence='pallas' splits its kernels over it (XLA cannot).
        stack.enter_context(jax.set_mesh(mesh))
        manager = checkpoint.make_manager(workdir, config.keep_checkpoints, config.best_metric)
        # Closed last, after the save in flight; on errors too, without hiding them.
        stack.push(lambda error_type, *_: checkpoint.close(manager, error_type is None))

        # Restore or initialise.
        changes = _config_changes_since_last_start(workdir, config)
        restored = _restore(manager, abstract, shardings, init_state, init_rng, model, mesh,
                            config.param_rules, changes, workdir)
        if restored is not None:
            state, meta = restored
            start_step = int(state.step)
            same_batch = meta['batch_size'] == config.batch_size
            examples_read = meta['examples_per_process'] if same_batch else \
                start_step * local_batch
            print(f'Resuming from step {start_step} in {workdir}', flush=True)
            if changes:
                print(f'Config changed since the last start: {"; ".join(changes)}', flush=True)
        elif config.init_from:
            fresh = jax.device_get(jax.jit(init_state)(init_rng).params)
            params, head = task.initial_params(model, fresh)
            state = jax.device_put(state_lib.create_train_state(
                params, tx, config.ema_decay is not None), shardings)
            start_step, examples_read = 0, 0
            print(f'Initialised from {config.init_from} ({head})', flush=True)
        else:
            state = jax.jit(init_state, out_shardings=shardings)(init_rng)
            start_step, examples_read = 0, 0
        checkpoint.check_room(manager, abstract,
                              config.keep_checkpoints + bool(config.best_metric))
        if jax.process_index() == 0:
            (workdir / config_defaults.SAVED_CONFIG_FILE).write_text(
                config.to_json_best_effort(indent=1))

        # Compile.
        batch_sharding = mesh_lib.batch_sharding(mesh)
        replicated = mesh_lib.replicated(mesh)
        train_step = jax.jit(
            task.train_step(model, tx, config.ema_decay, config.grad_accum_steps),
            in_shardings=(shardings, batch_sharding, replicated),
            out_shardings=(shardings, replicated), donate_argnums=0,
            compiler_options=xla_options.compiler_options())
        eval_step = jax.jit(task.eval_step(model),
                            in_shardings=(shardings.params, batch_sharding),
                            out_shardings=replicated,
                            compiler_options=xla_options.compiler_options())

        def evaluate(state) -> dict[str, float]:
            def batches():
                local_eval_batch = batches_lib.local_batch_size(
                    config.eval_batch_size or config.batch_size)
                batches, n = task.eval_batches(spec, local_eval_batch, batch_sharding)
                return _reporting_progress(batches, lease), n

            def metrics(params):
                return steps.evaluate(params, batches, eval_step, task.summarise).items()

            results = {f'eval/{k}': v for k, v in metrics(state.params)}
            if state.ema_params is not None:
                results |= {f'eval_ema/{k}': v for k, v in metrics(state.ema_params)}
            return results

        train_batches = task.train_batches(spec, local_batch, examples_read, batch_sharding)
        writer = MetricWriter(workdir, start_step)
        stack.callback(writer.close)
        progress = Progress(config.progress, start_step, total_steps)
        stack.callback(progress.close)
        stop = preemption.StopFlag()
        stack.callback(stop.restore)
        profiler = profiling.StepProfiler(str(workdir / TENSORBOARD_DIR), **config.profile,
                                          first_step=start_step, total_steps=total_steps)
        stack.callback(profiler.close)
        if jax.process_index() == 0:
            print(f'Training {task.describe()} ({model.num_classes} classes) on '
                  f'{spec.name} for {total_steps} steps of {config.batch_size} images, '
                  f'mesh {dict(mesh.shape)}, workdir {workdir}', flush=True)
        if start_step >= total_steps:
            return _evaluate_finished_run(config, workdir, start_step, total_steps,
                                          evaluate(state), task)

        # The loop.
        timer, window = StepTimer(), _TrainWindow(start_step)
        final: dict[str, float] = {}
        for step in range(start_step + 1, total_steps + 1):
            profiler.before_step(step - 1)
            with timer.waiting_for_input():
                batch = next(train_batches)
            state, metrics = _run(train_step, state, batch, train_rng)
            lease.progressed()
            profiler.after_step(step, state)
            window.add(metrics)
            record: dict[str, float] = {}

            if _is_time(step, config.log_every_steps, total_steps):
                checkpoint.check_saves(manager)  # a save that failed in the background
                means, num_steps = window.means(step, manager, workdir)
                seconds, input_wait = timer.lap()
                record |= means | {'train/lr': float(schedule(step - 1)),
                                   'train/images_per_s': num_steps * config.batch_size / seconds,
                                   'train/input_wait': input_wait}

            if _is_time(step, config.eval_every_steps, total_steps):
                with timer.paused():
                    record |= evaluate(state)
                final = record

            writer.write(step, record)
            progress.update(step, record)

            stopping = stop.any_process(lease.taken_over is not None)
            if stopping == preemption.TAKEN_OVER:
                owner = lease.taken_over or "process 0's output names it"
                raise TrainingStopped(f'Another run took this workdir over ({owner}). This run '
                                      f'stops at step {step} without saving, so as not to '
                                      'overwrite its checkpoints.')
            if _is_time(step, config.checkpoint_every_steps, total_steps) or stopping:
                window.check_finite(step, manager, workdir)  # never save a diverged state
                best = {k: v for k, v in record.items() if k == config.best_metric}
                meta = {'examples_per_process': step * local_batch,
                        'batch_size': config.batch_size, 'step': step}
                with timer.paused():
                    checkpoint.save(manager, step, state, meta, best or None)

            if stopping and step < total_steps:
                checkpoint.wait(manager)
                raise Interrupted(f'Stopped ({stop.received or "another process"}): saved '
                                  f'step {step}; rerun the same command to resume.')
    _print_final(final, task)
    return final


def _reporting_progress(batches, lease: lease_lib.Lease):
    """``batches``, telling ``lease`` of each: a long evaluation is not a hang."""
    for batch in batches:
        lease.progressed()
        yield batch


def _is_time(step: int, every: int, total_steps: int) -> bool:
    """Whether a periodic action is due after ``step``: every ``every`` steps and after
    the last."""
    return step % every == 0 or step == total_steps


def _run(train_step, state, batch, rng):
    """One train step; out-of-memory errors say what to change."""
    try:
        return train_step(state, batch, rng)
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
            raise TrainingStopped(
                'Out of memory in the train step. Lower config.batch_size, set '
                'config.model.args.remat=True (and scan_blocks=True), use '
                "config.compute_dtype='bfloat16', or shard parameters with mesh=fsdp. "
                f'Original error: {str(e).splitlines()[0]}') from e
        raise


class _TrainWindow:
    """The train step's metrics summed since the last log step."""

    def __init__(self, start_step: int):
        self._first, self._sums = start_step + 1, None

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self._sums = metrics if self._sums is None else jax.tree.map(jnp.add, self._sums,
                                                                     metrics)

    def means(self, step: int, manager, workdir: epath.Path) -> tuple[dict[str, float], int]:
        """The means over the window (``train/*``) and its number of steps; a new window
        starts. TrainingStopped if the loss is not finite."""
        self.check_finite(step, manager, workdir)
        count = step - self._first + 1
        means = {f'train/{k}': float(v) / count for k, v in jax.device_get(self._sums).items()}
        self._first, self._sums = step + 1, None
        return means, count

    def check_finite(self, step: int, manager, workdir: epath.Path) -> None:
        if self._sums is None or math.isfinite(float(self._sums['loss'])):
            return
        latest = manager.latest_step()
        kept = (f'The last good checkpoint (step {latest}) is kept in {workdir}'
                if latest is not None else 'No checkpoint was written before it')
        raise TrainingStopped(
            f'Non-finite training loss at step {step} (mean over steps {self._first}-{step}). '
            f'{kept}. Lower config.optimizer.base_lr, set config.optimizer.grad_clip_norm, '
            "or use config.compute_dtype='float32'.")


def _restore(manager, abstract, shardings, init_state: Callable, rng, model, mesh, rules,
             changes: list[str], workdir: epath.Path) -> tuple[Any, dict] | None:
    """The newest readable checkpoint as (state, meta), placed by ``shardings``; None when
    there is none. One written with the other ``scan_blocks`` layout is converted (params,
    EMA and optimizer moments alike); one of another model or optimizer is refused,
    naming the difference and what changed in the config."""
    try:
        return checkpoint.restore_latest(manager, checkpoint.abstract_like(abstract, shardings))
    except checkpoint.StateMismatchError as mismatch:
        other = _other_block_layout(model)
        other_abstract = jax.eval_shape(functools.partial(init_state, net=other), rng)
        target = checkpoint.abstract_like(
            other_abstract, mesh_lib.tree_shardings(other_abstract, mesh, rules))
        try:
            restored = checkpoint.restore_latest(manager, target)
        except checkpoint.StateMismatchError:
            since = f' Changed since its last start: {"; ".join(changes)}.' if changes else ''
            raise UserError(f'{mismatch}.{since} Resume with the config the run was started '
                            f'with (--config=configs/workdir.py:dir={workdir}, or no --config), '
                            'or train in another --workdir.') from None
    backbone = getattr(model, 'backbone', model)
    print(f'The checkpoint was written with scan_blocks={not backbone.scan_blocks}: its '
          f'blocks are converted to scan_blocks={backbone.scan_blocks}.', flush=True)
    state, meta = restored
    return jax.device_put(layout.match_state_layout(state, backbone), shardings), meta


def _other_block_layout(model):
    """``model`` with its (backbone's) blocks in the other layout (``scan_blocks``)."""
    if hasattr(model, 'backbone'):
        return model.clone(backbone=_other_block_layout(model.backbone))
    return model.clone(scan_blocks=not model.scan_blocks)


def _config_changes_since_last_start(workdir: epath.Path, config) -> list[str]:
    """How ``config`` differs from the one the run in ``workdir`` last started with
    (``config.json``; see ``config_defaults.config_changes``); [] for a new workdir."""
    path = workdir / config_defaults.SAVED_CONFIG_FILE
    if not path.exists():
        return []
    try:
        before = json.loads(path.read_text())
    except ValueError:  # torn by a crash while it was written: nothing to compare
        return []
    return config_defaults.config_changes(before, config)


def _evaluate_finished_run(config, workdir, start_step: int, total_steps: int,
                           results: dict[str, float], task) -> dict[str, float]:
    """A run whose checkpoint is at its end: its evaluation only, and how to train on."""
    if jax.process_index() == 0:
        length = 'num_train_steps' if config.num_train_steps else 'num_epochs'
        print(f'The checkpoint is at step {start_step}, the end of these {total_steps} steps: '
              'evaluating it only. To train on, give the run a longer length: '
              f'--config=configs/workdir.py:dir={workdir} --config.{length}=N (the '
              'learning-rate schedule then spans the new length).', flush=True)
    final = {'step': total_steps, **results}
    _print_final(final, task)
    return final


def _print_final(final: dict[str, float], task) -> None:
    if jax.process_index() == 0 and final:
        print(task.summary(final), flush=True)
