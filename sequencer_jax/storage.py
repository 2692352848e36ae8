"""Directories that may be local or in a bucket (``gs://``: what Cloud TPU pods write to).

Training workdirs, ``init_from`` sources and converted checkpoints go through
``resolve``, and every file operation on them through the ``epath.Path`` it returns
(``tf.io.gfile`` underneath for buckets, as for orbax and TFDS). Plain ``os.path``
would turn ``gs://bucket/run`` into a local directory ``./gs:/bucket/run`` on every host:
checkpoints that a preempted pod loses with its disks.
"""

from __future__ import annotations

import os

from etils import epath


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
