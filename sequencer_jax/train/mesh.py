"""The device mesh and how arrays are laid out on it.

``config.mesh`` names the axes and their sizes (``-1``: all remaining devices), e.g.
``[('data', -1), ('fsdp', 1)]``. Batches are split over both axes; parameters and
optimizer state follow ``config.param_rules``: ``(regex, rule)`` pairs matched against
each leaf's path (first match wins), where ``'fsdp'`` shards a leaf's largest dimension
that divides by the fsdp axis (leaves too small or without such a dimension stay
replicated) and ``'replicate'`` keeps a full copy on every device.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sequencer_jax.errors import UserError

BATCH_AXES = ('data', 'fsdp')
RULES = ('fsdp', 'replicate')
MIN_SHARDED_SIZE = 2**12  # smaller leaves are cheaper replicated than gathered


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with the named axis sizes; one -1 allowed."""
    devices = list(jax.devices() if devices is None else devices)
    if not all(_is_pair(a, str, int) for a in axes):
        raise UserError("config.mesh must be (name, size) pairs, e.g. (('data', -1), "
                         f"('fsdp', 1)), got {axes!r}.")
    names = tuple(name for name, _ in axes)
    if set(names) != set(BATCH_AXES) or len(names) != len(BATCH_AXES):
        raise UserError(f'config.mesh must name the axes {BATCH_AXES} once each, got {names}.')
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise UserError(f'config.mesh may use -1 for one axis only, got {list(axes)}.')
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f'config.mesh {list(axes)}: {len(devices)} devices do not divide '
                             f'by the fixed axis sizes ({known}).')
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(f'config.mesh {list(axes)} needs {math.prod(sizes)} devices but '
                         f'{len(devices)} are available; use -1 for one axis to fill them.')
    return Mesh(np.asarray(devices).reshape(sizes), names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 (the batch) split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _spec(rule: str, shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    if rule == 'replicate' or fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            return PartitionSpec(*([None] * d + ['fsdp']))
    return PartitionSpec()


def check_rules(rules: Sequence[tuple[str, str]]) -> None:
    if not all(_is_pair(r, str, str) for r in rules):
        raise UserError("config.param_rules must be (regex, rule) pairs, e.g. (('.*', "
                         f"'fsdp'),) (note the comma after a single pair), got {rules!r}.")
    for pattern, rule in rules:
        if rule not in RULES:
            raise UserError(f'Unknown param rule {rule!r} for {pattern!r}; expected {RULES}.')
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f'config.param_rules: {pattern!r} is not a regular expression '
                             f'({e}).') from None


def _is_pair(item: Any, first: type, second: type) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and \
        isinstance(item[0], first) and isinstance(item[1], second)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
    """A NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    check_rules(rules)
    fsdp = mesh.shape['fsdp']

    def leaf(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        rule = next((r for pattern, r in rules if re.search(pattern, name)), 'replicate')
        return NamedSharding(mesh, _spec(rule, tuple(x.shape), fsdp))

    return jax.tree_util.tree_map_with_path(leaf, tree)
