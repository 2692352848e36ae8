"""The training loop: steps, periodic evaluation, logging, checkpoints, preemption and Ctrl-C.

One flat function, ``train_and_evaluate(config, workdir)``. Rerunning it with the same
workdir resumes from the newest readable checkpoint; the data stream and the per-step
random keys depend only on the config seed, the step and the process index, so a
resumed run repeats an uninterrupted one exactly (on the same mesh).
"""

from __future__ import annotations

import functools
import json
import math
import re
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from etils import epath
from jax.experimental import multihost_utils

from sequencer_jax import config_defaults, convert, storage, xla_options
from sequencer_jax.data import pipeline
from sequencer_jax.models import registry
from sequencer_jax.train import checkpoint, mesh as mesh_lib, profiling, state as state_lib
from sequencer_jax.train import steps

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'  # also holds profiler traces


def build_model(config, num_classes: int):
    if config.compute_dtype not in DTYPES:
        raise ValueError(f'config.compute_dtype must be one of {sorted(DTYPES)}, '
                         f'got {config.compute_dtype!r}.')
    options = {k: v for k, v in config.model.args.to_dict().items() if v is not None}
    return registry.create_model(config.model.name, num_classes, DTYPES[config.compute_dtype],
                                 **options)


class MetricWriter:
    """metrics.jsonl and TensorBoard events; writes on process 0 only.

    A run resumed at ``start_step`` first drops the lines of later steps: a run that
    died between checkpoints logged them, and they are about to be logged again. A write
    that fails (a full disk, a bucket's error) is reported and training goes on: the
    checkpoints hold the work, and a checkpoint that cannot be written stops the run.
    """

    def __init__(self, workdir: epath.Path, start_step: int = 0):
        self._active = jax.process_index() == 0
        if self._active:
            metrics_file = workdir / METRICS_FILE
            if metrics_file.exists():
                lines = metrics_file.read_text().splitlines(keepends=True)
                kept = [line for line in lines if _logged_step(line) <= start_step]
                if len(kept) < len(lines):
                    metrics_file.write_text(''.join(kept))
            self._jsonl_path = str(metrics_file)
            self._jsonl = metrics_file.open('a')
            self._tb_dir = str(workdir / TENSORBOARD_DIR)
            self._tb = tf.summary.create_file_writer(self._tb_dir)
            self._failing: set[str] = set()  # where the last write failed

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return

        def jsonl():
            self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
            self._jsonl.flush()

        def events():
            with self._tb.as_default(step=step):
                for key, value in metrics.items():
                    tf.summary.scalar(key, value)
            self._tb.flush()

        self._attempt(jsonl, f'the metrics of step {step}', self._jsonl_path)
        self._attempt(events, f'the TensorBoard events of step {step}', self._tb_dir)

    def close(self) -> None:
        if self._active:
            self._attempt(self._jsonl.close, 'the last metrics', self._jsonl_path)
            self._attempt(self._tb.close, 'the last TensorBoard events', self._tb_dir)

    def _attempt(self, write: Callable[[], None], what: str, where: str) -> None:
        """Runs ``write``; reports its failure, once while writes to ``where`` go on
        failing (a full disk fails every log step)."""
        try:
            write()
        except (OSError, tf.errors.OpError) as e:  # local files; gs:// (tf.io.gfile), TF ops
            if where not in self._failing:
                self._failing.add(where)
                cause = str(e).splitlines()[0] if str(e) else type(e).__name__
                cause = re.sub(r'^\{\{function_node [^}]*\}\}\s*', '', cause)  # TF's prefix
                print(f'Warning: could not write {what} to {where} ({cause}). Training goes '
                      'on (a checkpoint that cannot be written stops it); further failures '
                      'to write there are not reported until one succeeds.', flush=True)
            return
        self._failing.discard(where)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (a crash mid-write) counts as
    after every step, so that it is dropped."""
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
        return math.inf


class Progress:
    """A tqdm bar with ETA on a terminal; plain periodic lines otherwise."""

    def __init__(self, mode: str, start: int, total: int):
        if mode not in ('auto', 'bar', 'lines'):
            raise ValueError(f"config.progress must be 'auto', 'bar' or 'lines', got {mode!r}.")
        self._bar = None
        self._total = total
        self._start_time, self._start_step = time.perf_counter(), start
        if jax.process_index() == 0 and (mode == 'bar' or (mode == 'auto' and sys.stdout.isatty())):
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float] | None) -> None:
        if jax.process_index() != 0:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if metrics:
                self._bar.set_postfix({k.split('/')[-1]: f'{v:.4g}' for k, v in metrics.items()
                                       if k in ('train/loss', 'train/top1', 'eval/top1')})
        elif metrics:
            done = step - self._start_step
            elapsed = time.perf_counter() - self._start_time
            eta = elapsed / max(done, 1) * (self._total - step)
            shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
            print(f'step {step}/{self._total} ({100 * step / self._total:.1f}%) {shown} '
                  f'eta {time.strftime("%H:%M:%S", time.gmtime(eta))}', flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class StopFlag:
    """Set by SIGTERM (preemption) or a first Ctrl-C (SIGINT); agreed across processes so
    that all of them save a checkpoint after the current step and stop. A second Ctrl-C
    interrupts at once, as without it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None  # the first signal's name
        self._previous = {}
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self.received is not None:
                raise KeyboardInterrupt
            print('\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C '
                  'again to stop at once, losing the steps since the last checkpoint).',
                  file=sys.stderr, flush=True)
        self.received = self.received or signal.Signals(signum).name

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.received is not None
        mine = np.asarray(self.received is not None)
        return bool(np.any(multihost_utils.process_allgather(mine)))

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signum, previous)


