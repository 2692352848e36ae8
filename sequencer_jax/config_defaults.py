"""Default config sections shared by the files in configs/ (the paper's values)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from sequencer_jax import storage
from sequencer_jax.data import synthetic
from sequencer_jax.errors import UserError
from sequencer_jax.models import registry
from sequencer_jax.models.segmentation import INFERENCE_MODES
from sequencer_jax.models.sequencer import RECURRENCES, Sequencer
from sequencer_jax.train import mesh as mesh_lib

# In a training workdir: the config of the run's latest start (``to_json_best_effort``).
SAVED_CONFIG_FILE = 'config.json'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # config.compute_dtype
PROGRESS_MODES = ('auto', 'bar', 'lines')  # config.progress
SCHEDULES = ('cosine', 'poly')  # config.optimizer.schedule

# Fields of Sequencer that are not options of a config's model: the class count comes
# from model.num_classes or the dataset, the dtypes from compute_dtype.
_NOT_MODEL_ARGS = {'num_classes', 'dtype', 'param_dtype', 'parent', 'name'}


def model_args_config(**overrides) -> ml_collections.ConfigDict:
    """``config.model.args``: every option of ``create_model`` (a field of ``Sequencer``),
    None meaning the registered variant's value. All are present, so that any of them can
    be set on the command line (``--config.model.args.remat=true``) while a misspelt one
    is still an error."""
    args = ml_collections.ConfigDict()
    for field in dataclasses.fields(Sequencer):
        if field.name not in _NOT_MODEL_ARGS:
            # Sequences (and pos_embed_grid, None by default) are tuples on the command line.
            kind = tuple if field.default is None or isinstance(field.default, (tuple, list)) \
                else type(field.default)
            args[field.name] = ml_collections.FieldReference(None, field_type=kind)
    args.update(overrides)
    return args


def dataset_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """``config.dataset``: which dataset (TFDS, or ``synthetic``) and how to read it."""
    config = ml_collections.ConfigDict(dict(
        # A TFDS name, e.g. imagenet2012, cifar10, or sklearn_digits (embedded); or
        # 'synthetic': random labelled images made on the devices (no TensorFlow, no files).
        name=name,
        data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default
        train_split='train',  # a TFDS split expression, e.g. 'train[:90%]'
        eval_split=ml_collections.FieldReference(None, field_type=str),  # None: validation or test
        image_key='image',  # the features holding the image and its class
        label_key='label',
        shuffle_buffer=16_384,  # examples shuffled at a time, per process
        prefetch=2,  # batches prepared ahead
        deterministic=True,  # False: tf.data may reorder examples, for speed
        skip_corrupt=False,  # True: skip undecodable images with a warning, not stop
        # name='synthetic' only (images of config.image_size, see data/synthetic.py).
        synthetic=ml_collections.ConfigDict(dict(
            num_classes=1000,
            train_examples=1_281_167,  # an epoch's length, as ImageNet-1K's
            eval_examples=50_000,
            seed=0,  # the class patterns, the images and their order
        )),
    ))
    config.update(overrides)
    return config


def augment_config(**overrides) -> ml_collections.ConfigDict:
    """``config.augment``: the DeiT recipe used by Sequencer (set a part to None / 0 to
    switch it off)."""
    config = ml_collections.ConfigDict(dict(
        crop_scale=(0.08, 1.0),  # random resized crop's area range; None: resize only
        flip=True,  # random horizontal flip
        randaugment=ml_collections.ConfigDict(dict(
            num_layers=2, magnitude=9.0, magnitude_std=0.5)),  # rand-m9-mstd0.5-inc1
        erase_prob=0.25,  # random erasing (one box of noise)
        mixup_alpha=0.8,  # on device; 0: off
        cutmix_alpha=1.0,  # on device; 0: off
        switch_prob=0.5,  # with both on: the chance of cutmix instead of mixup
        label_smoothing=0.1,
    ))
    for key, value in overrides.items():
        config[key] = value
    return config


def segmentation_config(**overrides) -> ml_collections.ConfigDict:
    """``config.segmentation``: what ``config.task='segmentation'`` reads (mmsegmentation's
    ADE20K recipe as defaults; the crop is ``config.image_size``)."""
    config = ml_collections.ConfigDict(dict(
        reduce_zero_label=False,  # True: label 0 is ignored, the others shift down (ADE20K)
        ignore_label=255,  # mask value that no loss or metric counts
        # Train: rescale (long, short) sides to scale x ratio (aspect kept), random crop in
        # which no class covers cat_max_ratio or more, flip, photometric distortion.
        scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip=True,
        photometric=True,
        # Eval: rescaled to eval_scale (None: as they are) and padded to eval_canvas (H, W;
        # None: image_size square), predicted 'whole' or 'slide' (image_size windows every
        # slide_stride pixels); test-time augmentation averages the probabilities of the
        # canvases resized by each of eval_scales and, with eval_flip, mirrored.
        eval_scale=ml_collections.FieldReference(None, field_type=tuple),
        eval_canvas=ml_collections.FieldReference(None, field_type=tuple),
        # With eval_scale: the (H, W) masks are padded to at their original size, where the
        # predictions, resized back, are scored (None: eval_canvas).
        eval_label_canvas=ml_collections.FieldReference(None, field_type=tuple),
        inference='whole',
        slide_stride=(341, 341),
        eval_scales=(1.0,),  # mmsegmentation's ADE20K TTA: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
        eval_flip=False,
        channels=512,  # UperNet's width
        aux_channels=ml_collections.FieldReference(256, field_type=int),  # None: no aux head
        aux_weight=0.4,  # the auxiliary FCN head's share of the loss
    ))
    config.update(overrides)
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every key the training CLI reads, with the paper's ImageNet recipe as defaults.

    The files in configs/ start from this and change what their job needs; unknown keys
    are errors (the returned dict is locked by the caller's ``config.lock()``).
    """
    config = ml_collections.ConfigDict()
    config.task = 'classification'  # or 'segmentation' (reads config.segmentation)
    config.seed = 0  # the one root of every random key and of the data order
    config.model = ml_collections.ConfigDict(dict(
        name='sequencer2d_s',  # a registered variant (sequencer_jax.list_models())
        args=model_args_config(drop_path_rate=0.1),  # options of create_model
        num_classes=ml_collections.FieldReference(None, field_type=int),  # None: dataset's
    ))
    config.compute_dtype = 'float32'  # 'bfloat16' on TPU/GPU; params stay float32
    config.dataset = dataset_config('imagenet2012')
    config.augment = augment_config()  # classification's
    config.segmentation = segmentation_config()
    config.image_size = 224  # train images' (segmentation: crops') side in pixels
    config.eval_image_size = ml_collections.FieldReference(None, field_type=int)  # None: same
    config.crop_pct = 0.875  # eval: shorter side resized to size / crop_pct, centre crop
    config.batch_size = 1024  # global
    # Micro-batches per step: the same update with 1/N of the activation memory, N x slower.
    config.grad_accum_steps = 1
    config.eval_batch_size = ml_collections.FieldReference(None, field_type=int)  # None: same
    config.num_epochs = 300  # the run's length, unless num_train_steps is set
    config.num_train_steps = ml_collections.FieldReference(None, field_type=int)  # overrides
    config.optimizer = ml_collections.ConfigDict(dict(
        base_lr=2e-3,             # at reference_batch_size, scaled linearly
        reference_batch_size=2048,
        schedule='cosine',        # after the warmup: 'cosine' or 'poly' (segmentation)
        power=1.0,                # the 'poly' schedule's exponent
        warmup_epochs=20,         # linear from warmup_lr to the peak, then the schedule
        warmup_steps=ml_collections.FieldReference(None, field_type=int),  # overrides epochs
        warmup_lr=1e-6,
        min_lr=1e-6,              # the schedule's floor
        weight_decay=0.05,        # not applied to biases, norms, position embeddings
        b1=0.9,                   # AdamW's moments
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=ml_collections.FieldReference(None, field_type=float),  # global norm
    ))
    config.ema_decay = ml_collections.FieldReference(None, field_type=float)  # e.g. 0.99996
    # Tuples, not lists: ml_collections overrides tuples from the command line,
    # --config.mesh="(('data', 4), ('fsdp', 2))".
    config.mesh = (('data', -1), ('fsdp', 1))
    # (regex over the parameter path, rule): 'fsdp' shards the largest dimension that
    # divides by the fsdp axis; 'replicate' keeps a full copy on every device.
    config.param_rules = (('.*', 'fsdp'),)
    # Periodic actions, each also after the last step.
    config.log_every_steps = 50  # metrics.jsonl, TensorBoard, progress
    config.eval_every_steps = 5000  # the whole eval split (and with EMA, its weights too)
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the newest ones, besides the best by best_metric
    config.best_metric = 'eval/top1'  # see best_metrics(task), or None: only the newest
    config.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tuning
    config.requires_init_from = False  # True: training refuses to start without init_from
    config.reinit_head = False  # True: a fresh head even where init_from's head fits
    config.progress = 'auto'  # 'bar' on a terminal, else 'lines'; or force one
    # No train step and no eval batch for this long (seconds) is taken for a hang: the run
    # stops with a message and every thread's stack in WORKDIR/hang-process<i>.txt.
    # None: never. Count the first step's compile in.
    config.hang_timeout_s = ml_collections.FieldReference(1800.0, field_type=float)
    # A JAX profiler trace of the num_steps steps after start_step (None: none) in
    # WORKDIR/tensorboard, for TensorBoard's Profile tab or ui.perfetto.dev; python_tracer
    # adds every Python call (host overhead, input pipeline) to a 20-40x larger trace.
    config.profile = ml_collections.ConfigDict(dict(
        start_step=ml_collections.FieldReference(None, field_type=int),
        num_steps=5,
        python_tracer=False,
    ))
    return config


