"""The conversion CLI: a ``.pth``, ``.safetensors`` or ``.npz`` file to a converted directory (an
orbax checkpoint plus ``model.json``) that ``evaluate``, the experiments and fine-tuning
read::

    python -m sequencer_jax.convert --input=sequencer2d_s.pth --model=sequencer2d_s \
        --output=/tmp/sequencer2d_s_jax

and back, a training workdir's (or a converted directory's) weights as a timm state_dict::

    python -m sequencer_jax.convert --to_timm --input=/tmp/run --output=run.safetensors
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import flags

from sequencer_jax import cli, config_defaults, errors, hub, storage, weights
from sequencer_jax.errors import UserError
from sequencer_jax.models import registry
from sequencer_jax.models.torch_weights import (from_torch_state_dict, num_classes_of,
                                                official_to_timm_keys, to_timm_state_dict)

_INPUT = flags.DEFINE_string('input', None, '.pth, .pt, .safetensors or .npz file, or a Hub '
                             'repository (hf-hub:timm/sequencer2d_s.in1k; no --model needed); '
                             'with --to_timm a training workdir or a converted directory')
_TO_TIMM = flags.DEFINE_bool('to_timm', False, 'write the params of --input as a timm '
                             'state_dict (timm key names, PyTorch layouts) to --output, a '
                             'new .safetensors or .npz file')
for _name in ('model', 'output', 'num_classes', 'model_args', 'ema'):
    flags.declare_key_flag(_name)


def main(argv) -> None:
    del argv
    cli.require(_INPUT, cli.OUTPUT)
    if _TO_TIMM.value:
        if cli.MODEL.value or cli.NUM_CLASSES.value or cli.MODEL_ARGS.value != '{}':
            raise UserError('--to_timm reads the model from --input: drop --model, '
                            '--num_classes and --model_args.')
        export_timm(_INPUT.value, cli.OUTPUT.value, cli.EMA.value)
        return
    if cli.EMA.value:
        raise UserError('--ema goes with --to_timm.')
    if hub.is_hub_source(_INPUT.value):
        if cli.MODEL.value or cli.NUM_CLASSES.value or cli.MODEL_ARGS.value != '{}':
            raise UserError('A Hub repository names its model (its config.json): drop '
                            '--model, --num_classes and --model_args.')
        copy_hub_weights(_INPUT.value, cli.OUTPUT.value)
        return
    if cli.MODEL.value is None:
        raise UserError('--model is required: the registered variant the weights belong to, '
                        f'one of {", ".join(registry.list_models())}.')
    name = cli.MODEL.value
    model_args = registry.overrides_from_json(cli.MODEL_ARGS.value)
    registry.model_args(name)  # an unknown name, before the file is read
    state_dict = official_to_timm_keys(weights.load_state_dict_file(_INPUT.value))
    num_classes = cli.NUM_CLASSES.value or num_classes_of(state_dict)
    variables = from_torch_state_dict(state_dict, name, num_classes, **model_args)
    weights.save_converted(cli.OUTPUT.value, name, num_classes, variables, model_args)
    count = sum(x.size for x in jax.tree.leaves(variables))
    print(f'Wrote {name} ({num_classes} classes, {count:,} parameters) to {cli.OUTPUT.value}')


def copy_hub_weights(source: str, output: str) -> None:
    """A Hub source's weights (converted once into the cache) to a new directory."""
    directory = weights.hub_converted_dir(source)
    info = json.loads((directory / weights.MODEL_INFO_FILE).read_text())
    _, variables = weights.load_converted(directory)
    weights.save_converted(output, info['model'], info['num_classes'], variables,
                           info['model_args'], info.get('preprocessing'))
    print(f'Wrote {info["model"]} ({info["num_classes"]} classes) of {source} to {output}')


