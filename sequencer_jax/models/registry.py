"""Registered Sequencer variants (timm's and the official repository's names)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from sequencer_jax.errors import UserError
from sequencer_jax.models.sequencer import Sequencer, Sequencer1D, Sequencer2D

_S = dict(layers=(4, 3, 8, 3), patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384),
          hidden_sizes=(48, 96, 96, 96), mlp_ratios=(3.0, 3.0, 3.0, 3.0))
_H2X = dict(_S, hidden_sizes=(96, 192, 192, 192))
_V_S = dict(layers=(4, 3, 8, 3), patch_sizes=(14, 1, 1, 1), embed_dims=(384, 384, 384, 384),
            hidden_sizes=(192, 192, 192, 192), mlp_ratios=(3.0, 3.0, 3.0, 3.0))

# name -> (module class, architecture arguments)
_VARIANTS: dict[str, tuple[type[Sequencer], dict[str, Any]]] = {
    'sequencer2d_s': (Sequencer2D, _S),
    'sequencer2d_m': (Sequencer2D, dict(_S, layers=(4, 3, 14, 3))),
    'sequencer2d_l': (Sequencer2D, dict(_S, layers=(8, 8, 16, 4))),
    'sequencer2d_s_unidirectional': (Sequencer2D, dict(_S, bidirectional=False)),
    'sequencer2d_s_add': (Sequencer2D, dict(_S, union='add')),
    'sequencer2d_s_h2x': (Sequencer2D, _H2X),
    'sequencer2d_s_without_fc': (Sequencer2D, dict(_S, with_fc=False)),
    'sequencer2d_vertical': (Sequencer2D, dict(_H2X, union='vertical', with_fc=False)),
    'sequencer2d_s_horizontal': (Sequencer2D, dict(_H2X, union='horizontal', with_fc=False)),
    'gru_sequencer2d_s': (Sequencer2D, dict(_S, cell='gru')),
    'rnn_sequencer2d_s': (Sequencer2D, dict(_S, cell='rnn')),
    'sequencer2d_l_d4_3x': (Sequencer2D, dict(
        _S, layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512),
        hidden_sizes=(64, 128, 128, 128))),
    'v_sequencer_s': (Sequencer1D, _V_S),
    'v_sequencer_s_h': (Sequencer1D, dict(_V_S, patch_sizes=(7, 2, 1, 1),
                                          embed_dims=(192, 384, 384, 384),
                                          hidden_sizes=(96, 192, 192, 192))),
    # The official model learns a position embedding for the 16x16 grid of 224 px.
    'v_sequencer_s_pe': (Sequencer1D, dict(_V_S, pos_embed_grid=(16, 16))),
}


def list_models() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(_VARIANTS)


def model_args(name: str) -> dict[str, Any]:
    """The architecture arguments of a registered variant."""
    if name not in _VARIANTS:
        raise UserError(f'Unknown model {name!r}. Registered models: {", ".join(list_models())}.')
    return dict(_VARIANTS[name][1])


def overrides_from_json(text: str) -> dict[str, Any]:
    """``create_model`` overrides from a JSON object, as the CLIs' ``--model_args``
    give them: '{"scan_blocks": true}' -> {'scan_blocks': True}."""
    example = 'e.g. \'{"scan_blocks": true, "unroll": 2}\''
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f'--model_args {text!r} is not valid JSON ({e}); write a JSON '
                         f'object, {example}.') from None
    if not isinstance(overrides, dict):
        raise UserError(f'--model_args {text!r} must be a JSON object of model options, '
                         f'{example}.')
    return overrides


def create_model(name: str, num_classes: int = 1000, dtype: Any = jnp.float32,
                 **overrides: Any) -> Sequencer:
    """Builds a registered variant.

    Args:
      name: one of ``list_models()``.
      num_classes: classifier width; 0 returns pooled features.
      dtype: compute dtype (parameters stay in ``param_dtype``, float32 by default).
      **overrides: any field of ``Sequencer`` (e.g. ``drop_path_rate=0.1``,
        ``scan_blocks=True``, ``remat=True``, ``layers=(1, 1, 1, 1)``).
    """
    args = model_args(name)
    cls = _VARIANTS[name][0]
    fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f'Unknown option(s) {unknown} for model {name!r}. '
                         f'Valid options: {sorted(fields)}.')
    # Configs and JSON give lists; module fields must be hashable.
    args.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return cls(num_classes=num_classes, dtype=dtype, **args)