class TrainingStopped(RuntimeError):
    """Training stopped for a reason its message explains: what happened, what is kept,
    what to change (the CLI shows the message alone)."""


def _explain_runtime_error(e: Exception) -> Exception:
    if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
        return TrainingStopped(
            'Out of memory in the train step. Lower config.batch_size, set '
            "config.model.args.remat=True (and scan_blocks=True), use "
            "config.compute_dtype='bfloat16', or shard parameters with mesh=fsdp. "
            f'Original error: {str(e).splitlines()[0]}')
    return e


def load_checkpoint_params(source: str | epath.Path) -> tuple[Any, Any, Any]:
    """Params from a converted PyTorch dir or a training workdir's newest checkpoint
    (local or ``gs://``).

    Returns (params, ema_params or None, model or None); the model is known only for a
    converted dir (from its model.json).
    """
    source = checked_checkpoint_source(source)
    if (source / convert.MODEL_INFO_FILE).exists():
        model, variables = convert.load_converted(source)
        return variables['params'], None, model
    with checkpoint.open_read_only(source) as manager:
        restored = manager.restore(manager.latest_step(), args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardRestore()))['state']
    return restored['params'], restored.get('ema_params'), None


def checked_checkpoint_source(source: str | epath.Path) -> epath.Path:
    """``source`` resolved; a ValueError unless it is a converted dir or a training
    workdir with checkpoints."""
    source = storage.resolve(source)
    if (source / convert.MODEL_INFO_FILE).exists():
        return source
    manager = checkpoint.open_read_only(source)
    if manager is None:
        raise ValueError(f'{source} is neither a converted checkpoint (python -m '
                         'sequencer_jax.convert) nor a training workdir with checkpoints.')
    manager.close()
    return source


def match_layout(params: Any, model) -> Any:
    """Block params in the model's layout: stacked when it scans its blocks
    (``scan_blocks``), unrolled when not, whichever way the checkpoint was written.
    Params with other block counts are returned as they are (``check_params_fit`` then
    names the difference)."""
    unrolled = [sum(f'stages_{i}_blocks_{j}' in params for j in range(depth))
                for i, depth in enumerate(model.layers)]
    if model.scan_blocks and unrolled == list(model.layers):
        return convert.stack_stage_blocks(params, model.layers)
    stacked = [jax.tree.leaves(params.get(f'stages_{i}_blocks', {}))
               for i in range(len(model.layers))]
    if not model.scan_blocks and all(
            leaves and leaves[0].shape[0] == depth
            for leaves, depth in zip(stacked, model.layers)):
        return convert.unstack_stage_blocks(params, model.layers)
    return params