def export_timm(source: str, output: str, ema: bool) -> None:
    """The params (or EMA params) of ``source`` to a timm state_dict file."""
    if not output.endswith(('.safetensors', '.npz')):
        raise UserError(f'--output={output}: give a .safetensors or .npz file.')
    if output.endswith('.safetensors'):  # before reading a checkpoint it could not write
        errors.require_package('safetensors', 'writing .safetensors files (or give an .npz '
                               '--output)')
    target = storage.output_file(output)
    if target.exists():
        raise UserError(f'{target} already exists; choose a new --output file.')
    params, ema_params, _ = weights.load_params(source)
    if ema and ema_params is None:
        raise UserError(f'{source} holds no EMA weights (config.ema_decay was not set); '
                        'drop --ema.')
    state_dict = to_timm_state_dict(ema_params if ema else params)
    if output.endswith('.npz'):
        with target.open('wb') as f:
            np.savez(f, **state_dict)
    else:
        from safetensors.numpy import save  # an optional package, checked above
        target.write_bytes(save(state_dict, metadata={'format': 'pt'}))
    count = sum(x.size for x in state_dict.values())
    num_classes = state_dict['head.fc.weight'].shape[0] if 'head.fc.weight' in state_dict else 0
    print(f'Wrote {len(state_dict)} arrays ({count:,} parameters{", EMA" if ema else ""}) to '
          f'{target}; {_loading_hint(source, num_classes)}')


# The options of our models that timm's Sequencer2d takes under the same names.
TIMM_ARGS = ('layers', 'patch_sizes', 'embed_dims', 'hidden_sizes', 'mlp_ratios', 'in_chans',
             'bidirectional', 'union', 'with_fc')
# Sequencer2d's arguments that are always written out, so that the code shows the sizes
# (and its patch_sizes default, (7, 2, 2, 1), is not ours).
_SIZE_ARGS = ('layers', 'patch_sizes', 'embed_dims', 'hidden_sizes')
# The variants timm registers (timm.create_model), all with our architecture arguments.
TIMM_VARIANTS = ('sequencer2d_s', 'sequencer2d_m', 'sequencer2d_l')


def _loading_hint(source: str, num_classes: int) -> str:
    """How to load the written file in PyTorch, for the model of ``source``."""
    info_file = weights.checked_source(source) / weights.MODEL_INFO_FILE
    if info_file.exists():
        info = json.loads(info_file.read_text())
        name, model = info['model'], registry.create_model(info['model'], num_classes,
                                                            **info['model_args'])
    else:  # a training workdir: the model of the config its run saved
        config = config_defaults.saved_config(source)
        if config is None:  # a state_dict file, or a workdir without config.json
            return (f'in PyTorch, load it into the timm model of {source} with '
                    'load_state_dict.')
        name, model = config.model.name, config_defaults.model_from_config(config, num_classes)
    code = timm_model_code(name, model)
    if code is None:
        return (f'timm has no module for this model ({name}: cell {model.cell!r}, token '
                f'mixer {model.token_mixer!r}, position embedding '
                f'{model.pos_embed_grid is not None}); read it with sequencer-jax '
                '(--checkpoint=FILE with --config naming the model).')
    return (f'in PyTorch: {code}.load_state_dict(...) with the tensors of that file '
            '(safetensors.torch.load_file, or torch.from_numpy of each npz array).')


def timm_model_code(name: str, model) -> str | None:
    """Python that builds timm's model of ``model`` (registered here as ``name``):
    timm.create_model for a variant timm registers, timm's Sequencer2d class for another;
    None where timm has no module for it (a GRU or RNN cell, the 1D mixer of the
    vanilla Sequencer, a position embedding)."""
    if model.cell != 'lstm' or model.token_mixer != '2d' or model.pos_embed_grid is not None:
        return None
    classes = f'num_classes={model.num_classes}'
    if name in TIMM_VARIANTS and all(getattr(model, k) == getattr(
            registry.create_model(name), k) for k in TIMM_ARGS):
        return f'timm.create_model({name!r}, {classes})'
    defaults = registry.create_model('sequencer2d_s')  # Sequencer2d's other defaults
    custom = ', '.join(f'{k}={_python(getattr(model, k))}' for k in TIMM_ARGS
                       if k in _SIZE_ARGS or getattr(model, k) != getattr(defaults, k))
    return f'timm.models.sequencer.Sequencer2d({custom}, {classes})'


def _python(value) -> str:
    return repr(list(value)) if isinstance(value, (tuple, list)) else repr(value)


if __name__ == '__main__':
    cli.run(main)