# (key, test, what it must be) for the numbers of ``base_config`` with a valid range;
# a None that a FieldReference allows means "use the default" and is not tested.
_RANGES = (
    ('batch_size', lambda v: v >= 1, 'at least 1'),
    ('grad_accum_steps', lambda v: v >= 1, 'at least 1'),
    ('eval_batch_size', lambda v: v >= 1, 'at least 1 (or None: batch_size)'),
    ('image_size', lambda v: v >= 1, 'at least 1'),
    ('eval_image_size', lambda v: v >= 1, 'at least 1 (or None: image_size)'),
    ('crop_pct', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('num_epochs', lambda v: v > 0, 'positive'),
    ('num_train_steps', lambda v: v >= 1, 'at least 1 (or None: from num_epochs)'),
    ('optimizer.base_lr', lambda v: v >= 0, 'non-negative'),
    ('optimizer.reference_batch_size', lambda v: v >= 1, 'at least 1'),
    ('optimizer.warmup_epochs', lambda v: v >= 0, 'non-negative'),
    ('optimizer.warmup_steps', lambda v: v >= 0, 'non-negative (or None: warmup_epochs)'),
    ('optimizer.power', lambda v: v > 0, 'positive'),
    ('optimizer.warmup_lr', lambda v: v >= 0, 'non-negative'),
    ('optimizer.min_lr', lambda v: v >= 0, 'non-negative'),
    ('optimizer.weight_decay', lambda v: v >= 0, 'non-negative'),
    ('optimizer.b1', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.b2', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.eps', lambda v: v > 0, 'positive'),
    ('optimizer.grad_clip_norm', lambda v: v > 0, 'positive (or None: no clipping)'),
    ('ema_decay', lambda v: 0 < v < 1, 'in (0, 1) (or None: no EMA)'),
    ('log_every_steps', lambda v: v >= 1, 'at least 1'),
    ('eval_every_steps', lambda v: v >= 1, 'at least 1'),
    ('checkpoint_every_steps', lambda v: v >= 1, 'at least 1'),
    ('keep_checkpoints', lambda v: v >= 1, 'at least 1'),
    ('hang_timeout_s', lambda v: v > 0, 'positive (or None: never)'),
    ('profile.start_step', lambda v: v >= 0, 'non-negative (or None: no profile)'),
    ('profile.num_steps', lambda v: v >= 1, 'at least 1'),
    ('dataset.synthetic.num_classes', lambda v: v >= 1, 'at least 1'),
    ('dataset.synthetic.train_examples', lambda v: v >= 1, 'at least 1'),
    ('dataset.synthetic.eval_examples', lambda v: v >= 1, 'at least 1'),
)


# Metrics of each task; each chooses the best checkpoint (highest, lowest for a loss).
TASK_METRICS = {'classification': ('top1', 'top5', 'loss'),
                'segmentation': ('miou', 'macc', 'aacc', 'loss')}


def best_metrics(task: str) -> tuple[str, ...]:
    """The values ``config.best_metric`` may take for ``task``."""
    return tuple(f'{prefix}/{name}' for prefix in ('eval', 'eval_ema')
                 for name in TASK_METRICS.get(task, ()))


def validate(config: ml_collections.ConfigDict, devices=None, training: bool = True) -> None:
    """Every check of a config, before anything is read, built or written: one UserError
    naming all its problems. Numbers out of range (``--config.batch_size=0``), the model's
    options and image sizes, the dtype, the progress mode, the mesh over ``devices``
    (default: all) and the sharding rules, the batch sizes against the mesh's batch shards
    and the processes; for ``training``, ``best_metric`` and a fine-tuning config's
    ``init_from``."""
    problems = []
    for key, valid, requirement in _RANGES:
        value = config
        for part in key.split('.'):
            value = value.get(part) if value is not None else None
        if value is not None and not valid(value):
            problems.append(f'config.{key}={value!r} must be {requirement}')
    if config.optimizer.schedule not in SCHEDULES:
        problems.append(f'config.optimizer.schedule must be one of {list(SCHEDULES)}, got '
                        f'{config.optimizer.schedule!r}')
    if config.task not in TASK_METRICS:
        problems.append(f'config.task must be one of {list(TASK_METRICS)}, got {config.task!r}')
    elif config.task == 'segmentation':
        problems += _segmentation_problems(config)
        if config.dataset.name == synthetic.NAME:
            problems.append("config.dataset.name='synthetic' serves classification only; "
                            'give segmentation a TFDS dataset with masks')
    if config.compute_dtype not in DTYPES:
        problems.append(f'config.compute_dtype must be one of {sorted(DTYPES)}, got '
                        f'{config.compute_dtype!r}')
    else:
        problems += _model_problems(config)
    if config.get('progress', 'auto') not in PROGRESS_MODES:
        problems.append(f'config.progress must be one of {list(PROGRESS_MODES)}, got '
                        f'{config.progress!r}')
    problems += _caught(lambda: mesh_lib.check_rules(config.param_rules))
    try:
        problems += _batch_problems(config, mesh_lib.make_mesh(config.mesh, devices), training)
    except UserError as e:
        problems.append(str(e))
    if training:
        problems += _training_problems(config)
    if problems:
        raise UserError('Bad config: ' + '; '.join(p.rstrip('.') for p in problems) + '.')


def _caught(check: Callable[[], Any]) -> list[str]:
    """The message of the UserError ``check`` raises, as a list of problems."""
    try:
        check()
    except UserError as e:
        return [str(e)]
    return []


def model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> Sequencer:
    """The model ``config.model`` names, with its options and ``config.compute_dtype``."""
    options = {k: v for k, v in config.model.args.to_dict().items() if v is not None}
    return registry.create_model(config.model.name, num_classes, DTYPES[config.compute_dtype],
                                 **options)


def _model_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The model's options, and the image sizes it is given."""
    try:
        model = model_from_config(config, config.model.num_classes or 1)
    except UserError as e:
        return [str(e)]
    sizes = {config.image_size, config.eval_image_size or config.image_size}
    return [p for size in sorted(sizes) if size >= 1
            for p in _caught(lambda size=size: model.check_input_shape((1, size, size, 3)))]


def _segmentation_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What segmentation needs: a class count, a known inference mode, sizes in pairs."""
    seg = config.segmentation
    problems = []
    if not config.model.num_classes:
        problems.append('config.model.num_classes must be set for segmentation (a mask does '
                        'not say how many classes it has), e.g. 150 for ADE20K')
    if seg.inference not in INFERENCE_MODES:
        problems.append(f'config.segmentation.inference must be one of '
                        f'{list(INFERENCE_MODES)}, got {seg.inference!r}')
    if seg.inference == 'slide' and max(seg.slide_stride) > config.image_size:
        problems.append(f'config.segmentation.slide_stride={tuple(seg.slide_stride)} leaves '
                        f'pixels between the {config.image_size} px windows (image_size) '
                        'unpredicted: use strides of at most the window')
    for key in ('scale', 'eval_scale', 'eval_canvas', 'eval_label_canvas', 'slide_stride',
                'ratio_range'):
        value = seg[key]
        if value is not None and (len(value) != 2 or min(value) <= 0):
            problems.append(f'config.segmentation.{key}={value!r} must be two positive numbers')
    if not seg.eval_scales or min(seg.eval_scales) <= 0:
        problems.append(f'config.segmentation.eval_scales={seg.eval_scales!r} must be positive '
                        'factors, e.g. (1.0,)')
    return problems


def _batch_problems(config: ml_collections.ConfigDict, mesh, training: bool) -> list[str]:
    """Batch sizes that do not split over the processes and the mesh's batch shards, and
    micro-batches that do not split each device's share."""
    shards = mesh_lib.num_batch_shards(mesh)
    processes = jax.process_count()
    eval_batch = config.eval_batch_size or config.batch_size
    batches = {'config.batch_size': config.batch_size} if training else {}
    batches['config.eval_batch_size' if config.eval_batch_size else 'config.batch_size'] = \
        eval_batch
    multiple = math.lcm(processes, shards)
    problems = [f'{key}={batch} must divide by the number of processes ({processes}) and of '
                f'batch shards on the mesh ({shards}); use a multiple of {multiple}'
                for key, batch in batches.items() if batch >= 1 and batch % multiple]
    share = config.batch_size // shards
    accum = config.grad_accum_steps
    if training and not problems and accum >= 1 and share % accum:
        divisors = [d for d in range(1, share + 1) if share % d == 0]
        problems.append(
            f"config.grad_accum_steps={accum} must divide each device's share of the batch, "
            f'{config.batch_size} / {shards} batch shards = {share} images; use one of '
            f'{divisors}, or a config.batch_size that {accum} x {shards} divides')
    return problems


def _training_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What only training needs of a config: a valid best_metric and, where the config
    fine-tunes, init_from."""
    problems = []
    best = config.get('best_metric')
    if best is not None and best not in best_metrics(config.task):
        problems.append(f'config.best_metric={best!r} must be one of '
                        f'{list(best_metrics(config.task))} (or None: keep only the newest '
                        'checkpoints)')
    elif best and best.startswith('eval_ema/') and not config.get('ema_decay'):
        problems.append(f'config.best_metric={best!r} needs EMA weights: set '
                        'config.ema_decay (e.g. 0.9999) or choose an eval/ metric')
    if config.get('requires_init_from') and not config.get('init_from'):
        problems.append('config.init_from is not set, and this config fine-tunes trained '
                        'weights: give --config.init_from=DIR (a directory written by '
                        'python -m sequencer_jax.convert, or a training workdir)')
    return problems


def config_changes(before: dict, config: ml_collections.ConfigDict) -> list[str]:
    """``'key: old -> new'`` (dotted keys, JSON values) for every value that differs
    between ``before`` (a config saved with ``to_json_best_effort``) and ``config``. A key
    that is None on one side and absent on the other is no change: None means the default
    (e.g. ``model.args``' options, which a config may give all or only some of)."""
    old, new = _flattened(before), _flattened(json.loads(config.to_json_best_effort()))
    changes = []
    for key in sorted(set(old) | set(new)):
        shown = [json.dumps(flat[key]) if key in flat else 'unset' for flat in (old, new)]
        if shown[0] != shown[1] and set(shown) != {'null', 'unset'}:
            changes.append(f'{key}: {shown[0]} -> {shown[1]}')
    return changes


def _flattened(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flattened(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = value
    return flat


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config the training run in ``workdir`` last started with, read from its
    ``config.json``; None if there is none (the caller says what to give instead),
    ValueError if it cannot be read.

    Typed as ``base_config``'s keys, so that the result is the config that was saved (its
    JSON lists are tuples again) and every key can be overridden on the command line,
    None-valued ones included (``configs/workdir.py`` serves it as a config file)."""
    path = storage.resolve(workdir) / SAVED_CONFIG_FILE
    try:
        if not path.exists():
            return None
        text = path.read_text()
    except Exception as e:  # noqa: BLE001 - each storage backend (gs://) has its own errors
        cause = str(e).splitlines()[0] if str(e) else ''
        raise UserError(f'Cannot read {path} ({type(e).__name__}: {cause}); check that it is '
                         'a readable file (for gs://: your credentials and network), or give '
                         'the config file instead, e.g. --config=configs/imagenet.py.') from None
    try:
        saved = json.loads(text)
    except ValueError as e:
        raise UserError(f'{path} is not valid JSON ({e}); give the config file instead, '
                         'e.g. --config=configs/imagenet.py.') from None
    if saved.get('task') not in TASK_METRICS:  # configs/finetune.py once kept its variant there
        saved.pop('task', None)
    config = base_config()
    _overlay(config, saved, path)
    return config


def _overlay(config: ml_collections.ConfigDict, saved: dict, path, prefix: str = '') -> None:
    """Sets ``saved``'s values (JSON) in ``config``, keeping the types of its fields."""
    for key, value in saved.items():
        current = config.get(key)
        if isinstance(value, dict) and isinstance(current, ml_collections.ConfigDict):
            _overlay(current, value, path, f'{prefix}{key}.')
            continue
        try:
            config[key] = _tuples(value)
        except TypeError as e:
            raise UserError(f'{path}: {prefix}{key}={value!r} does not fit the config ({e}); '
                             'correct the file or give the config file instead.') from None


def _tuples(value):
    """A JSON value with its lists as tuples (what the config files use) and its objects as
    ConfigDicts."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return ml_collections.ConfigDict({k: _tuples(v) for k, v in value.items()})
    return value


def apply_variant(config: ml_collections.ConfigDict, arg: str | None,
                  variants: dict) -> ml_collections.ConfigDict:
    """Applies a big_vision-style variant string ``'key=value,key=value'``.

    ``variants`` maps each accepted key to a function ``(config, value) -> None``.
    """
    for part in (arg or '').split(','):
        if not part:
            continue
        key, sep, value = part.partition('=')
        if not sep or key not in variants:
            raise UserError(f'Bad config variant {part!r} in {arg!r}: expected key=value '
                             f'with key in {sorted(variants)}.')
        variants[key](config, value)
    return config


MESHES = {
    'data': (('data', -1), ('fsdp', 1)),
    'fsdp': (('data', 1), ('fsdp', -1)),
}


def set_mesh(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``mesh=data|fsdp|DxF`` (e.g. ``mesh=4x2``: data 4, fsdp 2)."""
    if value in MESHES:
        config.mesh = MESHES[value]
        return
    try:
        data, fsdp = (int(v) for v in value.split('x'))
    except ValueError:
        raise UserError(f'Unknown mesh {value!r}: use data, fsdp or DxF (e.g. 4x2).') from None
    config.mesh = (('data', data), ('fsdp', fsdp))


def set_model(config: ml_collections.ConfigDict, name: str) -> None:
    """Variant ``model=NAME`` (any registered variant)."""
    config.model.name = name


def set_remat(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``remat=true|false``: recompute each block in the backward pass (with
    ``scan_blocks``, what fits sequencer2d_l at batch 64 in a 16 GB device)."""
    if value not in ('true', 'false'):
        raise UserError(f'Bad remat {value!r}: use remat=true or remat=false.')
    config.model.args.remat = value == 'true'


def set_recurrence(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``recurrence=natural|scan|pallas`` (see the model's ``recurrence``)."""
    if value not in RECURRENCES:
        raise UserError(f'Unknown recurrence {value!r}: use one of {list(RECURRENCES)}.')
    config.model.args.recurrence = value


def set_dataset(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``dataset=NAME``: a TFDS name, or ``synthetic`` (the same train step on
    random images made on the devices: no TensorFlow, no input pipeline)."""
    config.dataset.name = value


def set_dtype(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``dtype=float32|bfloat16`` (compute dtype; params stay float32)."""
    config.compute_dtype = value
