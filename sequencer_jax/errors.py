"""The one exception type for bad input, and the message for a missing optional package."""

from __future__ import annotations

import importlib.util


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
