"""PyTorch Sequencer weights (timm's or the official repository's keys) <-> Flax params.

    variables = from_torch_state_dict(state_dict, 'sequencer2d_s')
    state_dict = to_timm_state_dict(variables['params'])

Both directions are exact: converting timm's weights and back gives them bit for bit.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sequencer_jax.errors import UserError
from sequencer_jax.models import layout, registry


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


def num_classes_of(state_dict: Mapping[str, Any]) -> int:
    """The classifier width of a timm-keyed state_dict: 0 (features only) without a head.
    Either head array tells it, so that a state_dict missing the other is reported as
    missing that key, not as a model without a head."""
    for key in ('head.fc.weight', 'head.fc.bias'):
        if key in state_dict:
            return int(_to_numpy(state_dict[key]).shape[0])
    return 0


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
      UserError: naming the missing, unexpected or wrongly shaped keys.
    """
    timm_sd = official_to_timm_keys(state_dict)
    if num_classes is None:
        num_classes = num_classes_of(timm_sd)
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
        raise UserError('\n'.join(lines))
    params = {p: jnp.asarray(v, expected[p].dtype) for p, v in converted.items()}
    params = traverse_util.unflatten_dict(params)
    if scan_blocks:
        params = layout.stack_stage_blocks(params, model.layers)
    return {'params': params}


def to_timm_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params (either block layout) -> a timm state_dict of numpy arrays, for
    ``timm.create_model(name).load_state_dict({k: torch.from_numpy(v) ...})``; the inverse
    of ``from_torch_state_dict`` (timm's key names, PyTorch's layouts, float32)."""
    depths = layout.stacked_depths(params)
    if depths:  # scan_blocks: each stage's blocks along a leading axis
        params = layout.unstack_stage_blocks(params, depths)
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