def _holds_blocks(tree: Any) -> bool:
    """Whether ``tree`` is a params-shaped dict (params, EMA params, an optimizer
    moment) holding the first stage's blocks in either layout."""
    return isinstance(tree, dict) and ('stages_0_blocks' in tree or 'stages_0_blocks_0' in tree)


def restore_in_other_block_layout(manager, model, init_state: Callable, rng, mesh, rules,
                                  shardings) -> tuple[Any, dict] | None:
    """The newest checkpoint written with the other ``scan_blocks`` layout than
    ``model``'s, as (state, meta): its blocks converted to ``model``'s layout (params, EMA
    and optimizer moments alike) and placed by ``shardings``; None if it does not fit
    that layout either. ``init_state(rng, net=...)`` makes a new train state of a model."""
    other = model.clone(scan_blocks=not model.scan_blocks)
    abstract = jax.eval_shape(functools.partial(init_state, net=other), rng)
    target = checkpoint.abstract_like(abstract, mesh_lib.tree_shardings(abstract, mesh, rules))
    try:
        restored = checkpoint.restore_latest(manager, target)
    except checkpoint.StateMismatchError:
        return None
    if restored is None:
        return None
    state, meta = restored
    state = jax.tree.map(lambda tree: match_layout(tree, model) if _holds_blocks(tree) else tree,
                         state, is_leaf=_holds_blocks)
    return jax.device_put(state, shardings), meta


def initial_params(config, model, params: Any) -> tuple[Any, str]:
    """Loads ``config.init_from`` into ``params`` (fine-tuning); the classifier head is
    re-initialised when ``config.reinit_head`` or when its shape differs.

    Returns (params, what happened to the head, for the log)."""
    loaded, _, _ = load_checkpoint_params(config.init_from)
    loaded = dict(match_layout(loaded, model))
    same_shape = (jax.tree.map(jnp.shape, loaded.get('head'))
                  == jax.tree.map(jnp.shape, params['head']))
    if same_shape and not config.reinit_head:
        head = 'its head kept'
    else:
        loaded_classes = loaded['head']['kernel'].shape[-1] if 'head' in loaded else 'none'
        head = ('a new head, as config.reinit_head asks' if same_shape else
                f"a new head for {params['head']['kernel'].shape[-1]} classes; the "
                f"checkpoint's has {loaded_classes}")
        loaded['head'] = params['head']
    check_params_fit(loaded, params, config.init_from, config,
                     f'config.init_from={config.init_from!r}')
    return jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), loaded, params), head


def check_num_classes(num_classes: int, spec: pipeline.DatasetSpec, source: str) -> None:
    """A ValueError when a classifier of ``num_classes`` cannot score every label of the
    dataset (labels past the last class would count as silently wrong)."""
    if num_classes < spec.num_classes:
        raise ValueError(f'{source}: {num_classes} classes, but {spec.builder.name} has '
                         f'{spec.num_classes}; use a model with at least as many.')


def check_params_fit(loaded: Any, expected: Any, source: str | epath.Path, config,
                     what: str | None = None) -> None:
    """A ValueError naming the first parameter where ``loaded`` and ``expected`` (arrays or
    ShapeDtypeStructs) differ in name or shape; checkpoints of another model end here
    instead of in an error from deep inside Flax. ``source`` is the checkpoint's directory
    (named by ``what`` in the message, default: itself)."""
    difference = checkpoint.shape_difference(loaded, expected)
    if difference is None:
        return
    name, saved, wanted = difference
    saved_config = storage.resolve(source) / config_defaults.SAVED_CONFIG_FILE
    advice = (f'Use the model it was trained with: config.model in {saved_config} (or that '
              f'whole config: --config=configs/workdir.py:dir={source})'
              if saved_config.exists() else 'Use the config (and variant) it was trained with')
    raise ValueError(
        f'{what or source} does not fit {config.model.name} with config.model.args: its '
        f"parameter {name} is {saved}, the model's {wanted}. {advice}.")


