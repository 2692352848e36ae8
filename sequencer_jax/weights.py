"""Where a model's weights come from and go to, below the training loop.

A weights source is a training workdir (the params and EMA params of its newest
checkpoint), a directory written by ``python -m sequencer_jax.convert`` (orbax params
plus ``model.json``, which names the model and the preprocessing its weights want),
local or ``gs://``, or published weights on the Hugging Face Hub
(``hf-hub:timm/sequencer2d_s.in1k``, converted once into such a directory next to
huggingface_hub's cache). The loop (resume, ``config.init_from``), ``evaluate``, the
experiments and ``convert`` read them here, and check here that they fit the model they
are given to.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from huggingface_hub import constants as hub_constants

from sequencer_jax import config_defaults, errors, hub, storage
from sequencer_jax.errors import UserError
from sequencer_jax.models import layout, registry, torch_weights
from sequencer_jax.train import checkpoint

MODEL_INFO_FILE = 'model.json'
PARAMS_DIR = 'params'
STATE_DICT_SUFFIXES = ('.pth', '.pt', '.safetensors', '.npz')


def load_state_dict_file(path: str) -> dict[str, Any]:
    """A PyTorch state_dict from ``.pth``/``.pt`` (read as data: ``weights_only=True``),
    ``.safetensors`` or ``.npz`` (one array per key)."""
    if not os.path.exists(path):
        raise UserError(f'No such checkpoint file: {path}')
    if path.endswith('.npz'):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.endswith('.safetensors'):
        errors.require_package('safetensors', 'reading .safetensors files')
        from safetensors.numpy import load_file  # an optional package
        return load_file(path)
    errors.require_package('torch', 'reading .pth files (or convert the file to '
                           '.safetensors elsewhere)', extra='torch')
    import torch  # an optional package
    return torch.load(path, map_location='cpu', weights_only=True)


def save_converted(output_dir: str | os.PathLike, name: str, num_classes: int,
                   variables: dict[str, Any], model_args: dict[str, Any] | None = None,
                   preprocessing: dict[str, Any] | None = None) -> None:
    """Writes ``variables`` as an orbax checkpoint plus ``model.json`` describing the model
    (and, when known, the preprocessing the weights want: ``hub.preprocessing``), into a
    new local or ``gs://`` directory."""
    output_dir = storage.resolve(output_dir)
    params_dir = output_dir / PARAMS_DIR
    if params_dir.exists():
        raise UserError(f'{params_dir} already exists; choose a new --output directory.')
    output_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, variables)
    info = {'model': name, 'num_classes': num_classes, 'model_args': model_args or {}}
    if preprocessing:
        info['preprocessing'] = preprocessing
    (output_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=1))


def load_converted(path: str | os.PathLike):
    """Reads a directory written by ``save_converted``: (Flax model, variables)."""
    path = storage.resolve(path)
    info_file = path / MODEL_INFO_FILE
    if not info_file.exists():
        raise UserError(f'{path} is not a converted checkpoint (no {MODEL_INFO_FILE}); '
                        'create one with python -m sequencer_jax.convert.')
    info = json.loads(info_file.read_text())
    model = registry.create_model(info['model'], info['num_classes'], **info['model_args'])
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(path / PARAMS_DIR)
    return model, variables


def preprocessing(source: str | epath.Path) -> dict[str, Any] | None:
    """The preprocessing the weights of ``source`` want (a converted directory's, e.g.
    from the Hub: ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``input_size``), or
    None when it does not say (a training workdir: its config does)."""
    info_file = checked_source(source) / MODEL_INFO_FILE
    if not info_file.exists():
        return None
    saved = json.loads(info_file.read_text()).get('preprocessing')
    return None if saved is None else {k: tuple(v) if isinstance(v, list) else v
                                       for k, v in saved.items()}


class Pretrained(NamedTuple):
    """What ``load`` and ``load_pretrained`` return: the model, its variables (``{'params':
    ...}``, for ``model.apply``), and how to preprocess its images (timm's
    ``pretrained_cfg``: ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``,
    ``input_size``; ``sj.preprocess`` takes it)."""

    model: Any
    variables: dict[str, Any]
    preprocessing: dict[str, Any]


