"""Semantic segmentation's metrics, as mmsegmentation's ``IoUMetric`` computes them.

Every labelled pixel of every image is counted once in a confusion matrix (rows: label,
columns: prediction; ``ignore_label`` pixels excluded); the metrics come from the matrix
summed over the whole split, not from per-image means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     valid: jax.Array) -> jax.Array:
    """int32 ``[K, K]``: pixels of label i predicted as j, over the pixels where ``valid``.
    labels, predictions, valid: ``[B, H, W]``."""
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def scores(confusion: np.ndarray) -> dict[str, float]:
    """``miou``, ``macc`` and ``aacc`` (fractions) of a summed confusion matrix.

    A class's IoU is intersection / union (pixels labelled or predicted as it); its
    accuracy, intersection / pixels labelled as it. Classes whose IoU (accuracy) is
    undefined, 0 / 0, are left out of the mean, as mmsegmentation's nanmean does: a
    class absent from the split's labels and never predicted counts in neither mean, one
    absent from the labels but predicted has IoU 0 and no accuracy.
    """
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    labelled, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    union = labelled + predicted - intersection
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = intersection / union
        accuracy = intersection / labelled
    return {'miou': _nanmean(iou), 'macc': _nanmean(accuracy),
            'aacc': float(intersection.sum() / max(labelled.sum(), 1.0))}


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float('nan')
