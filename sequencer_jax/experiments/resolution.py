"""Plots top-1 against input resolution for one or several evaluated checkpoints.

The rows come from ``python -m sequencer_jax.evaluate --resolutions ... --output_json``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from sequencer_jax import storage  # noqa: E402
from sequencer_jax.errors import UserError  # noqa: E402


def load_rows(path: str | os.PathLike) -> tuple[str, list[dict]]:
    """(label, rows) of an evaluate JSON file (local or in a bucket)."""
    data = json.loads(storage.resolve(path).read_text())
    if 'rows' not in data:
        raise UserError(f'{path} is not an evaluate --output_json file (no "rows").')
    return data.get('label') or data.get('checkpoint', path), data['rows']


def plot_resolution_sweep(curves: Sequence[tuple[str, list[dict]]],
                          output: str | os.PathLike,
                          title: str = 'Top-1 accuracy vs. input resolution') -> None:
    """Writes a PNG (local or in a bucket) with one line per (label, rows) curve."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, rows in curves:
        rows = sorted(rows, key=lambda r: r['resolution'])
        ax.plot([r['resolution'] for r in rows], [100 * r['top1'] for r in rows],
                marker='o', label=label)
    ax.set_xlabel('resolution (px)')
    ax.set_ylabel('top-1 (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    storage.write_figure(fig, output)
    plt.close(fig)
