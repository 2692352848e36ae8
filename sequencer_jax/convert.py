"""PyTorch Sequencer weights (timm or the official repository) <-> Flax variables.

Library use::

    variables = sequencer_jax.convert.from_torch_state_dict(state_dict, 'sequencer2d_s')
    state_dict = sequencer_jax.convert.to_timm_state_dict(variables['params'])

Command line (writes an orbax checkpoint that ``evaluate`` and fine-tuning load)::

    python -m sequencer_jax.convert --input sequencer2d_s.pth --model sequencer2d_s \
        --output /tmp/sequencer2d_s_jax

and back, a training workdir's (or a converted directory's) weights for timm::

    python -m sequencer_jax.convert --to-timm --input /tmp/run --output run.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sequencer_jax import arguments, storage
from sequencer_jax.models import registry

MODEL_INFO_FILE = 'model.json'
PARAMS_DIR = 'params'


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch.Tensor; torch itself is not imported here.
        value = value.detach().cpu().float().numpy() if value.is_floating_point() \
            else value.detach().cpu().numpy()
    return np.asarray(value)


def official_to_timm_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames the official repository's keys to timm's (as timm's checkpoint_filter_fn).

    Official: ``blocks.{stage}.{j}.*`` with the next stage's downsample conv at
    ``blocks.{stage}.{depth}.down``, and ``head.*``. timm: ``stages.{stage}.blocks.{j}.*``,
    ``stages.{stage + 1}.downsample.down``, ``head.fc.*``. timm keys pass unchanged.
    """
    for wrapper in ('model', 'state_dict', 'model_ema'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if any(k.startswith('stages.') for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r'^blocks\.(\d+)\.(\d+)\.down\.',
                     lambda m: f'stages.{int(m.group(1)) + 1}.downsample.down.', key)
        key = re.sub(r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.', key)
        key = re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', key)
        out[key] = value
    return out


_RNN_KEY = re.compile(r'^(.*)\.(weight_ih|weight_hh|bias_ih|bias_hh)_l0(_reverse)?$')
_RNN_NAMES = {'weight_ih': 'w_ih', 'weight_hh': 'w_hh', 'bias_ih': 'b_ih', 'bias_hh': 'b_hh'}


def _flax_path(timm_key: str) -> tuple[str, ...]:
    """The Flax parameter path of one timm key (RNN keys handled separately)."""
    key = timm_key
    key = re.sub(r'^stem\.proj\.', 'stem.', key)
    key = re.sub(r'^stages\.(\d+)\.downsample\.down\.', r'stages_\1_downsample.', key)
    key = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages_\1_blocks_\2.', key)
    key = re.sub(r'^head\.fc\.', 'head.', key)
    parts = key.split('.')
    if parts[-1] == 'weight':
        parts[-1] = 'scale' if 'norm' in parts[-2] else 'kernel'
    return tuple(parts)


def _kernel_layout(path: tuple[str, ...], value: np.ndarray, to_flax: bool) -> np.ndarray:
    """A kernel from PyTorch's layout to Flax's (``to_flax``) or back: conv
    [out, in, kh, kw] <-> [kh, kw, in, out], linear [out, in] <-> [in, out]."""
    if path[-1] == 'kernel' and value.ndim == 4:
        return value.transpose((2, 3, 1, 0) if to_flax else (3, 2, 0, 1))
    if path[-1] == 'kernel' and value.ndim == 2:
        return value.T
    return value


def timm_to_flax_params(state_dict: Mapping[str, Any]) -> dict[tuple[str, ...], np.ndarray]:
    """timm-named arrays -> flat Flax params {path: array}, before any shape check."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    rnn: dict[tuple[str, ...], dict[bool, np.ndarray]] = {}
    for key, value in state_dict.items():
        value = _to_numpy(value)
        m = _RNN_KEY.match(key)
        if m:
            path = _flax_path(m.group(1) + '.x')[:-1] + (_RNN_NAMES[m.group(2)],)
            w = value.T if value.ndim == 2 else value
            rnn.setdefault(path, {})[bool(m.group(3))] = w
        else:
            path = _flax_path(key)
            flat[path] = _kernel_layout(path, value, to_flax=True)
    for path, directions in rnn.items():
        flat[path] = np.stack([directions[r] for r in sorted(directions)])
    return flat


def _expected_params(model) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    s = model.total_stride
    grid = model.pos_embed_grid or (1, 1)
    images = jnp.zeros((1, grid[0] * s, grid[1] * s, model.in_chans), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    return traverse_util.flatten_dict(shapes['params'])


def _num_classes(state_dict: Mapping[str, Any]) -> int:
    head = state_dict.get('head.fc.weight')
    return 0 if head is None else int(_to_numpy(head).shape[0])


def from_torch_state_dict(state_dict: Mapping[str, Any], name: str,
                          num_classes: int | None = None,
                          **overrides: Any) -> dict[str, Any]:
    """Converts a PyTorch Sequencer state_dict into Flax variables ``{'params': ...}``.

    Args:
      state_dict: name -> array (numpy arrays or torch tensors), with timm's key names
        or the official repository's (``model``/``state_dict`` wrappers are unwrapped).
      name: the registered variant the weights belong to (``list_models()``).
      num_classes: classifier width; inferred from the head weights when None.
      **overrides: model options that change the parameter layout, e.g.
        ``scan_blocks=True`` stacks each stage's blocks as ``nn.scan`` expects.

    Raises:
      ValueError: naming the missing, unexpected or wrongly shaped keys.
    """
    timm_sd = official_to_timm_keys(state_dict)
    if num_classes is None:
        num_classes = _num_classes(timm_sd)
    scan_blocks = overrides.pop('scan_blocks', False)
    model = registry.create_model(name, num_classes=num_classes, **overrides)
    converted = timm_to_flax_params(timm_sd)
    expected = _expected_params(model)
    as_key = lambda path: '/'.join(path)  # noqa: E731
    missing = sorted(as_key(p) for p in expected.keys() - converted.keys())
    unexpected = sorted(as_key(p) for p in converted.keys() - expected.keys())
    wrong = sorted(f'{as_key(p)}: got {converted[p].shape}, expected {expected[p].shape}'
                   for p in expected.keys() & converted.keys()
                   if converted[p].shape != expected[p].shape)
    if missing or unexpected or wrong:
        lines = [f'The state_dict does not match {name!r} with {num_classes} classes.']
        if missing:
            lines.append(f'Missing (no torch key maps to): {missing}')
        if unexpected:
            lines.append(f'Unexpected (Flax paths from torch keys): {unexpected}')
        if wrong:
            lines.append(f'Wrong shapes: {wrong}')
        lines.append('Check the model name, or pass num_classes / overrides '
                     '(e.g. bidirectional, union) matching the checkpoint.')
        raise ValueError('\n'.join(lines))
    params = {p: jnp.asarray(v, expected[p].dtype) for p, v in converted.items()}
    params = traverse_util.unflatten_dict(params)
    if scan_blocks:
        params = stack_stage_blocks(params, model.layers)
    return {'params': params}


def stack_stage_blocks(params: dict[str, Any], layers) -> dict[str, Any]:
    """Unrolled block params (``stages_i_blocks_j``) -> the ``scan_blocks=True`` layout.

    Each stage's blocks become one subtree ``stages_i_blocks/block`` whose leaves carry a
    leading axis of length ``layers[i]``.
    """
    params = dict(params)
    for i, depth in enumerate(layers):
        blocks = [params.pop(f'stages_{i}_blocks_{j}') for j in range(depth)]
        params[f'stages_{i}_blocks'] = {
            'block': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def unstack_stage_blocks(params: dict[str, Any], layers) -> dict[str, Any]:
    """The ``scan_blocks=True`` layout -> unrolled block params (``stages_i_blocks_j``);
    the inverse of ``stack_stage_blocks``."""
    params = dict(params)
    for i, depth in enumerate(layers):
        stacked = params.pop(f'stages_{i}_blocks')['block']
        for j in range(depth):
            params[f'stages_{i}_blocks_{j}'] = jax.tree.map(lambda x, j=j: x[j], stacked)
    return params


def to_timm_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params (either block layout) -> a timm state_dict of numpy arrays, for
    ``timm.create_model(name).load_state_dict({k: torch.from_numpy(v) ...})``; the inverse
    of ``from_torch_state_dict`` (timm's key names, PyTorch's layouts, float32)."""
    stacked = sum(bool(re.fullmatch(r'stages_\d+_blocks', k)) for k in params)
    if stacked:  # scan_blocks: each stage's blocks along a leading axis
        params = unstack_stage_blocks(params, [
            len(jax.tree.leaves(params[f'stages_{i}_blocks'])[0]) for i in range(stacked)])
    torch_names = {v: k for k, v in _RNN_NAMES.items()}
    state_dict = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        if path[-1] in torch_names:  # [directions, ...]: forward, then reverse
            prefix = _timm_key(path[:-1] + ('x',))[:-len('.x')]
            for direction, w in enumerate(value):
                suffix = '_reverse' if direction else ''
                state_dict[f'{prefix}.{torch_names[path[-1]]}_l0{suffix}'] = \
                    np.ascontiguousarray(w.T if w.ndim == 2 else w)
        else:
            state_dict[_timm_key(path)] = np.ascontiguousarray(
                _kernel_layout(path, value, to_flax=False))
    return state_dict


def _timm_key(path: tuple[str, ...]) -> str:
    """The timm key of one Flax parameter path; the inverse of ``_flax_path``."""
    *parts, leaf = path
    key = '.'.join([*parts, 'weight' if leaf in ('scale', 'kernel') else leaf])
    key = re.sub(r'^stem\.', 'stem.proj.', key)
    key = re.sub(r'^stages_(\d+)_downsample\.', r'stages.\1.downsample.down.', key)
    key = re.sub(r'^stages_(\d+)_blocks_(\d+)\.', r'stages.\1.blocks.\2.', key)
    return re.sub(r'^head\.', 'head.fc.', key)


def load_state_dict_file(path: str) -> dict[str, Any]:
    """Reads a state_dict from ``.pth``/``.pt`` (as data: ``weights_only=True``),
    ``.safetensors`` or ``.npz`` (one array per key)."""
    if not os.path.exists(path):
        raise ValueError(f'No such checkpoint file: {path}')
    if path.endswith('.npz'):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.endswith('.safetensors'):
        from safetensors.numpy import load_file
        return load_file(path)
    try:
        import torch
    except ImportError as e:
        raise ValueError('Reading .pth files needs PyTorch: pip install "sequencer-jax[torch]" '
                         '(or convert the file to .safetensors elsewhere).') from e
    return torch.load(path, map_location='cpu', weights_only=True)


def save_converted(output_dir: str | os.PathLike, name: str, num_classes: int,
                   variables: dict[str, Any], model_args: dict[str, Any] | None = None) -> None:
    """Writes ``variables`` as an orbax checkpoint plus ``model.json`` describing the model,
    into a new local or ``gs://`` directory."""
    import orbax.checkpoint as ocp
    output_dir = storage.resolve(output_dir)
    params_dir = output_dir / PARAMS_DIR
    if params_dir.exists():
        raise ValueError(f'{params_dir} already exists; choose a new --output directory.')
    output_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, variables)
    (output_dir / MODEL_INFO_FILE).write_text(json.dumps(
        {'model': name, 'num_classes': num_classes, 'model_args': model_args or {}}, indent=1))


def load_converted(path: str | os.PathLike):
    """Reads a directory written by ``save_converted``: (Flax model, variables)."""
    import orbax.checkpoint as ocp
    path = storage.resolve(path)
    info_file = path / MODEL_INFO_FILE
    if not info_file.exists():
        raise ValueError(f'{path} is not a converted checkpoint (no {MODEL_INFO_FILE}); '
                         'create one with python -m sequencer_jax.convert.')
    info = json.loads(info_file.read_text())
    model = registry.create_model(info['model'], info['num_classes'], **info['model_args'])
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(path / PARAMS_DIR)
    return model, variables


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog='python -m sequencer_jax.convert',
        description='Convert PyTorch Sequencer weights (timm or official) to an orbax '
                    'checkpoint for sequencer-jax; with --to-timm, the other way.')
    parser.add_argument('--input', required=True,
                        help='.pth, .pt, .safetensors or .npz file; with --to-timm a training '
                             'workdir or a converted directory')
    parser.add_argument('--model', choices=registry.list_models(),
                        help='the variant the weights belong to (not with --to-timm)')
    parser.add_argument('--output', required=True,
                        help='new directory to write; with --to-timm a new .safetensors or '
                             '.npz file')
    parser.add_argument('--num-classes', type=arguments.at_least(1), default=None,
                        help='classifier width (default: read from the head weights)')
    parser.add_argument('--model-args', default='{}',
                        help='JSON object of architecture overrides for a custom-sized '
                             'model, e.g. \'{"layers": [2, 2, 4, 2]}\'')
    parser.add_argument('--to-timm', action='store_true',
                        help='write the params of --input as a timm state_dict (timm key '
                             'names, PyTorch layouts)')
    parser.add_argument('--ema', action='store_true',
                        help='with --to-timm: the EMA weights of a training workdir')
    args = parser.parse_args(argv)
    if args.to_timm:
        if args.model or args.num_classes or args.model_args != '{}':
            parser.error('--to-timm reads the model from --input: drop --model, '
                         '--num-classes and --model-args.')
        _export_timm(parser, args.input, args.output, args.ema)
        return
    if args.ema:
        parser.error('--ema goes with --to-timm.')
    if args.model is None:
        parser.error('--model is required: the registered variant the weights belong to.')
    try:
        model_args = registry.overrides_from_json(args.model_args)
        state_dict = official_to_timm_keys(load_state_dict_file(args.input))
        num_classes = args.num_classes if args.num_classes is not None \
            else _num_classes(state_dict)
        variables = from_torch_state_dict(state_dict, args.model, num_classes, **model_args)
        save_converted(args.output, args.model, num_classes, variables, model_args)
    except ValueError as e:
        parser.exit(2, f'error: {e}\n')
    count = sum(x.size for x in jax.tree.leaves(variables))
    print(f'Wrote {args.model} ({num_classes} classes, {count:,} parameters) to {args.output}')


