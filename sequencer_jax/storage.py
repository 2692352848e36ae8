"""Directories that may be local or in a bucket (``gs://``: what Cloud TPU pods write to).

Training workdirs, ``init_from`` sources, converted checkpoints and the CLIs' result files
(JSON, plots) go through ``resolve``, and every file operation on them through the
``epath.Path`` it returns (``tf.io.gfile`` underneath for buckets, as for orbax and
TFDS). Plain ``os.path`` would turn ``gs://bucket/run`` into a local directory
``./gs:/bucket/run`` on every host: checkpoints that a preempted pod loses with its disks.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from sequencer_jax.errors import UserError


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a bucket URL (``scheme://...``) unchanged, a local
    path with ``~`` expanded and made absolute (the working directory can change)."""
    text = os.fspath(path)
    if is_bucket(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_bucket(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://...``) rather than a local path."""
    return '://' in os.fspath(path)


def created_dir(path: str | os.PathLike, what: str) -> epath.Path:
    """``path`` resolved and created with its parents, or a UserError saying why
    ``what`` (e.g. ``'the workdir'``) cannot go there."""
    directory = resolve(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'Cannot create {what} {directory} ({e}); choose a directory you '
                         'can write to.') from None
    if not is_bucket(directory) and not os.access(directory, os.W_OK):
        raise UserError(f'{what[0].upper()}{what[1:]} {directory} is not writable; choose '
                         'a directory you can write to.')
    return directory


def output_file(path: str | os.PathLike) -> epath.Path:
    """A results file's path, its directory created now. Call it before the work whose
    results go there: a directory that cannot be made then stops the run at once instead
    of losing minutes of results at the end (UserError)."""
    target = resolve(path)
    created_dir(target.parent, 'the output directory')
    return target


def write_json(target: epath.Path, results: Any) -> None:
    """Writes ``results`` to ``target`` as indented JSON and says so."""
    target.write_text(json.dumps(results, indent=1))
    print(f'wrote {target}')


def write_figure(fig, path: str | os.PathLike) -> None:
    """Writes a matplotlib figure as a PNG to ``path`` (local or in a bucket)."""
    with resolve(path).open('wb') as f:
        fig.savefig(f, format='png')