def load_pretrained(name: str, revision: str | None = None) -> Pretrained:
    """Published weights in one call: ``model, variables, preprocessing =
    sj.load_pretrained('sequencer2d_s')``. ``name`` is a variant with published weights
    (``hub.PUBLISHED``: timm's ImageNet-1K weights) or a Hub repository
    (``timm/sequencer2d_s.in1k``); ``revision`` pins a branch, tag or commit. The weights
    are fetched through huggingface_hub on first use and converted once."""
    return load(hub.source_for(name, revision))


def load(source: str | epath.Path, config=None, ema: bool = False) -> Pretrained:
    """Any weights source as ``model, variables, preprocessing`` (``Pretrained``), to use
    in one's own code: a training workdir (its latest checkpoint, with the model of the
    config its run saved, or of ``config``; ``ema``: its EMA weights), a converted
    directory, a Hub source (``hf-hub:timm/sequencer2d_s.in1k``) or a state_dict file
    (its model from ``config``, an ml_collections config such as ``configs/imagenet.py``'s).
    The preprocessing is the weights' own where they name it, else the config's eval
    transform (ImageNet's mean and std, bicubic, ``config.crop_pct``), else timm's for
    its Sequencer weights (``hub.PREPROCESSING_DEFAULTS``)."""
    source = checked_source(source)  # a Hub source: fetched and converted once
    params, ema_params, model = load_params(source)
    if ema:
        if ema_params is None:
            raise UserError(f'{source} has no EMA weights (a training run keeps them when '
                            'config.ema_decay is set); drop ema=True.')
        params = ema_params
    if model is None and config is None:
        config = config_defaults.saved_config(source)
    model, params = _with_model(source, params, model, config)
    wanted = preprocessing(source)
    if wanted is None and config is None:  # converted without it: timm's Sequencer's
        wanted = dict(hub.PREPROCESSING_DEFAULTS)
    elif wanted is None:
        size = config.eval_image_size or config.image_size
        wanted = dict(hub.PREPROCESSING_DEFAULTS, crop_pct=config.crop_pct,
                      input_size=(3, size, size))
    return Pretrained(model, {'params': params}, wanted)


def hub_converted_dir(source: str) -> epath.Path:
    """The converted directory of a Hub source, made on first use from its
    ``model.safetensors`` (the architecture from its ``config.json``), next to
    huggingface_hub's cache: ``<HF_HUB_CACHE>/sequencer_jax/<repo>/<commit>``. Resolved
    once per process and cache: a source is checked, then read (``checked_source``,
    ``load_params``, ``preprocessing``), and each fetch asks the Hub and hashes the
    weights file again."""
    return _hub_converted_dir(source, hub_constants.HF_HUB_CACHE)


@functools.lru_cache(maxsize=None)
def _hub_converted_dir(source: str, hub_cache: str) -> epath.Path:
    fetched = hub.fetch(source)
    target = storage.resolve(hub_cache) / 'sequencer_jax' / \
        fetched.repo_id.replace('/', '--') / fetched.commit
    if (target / MODEL_INFO_FILE).exists():
        return target
    name, num_classes, model_args = hub.architecture(fetched)
    state_dict = load_state_dict_file(fetched.weights_file)
    variables = torch_weights.from_torch_state_dict(state_dict, name, num_classes, **model_args)
    # Written aside and moved into place: several processes may convert at once.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{fetched.commit}-', dir=target.parent)
    save_converted(os.path.join(staging, 'out'), name, num_classes, variables, model_args,
                   hub.preprocessing(fetched))
    try:
        os.rename(os.path.join(staging, 'out'), target)
    except OSError:  # another process was first
        if not (target / MODEL_INFO_FILE).exists():
            raise
    shutil.rmtree(staging, ignore_errors=True)
    print(f'Converted {fetched.repo_id} ({name}, commit {fetched.commit[:12]}) into {target}',
          flush=True)
    return target


def checked_source(source: str | epath.Path) -> epath.Path:
    """``source`` resolved to a directory; a UserError unless it is a converted
    directory, a training workdir with checkpoints or a Hub source (converted here)."""
    if hub.is_hub_source(source):
        return hub_converted_dir(str(source))
    source = storage.resolve(source)
    if (source / MODEL_INFO_FILE).exists() or _is_state_dict_file(source):
        return source
    manager = checkpoint.open_read_only(source)
    if manager is None:
        raise UserError(f'{source} is neither a converted checkpoint (python -m '
                        'sequencer_jax.convert), a training workdir with checkpoints, a '
                        f'PyTorch state_dict file ({", ".join(STATE_DICT_SUFFIXES)}) nor a '
                        'Hub source (hf-hub:timm/sequencer2d_s.in1k).')
    manager.close()
    return source


