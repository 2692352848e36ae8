"""Where a model's weights come from and go to, below the training loop.

A weights source is a training workdir (the params and EMA params of its newest
checkpoint) or a directory written by ``python -m sequencer_jax.convert`` (orbax params
plus ``model.json``, which names the model), local or ``gs://``. The loop (resume,
``config.init_from``), ``evaluate``, the experiments and ``convert`` read them here, and
check here that they fit the model they are given to.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sequencer_jax import config_defaults, errors, storage
from sequencer_jax.errors import UserError
from sequencer_jax.models import layout, registry
from sequencer_jax.train import checkpoint

MODEL_INFO_FILE = 'model.json'
PARAMS_DIR = 'params'


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
                   variables: dict[str, Any], model_args: dict[str, Any] | None = None) -> None:
    """Writes ``variables`` as an orbax checkpoint plus ``model.json`` describing the model,
    into a new local or ``gs://`` directory."""
    output_dir = storage.resolve(output_dir)
    params_dir = output_dir / PARAMS_DIR
    if params_dir.exists():
        raise UserError(f'{params_dir} already exists; choose a new --output directory.')
    output_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, variables)
    (output_dir / MODEL_INFO_FILE).write_text(json.dumps(
        {'model': name, 'num_classes': num_classes, 'model_args': model_args or {}}, indent=1))


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


def checked_source(source: str | epath.Path) -> epath.Path:
    """``source`` resolved; a UserError unless it is a converted directory or a training
    workdir with checkpoints."""
    source = storage.resolve(source)
    if (source / MODEL_INFO_FILE).exists():
        return source
    manager = checkpoint.open_read_only(source)
    if manager is None:
        raise UserError(f'{source} is neither a converted checkpoint (python -m '
                        'sequencer_jax.convert) nor a training workdir with checkpoints.')
    manager.close()
    return source


def load_params(source: str | epath.Path) -> tuple[Any, Any, Any]:
    """(params, EMA params or None, model or None) of a weights source; the model is known
    only for a converted directory (its ``model.json``), a workdir's comes from its config.
    Nothing is written there: the workdir may be another run's, still training."""
    source = checked_source(source)
    if (source / MODEL_INFO_FILE).exists():
        model, variables = load_converted(source)
        return variables['params'], None, model
    with checkpoint.open_read_only(source) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))['state']
    return restored['params'], restored.get('ema_params'), None


def load_model(source: str | epath.Path, image_size: int) -> tuple[Any, Any]:
    """(model, params) of a weights source, the params checked to fit the model at
    ``image_size``: a converted directory names its model, a training workdir's is the
    model of the config its run saved (``config.json``)."""
    params, _, model = load_params(source)
    if model is None:
        config = config_defaults.saved_config(source)
        if config is None:
            raise UserError(f'{source} holds no {config_defaults.SAVED_CONFIG_FILE} naming '
                            'its model; give a converted directory or a training workdir.')
        head = params.get('head')
        model = config_defaults.model_from_config(
            config, head['kernel'].shape[-1] if head else 0)
        params = fitted(params, model, image_size, source, config)
    return model, params


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
