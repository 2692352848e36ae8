"""The one exception type for bad input, the message for a missing optional package, and
how a failure of process 0 reaches the other processes of a job."""

from __future__ import annotations

import importlib.util
from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar('T')


class UserError(ValueError):
    """Input the user can fix: a config value, a dataset, a checkpoint that does not fit, a
    disk without room. The message says what was wrong and what to do, in one or two
    sentences; every CLI prints it as ``error: MESSAGE`` and exits with status 1. A
    ``ValueError``, so that library callers can catch it as one."""


def require_package(module: str, purpose: str, pip_name: str | None = None,
                    extra: str | None = None) -> None:
    """A UserError naming how to install ``module`` (for ``purpose``, e.g. 'writing
    .safetensors files') unless it can be imported; checked before any work that needs it.
    ``extra``: the sequencer-jax extra that brings it, spelt for a checkout and for an
    installed package."""
    if importlib.util.find_spec(module) is not None:
        return
    how = f'pip install {pip_name or module}'
    if extra:
        how = (f'pip install -e ".[{extra}]" in a checkout of sequencer-jax, or '
               f'pip install "sequencer-jax[{extra}]"')
    raise UserError(f'{purpose[0].upper()}{purpose[1:]} needs the {pip_name or module} '
                    f'package: {how}.')


def on_process_zero(action: Callable[[], T], failed_there: Callable[[], Exception]) -> T | None:
    """``action()`` on process 0 alone, then a collective in which every process learns
    whether it raised: process 0 raises its error again, the others ``failed_there()``,
    instead of going on without what process 0 was to do (or waiting for it forever).
    Returns ``action()``'s result on process 0 and None on the others; with one process,
    just ``action()``."""
    if jax.process_count() == 1:
        return action()
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = action()
        except Exception as e:  # noqa: BLE001 - raised again below, once the others know
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
        raise error
    if failed:
        raise failed_there()
    return result