def load_params(source: str | epath.Path) -> tuple[Any, Any, Any]:
    """(params, EMA params or None, model or None) of a weights source; the model is known
    only for a converted directory (its ``model.json``; a Hub source is converted into
    one), a workdir's or a state_dict file's comes from the config.
    Nothing is written there: the workdir may be another run's, still training."""
    source = checked_source(source)
    if (source / MODEL_INFO_FILE).exists():
        model, variables = load_converted(source)
        return variables['params'], None, model
    if _is_state_dict_file(source):  # its model comes from the config, and is checked there
        state_dict = torch_weights.official_to_timm_keys(load_state_dict_file(str(source)))
        flat = torch_weights.timm_to_flax_params(state_dict)
        params = traverse_util.unflatten_dict({k: np.asarray(v, np.float32)
                                               for k, v in flat.items()})
        return params, None, None
    with checkpoint.open_read_only(source) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))['state']
    return restored['params'], restored.get('ema_params'), None


def _is_state_dict_file(path: epath.Path) -> bool:
    return path.suffix in STATE_DICT_SUFFIXES and path.is_file()


def load_model(source: str | epath.Path, image_size: int, config=None) -> tuple[Any, Any]:
    """(model, params) of a weights source, the params checked to fit the model at
    ``image_size``: a converted directory and a Hub repository name their model; a
    training workdir's is the model of ``config``, else of the config its run saved
    (``config.json``); a state_dict file's, of ``config``."""
    params, _, model = load_params(source)
    if model is None and config is None:
        config = config_defaults.saved_config(source)
    return _with_model(source, params, model, config, image_size)


def _with_model(source: str | epath.Path, params: Any, model, config,
                image_size: int | None = None) -> tuple[Any, Any]:
    """(model, params): ``model`` when the source named it, else the model of ``config``
    (a UserError without one), ``params`` checked to fit it at ``image_size`` (default:
    the config's eval size) and in its block layout."""
    if model is not None:
        return model, params
    if config is None:
        raise UserError(f'{source} names no model (no {MODEL_INFO_FILE} or '
                        f'{config_defaults.SAVED_CONFIG_FILE} in it); give the config of '
                        'that model, e.g. --config=configs/imagenet.py for sequencer2d_s '
                        '(config= to sj.load).')
    head = params.get('head')
    model = config_defaults.model_from_config(config, head['kernel'].shape[-1] if head else 0)
    size = image_size or config.eval_image_size or config.image_size
    return model, fitted(params, model, size, source, config)


def check_params_fit(loaded: Any, expected: Any, source: str | epath.Path, config,
                     what: str | None = None) -> None:
    """A UserError naming the first parameter where ``loaded`` and ``expected`` (arrays or
    ShapeDtypeStructs) differ in name or shape: checkpoints of another model end here
    instead of deep inside Flax. ``source`` is the checkpoint's directory, named by
    ``what`` in the message (default: itself)."""
    difference = checkpoint.shape_difference(loaded, expected)
    if difference is None:
        return
    name, saved, wanted = difference
    saved_config = storage.resolve(source) / config_defaults.SAVED_CONFIG_FILE
    advice = (f'Use the model it was trained with: config.model in {saved_config} (or that '
              f'whole config: --config=configs/workdir.py:dir={source})'
              if saved_config.exists() else 'Use the config (and variant) it was trained with')
    raise UserError(
        f'{what or source} does not fit {config.model.name} with config.model.args: its '
        f"parameter {name} is {saved}, the model's {wanted}. {advice}.")


def fitted(params: Any, model, image_size: int, source: str | epath.Path, config) -> Any:
    """``params`` in ``model``'s block layout, after checking that they fit it (UserError
    otherwise, naming the first parameter that differs)."""
    params = layout.match_layout(params, model)
    images = jnp.zeros((1, image_size, image_size, model.in_chans))
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
    check_params_fit(params, expected, source, config, f'The checkpoint {source}')
    return params


def initial_params(config, model, params: Any) -> tuple[Any, str]:
    """``params`` replaced by the weights of ``config.init_from`` (fine-tuning); the
    classifier head is re-initialised when ``config.reinit_head`` or when its shape
    differs. Returns (params, what happened to the head, for the log)."""
    loaded, _, _ = load_params(config.init_from)
    loaded = dict(layout.match_layout(loaded, model))
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
