"""What the trainer needs of any dataset, without TensorFlow: its ``DatasetSpec``, each
process's share of a batch, and the checks of its classes and train split.

A ``DatasetSpec`` comes from ``open_dataset``: the TFDS pipeline (``data.pipeline``, which
imports TensorFlow) or the ``synthetic`` dataset (``data.synthetic``, which does not).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax

from sequencer_jax.data import synthetic
from sequencer_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the code needs to know of a prepared dataset. ``builder``: a TFDS
    builder, or the ``synthetic.Synthetic`` that makes the batches."""

    builder: Any
    train_split: str
    eval_split: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_key: str
    label_key: str
    multi_label: bool = False  # a Sequence of class labels (e.g. ImageNet-ReaL)

    @property
    def name(self) -> str:
        return self.builder.name


def open_dataset(config) -> DatasetSpec:
    """The classification dataset ``config`` (``config.dataset``) names: ``synthetic``
    (no TensorFlow) or a TFDS dataset, prepared on first use."""
    if config.name == synthetic.NAME:
        made = config.synthetic
        return DatasetSpec(synthetic.Synthetic(made.num_classes, made.seed), 'train', 'eval',
                           made.num_classes, made.train_examples, made.eval_examples,
                           'image', 'label')
    from sequencer_jax.data import pipeline  # TensorFlow: only for TFDS datasets
    return pipeline.dataset_spec(config)


def train_batches(spec: DatasetSpec, config, local_batch: int, start_example: int,
                  sharding: jax.sharding.Sharding) -> Iterator[dict[str, jax.Array]]:
    """The classification train stream of ``spec`` as global batches placed by ``sharding``,
    from this process's example ``start_example`` on (``config``: the whole config)."""
    if isinstance(spec.builder, synthetic.Synthetic):
        return spec.builder.train_batches(local_batch * jax.process_count(), config.image_size,
                                          start_example // local_batch, sharding)
    from sequencer_jax.data import pipeline
    return pipeline.GlobalBatches(
        pipeline.train_dataset(spec, config, local_batch, start_example), sharding,
        f'{spec.name} train', skippable=True)


def eval_batches(spec: DatasetSpec, config, local_batch: int, sharding: jax.sharding.Sharding
                 ) -> tuple[Iterator[dict[str, jax.Array]], int]:
    """The classification eval split of ``spec``, padded and masked, as global batches
    placed by ``sharding``, and how many there are."""
    if isinstance(spec.builder, synthetic.Synthetic):
        return spec.builder.eval_batches(local_batch * jax.process_count(),
                                         config.eval_image_size or config.image_size,
                                         spec.num_eval_examples, sharding)
    from sequencer_jax.data import pipeline
    ds, count = pipeline.eval_dataset(spec, config, local_batch)
    return pipeline.GlobalBatches(ds, sharding, f'{spec.name} eval'), count


def local_batch_size(global_batch: int) -> int:
    """This process's share of the global batch (``config_defaults.validate`` has checked
    that it divides)."""
    return global_batch // jax.process_count()


def check_num_classes(num_classes: int, spec: DatasetSpec, source: str) -> None:
    """A UserError when a classifier of ``num_classes`` cannot score every label of the
    dataset (labels past the last class would count as silently wrong)."""
    if num_classes < spec.num_classes:
        raise UserError(f'{source}: {num_classes} classes, but {spec.name} has '
                        f'{spec.num_classes}; use a model with at least as many.')


def check_train_split(spec: DatasetSpec) -> None:
    """A UserError naming the dataset's splits when its train split is missing or empty
    (a misspelt ``config.dataset.train_split``, or an evaluation-only dataset)."""
    if spec.num_train_examples == 0:
        raise UserError(f'{spec.name} has no examples in the train split '
                        f'{spec.train_split!r}; it has {sorted(spec.builder.info.splits)}. '
                        'Set config.dataset.train_split.')
