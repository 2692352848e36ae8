"""Default config sections shared by the files in configs/ (the paper's values)."""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from sequencer_jax import storage
from sequencer_jax.models.sequencer import RECURRENCES, Sequencer

# In a training workdir: the config of the run's latest start (``to_json_best_effort``).
SAVED_CONFIG_FILE = 'config.json'

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
    """``config.dataset``: which TFDS dataset and how to read it."""
    config = ml_collections.ConfigDict(dict(
        name=name,
        data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default
        train_split='train',
        eval_split=ml_collections.FieldReference(None, field_type=str),  # None: auto
        image_key='image',
        label_key='label',
        shuffle_buffer=16_384,
        prefetch=2,
        deterministic=True,
        skip_corrupt=False,
    ))
    config.update(overrides)
    return config


def augment_config(**overrides) -> ml_collections.ConfigDict:
    """``config.augment``: the DeiT recipe used by Sequencer (set a part to None / 0 to
    switch it off)."""
    config = ml_collections.ConfigDict(dict(
        crop_scale=(0.08, 1.0),
        flip=True,
        randaugment=ml_collections.ConfigDict(dict(
            num_layers=2, magnitude=9.0, magnitude_std=0.5)),  # rand-m9-mstd0.5-inc1
        erase_prob=0.25,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        switch_prob=0.5,
        label_smoothing=0.1,
    ))
    for key, value in overrides.items():
        config[key] = value
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every key the training CLI reads, with the paper's ImageNet recipe as defaults.

    The files in configs/ start from this and change what their job needs; unknown keys
    are errors (the returned dict is locked by the caller's ``config.lock()``).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(
        name='sequencer2d_s',
        args=model_args_config(drop_path_rate=0.1),  # options of create_model
        num_classes=ml_collections.FieldReference(None, field_type=int),  # None: dataset's
    ))
    config.compute_dtype = 'float32'  # 'bfloat16' on TPU/GPU; params stay float32
    config.dataset = dataset_config('imagenet2012')
    config.augment = augment_config()
    config.image_size = 224
    config.eval_image_size = ml_collections.FieldReference(None, field_type=int)  # None: same
    config.crop_pct = 0.875
    config.batch_size = 1024  # global
    # Micro-batches per step: the same update with 1/N of the activation memory, N x slower.
    config.grad_accum_steps = 1
    config.eval_batch_size = ml_collections.FieldReference(None, field_type=int)  # None: same
    config.num_epochs = 300
    config.num_train_steps = ml_collections.FieldReference(None, field_type=int)  # overrides
    config.optimizer = ml_collections.ConfigDict(dict(
        base_lr=2e-3,             # at reference_batch_size, scaled linearly
        reference_batch_size=2048,
        warmup_epochs=20,
        warmup_lr=1e-6,
        min_lr=1e-6,
        weight_decay=0.05,        # not applied to biases, norms, position embeddings
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=ml_collections.FieldReference(None, field_type=float),
    ))
    config.ema_decay = ml_collections.FieldReference(None, field_type=float)  # e.g. 0.99996
    # Tuples, not lists: ml_collections overrides tuples from the command line,
    # --config.mesh="(('data', 4), ('fsdp', 2))".
    config.mesh = (('data', -1), ('fsdp', 1))
    # (regex over the parameter path, rule): 'fsdp' shards the largest dimension that
    # divides by the fsdp axis; 'replicate' keeps a full copy on every device.
    config.param_rules = (('.*', 'fsdp'),)
    config.log_every_steps = 50
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.best_metric = 'eval/top1'  # one of BEST_METRICS, or None: only the newest
    config.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tuning
    config.requires_init_from = False  # True: training refuses to start without init_from
    config.reinit_head = False  # True: a fresh head even where init_from's head fits
    config.progress = 'auto'  # 'bar' on a terminal, else 'lines'; or force one
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
    ('profile.start_step', lambda v: v >= 0, 'non-negative (or None: no profile)'),
    ('profile.num_steps', lambda v: v >= 1, 'at least 1'),
)


# Metrics that choose the best checkpoint to keep (highest accuracy, lowest loss).
BEST_METRICS = tuple(f'{prefix}/{name}' for prefix in ('eval', 'eval_ema')
                     for name in ('top1', 'top5', 'loss'))


def check_config(config: ml_collections.ConfigDict, training: bool = True) -> None:
    """Raises ValueError naming every number of a config that is out of range (e.g.
    ``--config.batch_size=0``) and, for ``training``, a bad ``best_metric`` or a missing
    ``init_from`` that the config requires; before anything is built or read."""
    problems = []
    for key, valid, requirement in _RANGES:
        value = config
        for part in key.split('.'):
            value = value.get(part) if value is not None else None
        if value is not None and not valid(value):
            problems.append(f'config.{key}={value!r} must be {requirement}')
    if training:
        problems += _training_problems(config)
    if problems:
        raise ValueError('Bad config: ' + '; '.join(problems) + '.')


def _training_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What only training needs of a config: a valid best_metric and, where the config
    fine-tunes, init_from."""
    problems = []
    best = config.get('best_metric')
    if best is not None and best not in BEST_METRICS:
        problems.append(f'config.best_metric={best!r} must be one of {list(BEST_METRICS)} '
                        '(or None: keep only the newest checkpoints)')
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
        raise ValueError(f'Cannot read {path} ({type(e).__name__}: {cause}); check that it is '
                         'a readable file (for gs://: your credentials and network), or give '
                         'the config file instead, e.g. --config=configs/imagenet.py.') from None
    try:
        saved = json.loads(text)
    except ValueError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); give the config file instead, '
                         'e.g. --config=configs/imagenet.py.') from None
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
            raise ValueError(f'{path}: {prefix}{key}={value!r} does not fit the config ({e}); '
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
            raise ValueError(f'Bad config variant {part!r} in {arg!r}: expected key=value '
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
        raise ValueError(f'Unknown mesh {value!r}: use data, fsdp or DxF (e.g. 4x2).') from None
    config.mesh = (('data', data), ('fsdp', fsdp))


def set_model(config: ml_collections.ConfigDict, name: str) -> None:
    """Variant ``model=NAME`` (any registered variant)."""
    config.model.name = name


def set_remat(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``remat=true|false``: recompute each block in the backward pass (with
    ``scan_blocks``, what fits sequencer2d_l at batch 64 in a 16 GB device)."""
    if value not in ('true', 'false'):
        raise ValueError(f'Bad remat {value!r}: use remat=true or remat=false.')
    config.model.args.remat = value == 'true'


def set_recurrence(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``recurrence=natural|scan|pallas`` (see the model's ``recurrence``)."""
    if value not in RECURRENCES:
        raise ValueError(f'Unknown recurrence {value!r}: use one of {list(RECURRENCES)}.')
    config.model.args.recurrence = value


def set_dtype(config: ml_collections.ConfigDict, value: str) -> None:
    """Variant ``dtype=float32|bfloat16`` (compute dtype; params stay float32)."""
    config.compute_dtype = value
