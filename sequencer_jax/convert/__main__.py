"""The conversion CLI: a ``.pth``, ``.safetensors`` or ``.npz`` file to a converted directory (an
orbax checkpoint plus ``model.json``) that ``evaluate``, the experiments and fine-tuning
read::

    python -m sequencer_jax.convert --input=sequencer2d_s.pth --model=sequencer2d_s \
        --output=/tmp/sequencer2d_s_jax

and back, a training workdir's (or a converted directory's) weights as a timm state_dict::

    python -m sequencer_jax.convert --to_timm --input=/tmp/run --output=run.safetensors
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from sequencer_jax import cli, errors, storage, weights
from sequencer_jax.errors import UserError
from sequencer_jax.models import registry
from sequencer_jax.models.torch_weights import (from_torch_state_dict, num_classes_of,
                                                official_to_timm_keys, to_timm_state_dict)

_INPUT = flags.DEFINE_string('input', None, '.pth, .pt, .safetensors or .npz file; with '
                             '--to_timm a training workdir or a converted directory')
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
    print(f'Wrote {len(state_dict)} arrays ({count:,} parameters{", EMA" if ema else ""}) to '
          f'{target}; in PyTorch: timm.create_model(NAME, num_classes='
          f'{state_dict["head.fc.weight"].shape[0]}).load_state_dict(...) with the tensors '
          'of that file (safetensors.torch.load_file, or torch.from_numpy of each npz array).')


if __name__ == '__main__':
    cli.run(main)
