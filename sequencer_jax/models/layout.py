"""The two layouts of a Sequencer's block parameters, and conversion between them.

Unrolled (``scan_blocks=False``, timm's order): one subtree per block,
``stages_{i}_blocks_{j}``. Scanned (``scan_blocks=True``): one subtree per stage,
``stages_{i}_blocks/block``, whose leaves carry a leading axis of length ``layers[i]``.
Checkpoints of either layout load into a model of either (``match_layout``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def stack_stage_blocks(params: dict[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """Unrolled block params -> the scanned layout."""
    params = dict(params)
    for i, depth in enumerate(layers):
        blocks = [params.pop(f'stages_{i}_blocks_{j}') for j in range(depth)]
        params[f'stages_{i}_blocks'] = {
            'block': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def unstack_stage_blocks(params: dict[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """The scanned layout -> unrolled block params; the inverse of ``stack_stage_blocks``."""
    params = dict(params)
    for i, depth in enumerate(layers):
        stacked = params.pop(f'stages_{i}_blocks')['block']
        for j in range(depth):
            params[f'stages_{i}_blocks_{j}'] = jax.tree.map(lambda x, j=j: x[j], stacked)
    return params


def stacked_depths(params: dict[str, Any]) -> list[int] | None:
    """The block count of each stage of scanned params; None for unrolled ones."""
    depths = []
    while f'stages_{len(depths)}_blocks' in params:
        leaves = jax.tree.leaves(params[f'stages_{len(depths)}_blocks'])
        depths.append(leaves[0].shape[0])
    return depths or None


def match_layout(params: dict[str, Any], model) -> dict[str, Any]:
    """Block params in ``model``'s layout, whichever layout they were written in.
    Params with other block counts are returned as they are (a fit check then names the
    difference)."""
    unrolled = [sum(f'stages_{i}_blocks_{j}' in params for j in range(depth))
                for i, depth in enumerate(model.layers)]
    if model.scan_blocks and unrolled == list(model.layers):
        return stack_stage_blocks(params, model.layers)
    if not model.scan_blocks and stacked_depths(params) == list(model.layers):
        return unstack_stage_blocks(params, model.layers)
    return params


def holds_blocks(tree: Any) -> bool:
    """Whether ``tree`` is a params-shaped dict (params, EMA params, an optimizer moment)
    holding the first stage's blocks in either layout."""
    return isinstance(tree, dict) and ('stages_0_blocks' in tree or 'stages_0_blocks_0' in tree)


def match_state_layout(tree: Any, model) -> Any:
    """``match_layout`` applied to every params-shaped subtree of ``tree`` (a train state:
    params, EMA and the optimizer's moments alike)."""
    return jax.tree.map(lambda t: match_layout(t, model) if holds_blocks(t) else t, tree,
                        is_leaf=holds_blocks)
