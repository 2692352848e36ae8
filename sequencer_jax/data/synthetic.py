"""The ``synthetic`` dataset: labelled random images made on the devices themselves.

No files, no TensorFlow, no host work: each global batch is one jitted call whose output
is already laid out over the mesh's batch axes, so a run measures the model and the
trainer without an input pipeline (as maxtext's synthetic data does), on any machine
with jax. Each class has a coarse 4x4 colour pattern; an image is its class's pattern,
upsampled, under unit Gaussian noise, so a model can learn it and a loss that falls
means the trainer works. The train stream's batch ``i`` and the eval split depend only
on ``config.seed``, so a resumed run repeats an uninterrupted one.

``config.dataset.synthetic`` sets the classes and the examples of each split; images
are ``config.image_size`` (train) or ``eval_image_size`` square.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

NAME = 'synthetic'
PATTERN_SIDE = 4
# fold_in tags of the root key's streams.
_TRAIN, _EVAL, _PATTERNS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """The dataset's generator: ``num_classes`` class patterns drawn from ``seed``."""

    num_classes: int
    seed: int
    name: str = NAME

    def train_batches(self, global_batch: int, image_size: int, first_batch: int,
                      sharding: jax.sharding.Sharding) -> Iterator[dict[str, jax.Array]]:
        """The endless train stream from its batch ``first_batch`` on: ``image [B, S, S,
        3]`` float32 and ``label [B]`` int32, placed by ``sharding``."""
        make = self._maker(global_batch, image_size, sharding)
        index = first_batch
        while True:
            batch = make(np.uint32(_TRAIN), np.uint32(index), np.int32(global_batch))
            yield {'image': batch['image'], 'label': batch['label']}
            index += 1

    def eval_batches(self, global_batch: int, image_size: int, num_examples: int,
                     sharding: jax.sharding.Sharding
                     ) -> tuple[Iterator[dict[str, jax.Array]], int]:
        """The eval split of ``num_examples`` in padded batches (``mask`` 0 past its end),
        and how many batches there are."""
        make = self._maker(global_batch, image_size, sharding)
        count = math.ceil(num_examples / global_batch)
        left = (num_examples - i * global_batch for i in range(count))
        return (make(np.uint32(_EVAL), np.uint32(i), np.int32(n))
                for i, n in enumerate(left)), count

    def _maker(self, global_batch: int, image_size: int, sharding: jax.sharding.Sharding):
        return _jitted_batch(self.seed, self.num_classes,
                             (global_batch, image_size, image_size, 3), sharding)


@functools.cache
def _jitted_batch(seed: int, num_classes: int, shape: tuple[int, int, int, int],
                  sharding: jax.sharding.Sharding):
    """``_batch`` jitted for these arguments, once: every evaluation asks for it again, and
    a new ``jax.jit`` of a new partial would compile again."""
    return jax.jit(functools.partial(_batch, seed=seed, num_classes=num_classes, shape=shape),
                   out_shardings=sharding)


def _batch(stream: jax.Array, index: jax.Array, real: jax.Array, *, seed: int,
           num_classes: int, shape: tuple[int, int, int, int]) -> dict[str, jax.Array]:
    """Batch ``index`` of ``stream``: ``image`` ``shape``, ``label [B]`` and ``mask [B]``
    (1 for the first ``real`` examples)."""
    root = jax.random.PRNGKey(seed)
    label_key, noise_key = jax.random.split(
        jax.random.fold_in(jax.random.fold_in(root, stream), index))
    patterns = jax.random.normal(jax.random.fold_in(root, _PATTERNS),
                                 (num_classes, PATTERN_SIDE, PATTERN_SIDE, 3))
    labels = jax.random.randint(label_key, shape[:1], 0, num_classes, jnp.int32)
    signal = jax.image.resize(patterns[labels], shape, 'nearest')
    images = signal + jax.random.normal(noise_key, shape)
    mask = (jnp.arange(shape[0]) < real).astype(jnp.int32)
    return {'image': images, 'label': labels, 'mask': mask}

