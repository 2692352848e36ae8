"""Huge pages for XLA's host buffers: the CLIs re-run themselves once with them on.

XLA:CPU allocates each step's temporaries afresh through glibc's malloc (2.2 GB per
train step of sequencer2d_s at batch 8), which takes large blocks straight from the
kernel and returns them on free. Where the kernel's transparent-huge-page mode is
``madvise`` (Ubuntu's default, and this project's CPU machine's), every 4 KiB page of
them then faults and is zeroed on first touch, every step.
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes malloc ask for 2 MiB
pages instead. glibc reads its tunables only when a process starts, so
``python -m sequencer_jax.main``, ``.evaluate`` and ``.benchmark`` re-execute
themselves once with the tunable added (same PID, same arguments; nothing has run
yet). Measured on 2-core Xeon and EPYC machines (README, "Benchmark").

``SEQUENCER_JAX_HUGETLB=0`` (or ``false``, ``no``, ``off``), any ``glibc.malloc.hugetlb``
setting of your own in ``GLIBC_TUNABLES``, or another malloc in ``LD_PRELOAD`` leaves the
process as it is; another value of the variable stops the CLI with a message, before
any work.
Library code never re-executes anything; only the CLIs' ``__main__`` calls
``rerun_with_huge_pages``.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

from sequencer_jax.errors import UserError

THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'SEQUENCER_JAX_HUGETLB'
# Allocators users preload in place of glibc's malloc (e.g. tcmalloc on TPU VMs).
OTHER_MALLOCS = ('tcmalloc', 'jemalloc', 'mimalloc')
OPT_OUT_VALUES = {'0': False, 'false': False, 'no': False, 'off': False,
                  '1': True, 'true': True, 'yes': True, 'on': True, '': True}


def transparent_hugepages(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode ('always', 'madvise' or 'never'), None where unknown."""
    try:
        with open(path) as f:
            return f.read().split('[')[1].split(']')[0]
    except (OSError, IndexError):
        return None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None for another C library."""
    try:
        name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
        major, minor = version.split('.')[:2]
        return (int(major), int(minor)) if name == 'glibc' else None
    except (AttributeError, OSError, ValueError):
        return None


def huge_page_environment(environ: Mapping[str, str], thp_mode: str | None,
                          glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """``environ`` with the tunable added, or None where a re-run would change nothing
    (THP already on for all memory or off, no or an older glibc, another malloc
    preloaded, opted out, or the tunable already set either way). Raises UserError
    for a value of ``SEQUENCER_JAX_HUGETLB`` that is not one of ``OPT_OUT_VALUES``."""
    wanted = OPT_OUT_VALUES.get(environ.get(OPT_OUT, '').strip().lower())
    if wanted is None:
        raise UserError(f'{OPT_OUT}={environ[OPT_OUT]!r} is not understood: set it to 0 '
                         'to keep 4 KiB pages for malloc, or unset it (or 1) to let the '
                         'CLI turn huge pages on where the kernel needs asking.')
    tunables = environ.get('GLIBC_TUNABLES', '')
    preloaded = environ.get('LD_PRELOAD', '')
    if (not wanted or thp_mode != 'madvise' or glibc is None
            or glibc < (2, 35) or f'{TUNABLE}=' in tunables
            or any(name in preloaded for name in OTHER_MALLOCS)):
        return None
    return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, f'{TUNABLE}=1'])))


def rerun_with_huge_pages() -> None:
    """Re-executes this Python process with huge pages for malloc where that helps;
    returns only where it does not. ``cli.run`` calls it first thing. A UserError for a
    value of ``SEQUENCER_JAX_HUGETLB`` it does not understand."""
    environ = huge_page_environment(os.environ, transparent_hugepages(), glibc_version())
    if environ is None or not sys.executable:  # embedded Pythons cannot be re-run
        return
    print(f'sequencer_jax: re-running with GLIBC_TUNABLES={environ["GLIBC_TUNABLES"]} '
          f'(huge pages for XLA\'s buffers; {OPT_OUT}=0 turns this off)',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError as e:
        print(f'sequencer_jax: could not re-run {sys.executable} ({e}); continuing with '
              '4 KiB pages', file=sys.stderr, flush=True)