def _export_timm(parser: argparse.ArgumentParser, source: str, output: str,
                 ema: bool) -> None:
    """``--to-timm``: the params (or EMA params) of ``source`` to a state_dict file."""
    from sequencer_jax.train import loop  # TensorFlow and orbax: only for this direction
    try:
        if not output.endswith(('.safetensors', '.npz')):
            raise ValueError(f'--output={output}: give a .safetensors or .npz file.')
        if output.endswith('.safetensors'):  # before reading a checkpoint it could not write
            try:
                from safetensors.numpy import save
            except ImportError:
                raise ValueError('writing .safetensors needs the safetensors package: pip '
                                 'install safetensors (or give an .npz --output).') from None
        target = storage.output_file(output)
        if target.exists():
            raise ValueError(f'{target} already exists; choose a new --output file.')
        params, ema_params, _ = loop.load_checkpoint_params(source)
        if ema and ema_params is None:
            raise ValueError(f'{source} holds no EMA weights (config.ema_decay was not set); '
                             'drop --ema.')
        state_dict = to_timm_state_dict(ema_params if ema else params)
    except ValueError as e:
        parser.exit(2, f'error: {e}\n')
    if output.endswith('.npz'):
        with target.open('wb') as f:
            np.savez(f, **state_dict)
    else:
        target.write_bytes(save(state_dict, metadata={'format': 'pt'}))
    count = sum(x.size for x in state_dict.values())
    print(f'Wrote {len(state_dict)} arrays ({count:,} parameters{", EMA" if ema else ""}) to '
          f'{target}; in PyTorch: timm.create_model(NAME, num_classes='
          f'{state_dict["head.fc.weight"].shape[0]}).load_state_dict(...) with the tensors '
          'of that file (safetensors.torch.load_file, or torch.from_numpy of each npz array).')


if __name__ == '__main__':
    main()