def config_changes_since_last_start(workdir: epath.Path, config) -> list[str]:
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


def evaluate(params: Any, dataset_fn: Callable[[], tuple[Any, int]], eval_fn) -> dict:
    """top1/top5/loss over a padded split; every example counts once."""
    dataset, _ = dataset_fn()
    totals = None
    for batch in dataset:
        out = eval_fn(params, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.tree.map(float, totals)
    count = max(totals['count'], 1.0)
    return {'top1': totals['top1'] / count, 'top5': totals['top5'] / count,
            'loss': totals['loss_sum'] / count}


def check_grad_accumulation(batch_size: int, num_batch_shards: int, accum_steps: int) -> None:
    """ValueError unless every device's share of the batch splits into ``accum_steps``
    equal micro-batches (before the dataset is prepared: hours for ImageNet)."""
    share = batch_size // num_batch_shards
    if batch_size % num_batch_shards == 0 and share % accum_steps:
        divisors = [d for d in range(1, share + 1) if share % d == 0]
        raise ValueError(
            f'config.grad_accum_steps={accum_steps} must divide each device\'s share of the '
            f'batch, {batch_size} / {num_batch_shards} batch shards = {share} images; use one '
            f'of {divisors}, or a config.batch_size that {accum_steps} x {num_batch_shards} '
            'divides.')


def train_and_evaluate(config, workdir: str, devices=None) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the
    final evaluation metrics. ``devices`` (default: all) are laid out as ``config.mesh``;
    ``workdir`` is a local directory or a bucket (``gs://``)."""
    config_defaults.check_config(config)
    # The model's options, image sizes and init_from now, not after the dataset is
    # prepared (hours for ImageNet) or at the first evaluation; the real model is built
    # once the dataset gives the class count.
    model = build_model(config, config.model.num_classes or 1)
    for size in (config.image_size, config.eval_image_size or config.image_size):
        model._check_input(jnp.zeros((1, size, size, 3)))
    if config.init_from:
        checked_checkpoint_source(config.init_from)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    check_grad_accumulation(config.batch_size, mesh_lib.num_batch_shards(mesh),
                            config.grad_accum_steps)
    workdir = storage.created_dir(workdir, 'the workdir')
    # The mesh in context: recurrence='pallas' splits its kernels over it (XLA cannot).
    with jax.set_mesh(mesh):
        return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config, workdir: epath.Path, mesh) -> dict[str, float]:
    spec = pipeline.dataset_spec(config.dataset)
    pipeline.check_train_split(spec)  # now: before checkpoints/ and config.json are made
    num_classes = config.model.num_classes or spec.num_classes
    check_num_classes(num_classes, spec, 'config.model.num_classes')
    model = build_model(config, num_classes)
    local_batch = pipeline.local_batch_size(config.batch_size, mesh_lib.num_batch_shards(mesh))
    eval_batch = config.eval_batch_size or config.batch_size
    local_eval_batch = pipeline.local_batch_size(eval_batch, mesh_lib.num_batch_shards(mesh))
    steps_per_epoch = max(spec.num_train_examples // config.batch_size, 1)
    total_steps = config.num_train_steps or int(config.num_epochs * steps_per_epoch)
    schedule = state_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = state_lib.make_optimizer(config, schedule)
    use_ema = config.ema_decay is not None
    image_shape = (1, config.image_size, config.image_size, 3)

    def init_state(rng, net=model):
        params = net.init(rng, jnp.zeros(image_shape))['params']
        return state_lib.create_train_state(params, tx, use_ema)

    root = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(root)
    abstract = jax.eval_shape(init_state, init_rng)
    shardings = mesh_lib.tree_shardings(abstract, mesh, config.param_rules)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints, config.best_metric)
    changes = config_changes_since_last_start(workdir, config)
    try:
        restored = checkpoint.restore_latest(manager,
                                             checkpoint.abstract_like(abstract, shardings))
    except checkpoint.StateMismatchError as e:
        restored = restore_in_other_block_layout(manager, model, init_state, init_rng, mesh,
                                                 config.param_rules, shardings)
        if restored is None:
            since = f' Changed since its last start: {"; ".join(changes)}.' if changes else ''
            raise ValueError(f'{e}.{since} Resume with the config the run was started with '
                             f'(--config=configs/workdir.py:dir={workdir}, or no --config), or '
                             'train in another --workdir.') from None
        print(f'The checkpoint was written with scan_blocks={not model.scan_blocks}: its '
              f'blocks are converted to scan_blocks={model.scan_blocks}.', flush=True)
    if restored is not None:
        state, meta = restored
        start_step = int(state.step)
        examples_read = meta['examples_per_process'] if meta['batch_size'] == config.batch_size \
            else start_step * local_batch
        print(f'Resuming from step {start_step} in {workdir}', flush=True)
        if changes:
            print(f'Config changed since the last start: {"; ".join(changes)}', flush=True)
    else:
        state = jax.jit(init_state, out_shardings=shardings)(init_rng)
        if config.init_from:
            params, head = initial_params(config, model, jax.device_get(state.params))
            state = jax.device_put(state_lib.create_train_state(params, tx, use_ema), shardings)
            print(f'Initialised from {config.init_from} ({head})', flush=True)
        start_step, examples_read = 0, 0

    checkpoint.check_room(manager, abstract, config.keep_checkpoints + bool(config.best_metric))
    if jax.process_index() == 0:
        saved = workdir / config_defaults.SAVED_CONFIG_FILE
        saved.write_text(config.to_json_best_effort(indent=1))
    batch_sharding = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)
    mix = dict(mixup_alpha=config.augment.mixup_alpha, cutmix_alpha=config.augment.cutmix_alpha,
               switch_prob=config.augment.switch_prob, smoothing=config.augment.label_smoothing)
    options = xla_options.compiler_options()
    train_step = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, mix=mix,
                          ema_decay=config.ema_decay, accum_steps=config.grad_accum_steps),
        in_shardings=(shardings, batch_sharding, repl), out_shardings=(shardings, repl),
        donate_argnums=0, compiler_options=options)
    eval_step = jax.jit(functools.partial(steps.eval_step, model=model),
                        in_shardings=(shardings.params, batch_sharding), out_shardings=repl,
                        compiler_options=options)

    def eval_batches():
        ds, n = pipeline.eval_dataset(spec, config, local_eval_batch)
        return pipeline.GlobalBatches(ds, batch_sharding, f'{spec.builder.name} eval'), n

    def run_eval(state) -> dict[str, float]:
        out = {f'eval/{k}': v for k, v in evaluate(state.params, eval_batches, eval_step).items()}
        if state.ema_params is not None:
            out.update({f'eval_ema/{k}': v for k, v in
                        evaluate(state.ema_params, eval_batches, eval_step).items()})
        return out

    train_iter = pipeline.GlobalBatches(
        pipeline.train_dataset(spec, config, local_batch, start_example=examples_read),
        batch_sharding, f'{spec.builder.name} train')
    writer = MetricWriter(workdir, start_step)
    progress = Progress(config.progress, start_step, total_steps)
    stop = StopFlag()
    profiler = profiling.StepProfiler(str(workdir / TENSORBOARD_DIR), **config.profile,
                                      first_step=start_step, total_steps=total_steps)
    if jax.process_index() == 0:
        print(f'Training {config.model.name} ({num_classes} classes) on {spec.builder.name} '
              f'for {total_steps} steps of {config.batch_size} images, mesh '
              f'{dict(mesh.shape)}, workdir {workdir}', flush=True)
        if start_step >= total_steps:
            length = 'num_train_steps' if config.num_train_steps else 'num_epochs'
            print(f'The checkpoint is at step {start_step}, the end of these {total_steps} '
                  'steps: evaluating it only. To train on, give the run a longer length: '
                  f'--config=configs/workdir.py:dir={workdir} --config.{length}=N (the '
                  'learning-rate schedule then spans the new length).', flush=True)

    def save(step, metrics=None):
        meta = {'examples_per_process': step * local_batch, 'batch_size': config.batch_size,
                'step': step}
        checkpoint.save(manager, step, state, meta, metrics)

    sums, last_log_step, last_log_time = None, start_step, time.perf_counter()
    input_wait = 0.0  # seconds spent waiting for batches since last_log_time
    final_metrics: dict[str, float] = {}
    step = start_step
    stopped = completed = False
    try:
        while step < total_steps and not stopped:
            profiler.before_step(step)
            fetch_start = time.perf_counter()
            batch = next(train_iter)
            input_wait += time.perf_counter() - fetch_start
            try:
                state, metrics = train_step(state, batch, train_rng)
            except jax.errors.JaxRuntimeError as e:
                raise _explain_runtime_error(e) from e
            step += 1
            profiler.after_step(step, state)
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            is_last = step == total_steps
            log_now = step % config.log_every_steps == 0 or is_last
            ckpt_now = step % config.checkpoint_every_steps == 0 or is_last
            eval_now = step % config.eval_every_steps == 0 or is_last
            stop_now = stop.any_process()
            logged = None
            if log_now or ckpt_now or eval_now or stop_now:
                n = step - last_log_step
                now = time.perf_counter()
                logged = {f'train/{k}': float(v) / n for k, v in jax.device_get(sums).items()}
                if not math.isfinite(logged['train/loss']):
                    latest = manager.latest_step()
                    kept = (f'The last good checkpoint (step {latest}) is kept in {workdir}'
                            if latest is not None else 'No checkpoint was written before it')
                    raise TrainingStopped(
                        f'Non-finite training loss at step {step} (mean over steps '
                        f'{last_log_step + 1}-{step}). {kept}. Lower '
                        'config.optimizer.base_lr, set config.optimizer.grad_clip_norm, or '
                        "use config.compute_dtype='float32'.")
                checkpoint.check_saves(manager)
                logged['train/lr'] = float(schedule(step - 1))
                logged['train/images_per_s'] = n * config.batch_size / (now - last_log_time)
                logged['train/input_wait'] = input_wait / (now - last_log_time)
                sums, last_log_step, last_log_time, input_wait = None, step, now, 0.0
            if eval_now:
                logged.update(run_eval(state))
                final_metrics = logged
            if logged and (log_now or eval_now):
                writer.write(step, logged)
            progress.update(step, logged if log_now or eval_now else None)
            if ckpt_now or stop_now:
                best = {config.best_metric: logged[config.best_metric]} \
                    if logged and config.best_metric in logged else None
                save(step, best)
                stopped = stop_now and not is_last
            last_log_time = time.perf_counter() if eval_now or ckpt_now else last_log_time
        if stopped:
            checkpoint.wait(manager)
            print(f'Stopped ({stop.received or "another process"}): saved step '
                  f'{step}; rerun the same command to resume.', flush=True)
        completed = True
    finally:
        # After the save in flight, if any: on errors too, without hiding them.
        profiler.close()
        checkpoint.close(manager, raise_errors=completed)
        progress.close()
        writer.close()
        stop.restore()
    if stopped:
        return final_metrics
    if not final_metrics and start_step >= total_steps:
        final_metrics = {'step': total_steps, **run_eval(state)}
    if jax.process_index() == 0 and final_metrics:
        line = f"Final eval: top-1 {final_metrics['eval/top1']:.4f}, " \
               f"top-5 {final_metrics['eval/top5']:.4f}"
        if 'eval_ema/top1' in final_metrics:
            line += f", EMA top-1 {final_metrics['eval_ema/top1']:.4f}"
        print(line, flush=True)
    return final_metrics
