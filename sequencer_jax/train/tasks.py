"""What the training loop asks of a task: its data, model, loss, evaluation and summary.

The loop (``train.loop``) is one for every task: mesh, sharding, checkpoints, resume,
metrics and preemption know nothing of images' labels. A task supplies the rest:

- ``dataset()``: the prepared dataset's ``DatasetSpec``, checked before any work;
- ``model(spec)`` and ``initial_params(model, fresh)`` (fine-tuning from ``init_from``);
- ``train_batches`` / ``eval_batches``: iterators of global batches (``jax.Array``s
  placed by the batch sharding), the eval split padded and masked;
- ``train_step``: ``steps.train_step`` with the task's loss (and on-device batch
  transform) bound, to jit;
- ``eval_step`` (one batch's sums) and ``summarise`` (a split's totals -> metrics);
- ``describe()`` (the model, for the log) and ``summary(final)``: the line printed after
  training.

``config.task`` names it: 'classification' or 'segmentation'.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequencer_jax import config_defaults, weights
from sequencer_jax.data import batches
from sequencer_jax.errors import UserError
from sequencer_jax.models import layout, segmentation as seg_models
from sequencer_jax.train import segmentation_metrics, steps


class Classification:
    """Image classification: softmax cross-entropy with mixup/cutmix, top-1/top-5."""

    def __init__(self, config):
        self.config = config

    def dataset(self) -> batches.DatasetSpec:
        spec = batches.open_dataset(self.config.dataset)
        batches.check_train_split(spec)
        batches.check_num_classes(self.num_classes(spec), spec, 'config.model.num_classes')
        return spec

    def num_classes(self, spec: batches.DatasetSpec) -> int:
        return self.config.model.num_classes or spec.num_classes

    def model(self, spec: batches.DatasetSpec):
        return config_defaults.model_from_config(self.config, self.num_classes(spec))

    def initial_params(self, model, fresh: Any) -> tuple[Any, str]:
        return weights.initial_params(self.config, model, fresh)

    def train_batches(self, spec, local_batch: int, start_example: int, sharding):
        return batches.train_batches(spec, self.config, local_batch, start_example, sharding)

    def eval_batches(self, spec, local_batch: int, sharding):
        return batches.eval_batches(spec, self.config, local_batch, sharding)

    def train_step(self, model, tx, ema_decay: float | None, accum_steps: int):
        augment = self.config.augment
        return steps.classification_train_step(
            model=model, tx=tx, ema_decay=ema_decay, accum_steps=accum_steps, mix=dict(
                mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha,
                switch_prob=augment.switch_prob, smoothing=augment.label_smoothing))

    def eval_step(self, model):
        return functools.partial(steps.eval_step, model=model)

    def summarise(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        return steps.classification_metrics(totals)

    def describe(self) -> str:
        return self.config.model.name

    def summary(self, final: dict[str, float]) -> str:
        line = f"Final eval: top-1 {final['eval/top1']:.4f}, top-5 {final['eval/top5']:.4f}"
        if 'eval_ema/top1' in final:
            line += f", EMA top-1 {final['eval_ema/top1']:.4f}"
        return line


# A classifier's parameters after its last stage.
CLASSIFIER_TOP = ('norm', 'head')


class Segmentation:
    """Semantic segmentation: a Sequencer backbone with UperNet (and an auxiliary FCN
    head), pixel cross-entropy over the labelled pixels, mIoU/mAcc/aAcc."""

    def __init__(self, config):
        self.config = config
        self.seg = config.segmentation

    def dataset(self) -> batches.DatasetSpec:
        from sequencer_jax.data import segmentation as seg_data  # TensorFlow
        spec = seg_data.dataset_spec(self.config, self.config.model.num_classes)
        batches.check_train_split(spec)
        seg_data.check_first_example(spec, self.config)
        return spec

    def model(self, spec: batches.DatasetSpec) -> seg_models.SequencerUperNet:
        backbone = config_defaults.model_from_config(self.config, 0)
        return seg_models.SequencerUperNet(backbone, spec.num_classes, self.seg.channels,
                                           self.seg.aux_channels, backbone.dtype)

    def describe(self) -> str:
        return f'{self.config.model.name} with UperNet'

    def initial_params(self, model, fresh: Any) -> tuple[Any, str]:
        """``fresh`` with its backbone from ``config.init_from``: a classifier's weights
        (its final norm and head, which the pyramid does not use, dropped) or a
        segmentation run's backbone; the heads stay new."""
        loaded, _, _ = weights.load_params(self.config.init_from)
        backbone = {k: v for k, v in loaded.get('backbone', loaded).items()
                    if k not in CLASSIFIER_TOP}
        backbone = layout.match_layout(backbone, model.backbone)
        weights.check_params_fit(backbone, fresh['backbone'], self.config.init_from,
                                 self.config,
                                 f'config.init_from={self.config.init_from!r} (the backbone)')
        params = dict(fresh) | {'backbone': jax.tree.map(
            lambda new, old: jnp.asarray(new, old.dtype), backbone, fresh['backbone'])}
        return params, 'the backbone loaded, new heads'

    def load(self, checkpoint_dir: str, use_ema: bool = False):
        """(model, params, spec) of a segmentation run's checkpoint, for evaluation: the
        model of this config, its backbone's blocks in the model's layout (``scan_blocks``),
        checked to fit the checkpoint's parameters."""
        params, ema_params, _ = weights.load_params(checkpoint_dir)
        if use_ema:
            if ema_params is None:
                raise UserError(f'{checkpoint_dir} has no EMA weights; drop --ema.')
            params = ema_params
        from sequencer_jax.data import segmentation as seg_data  # TensorFlow
        spec = seg_data.dataset_spec(self.config, self.config.model.num_classes)
        model = self.model(spec)
        if 'backbone' in params:
            params = dict(params) | {
                'backbone': layout.match_layout(params['backbone'], model.backbone)}
        images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3))
        expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
        weights.check_params_fit(params, expected, checkpoint_dir, self.config,
                                 f'The checkpoint {checkpoint_dir}')
        return model, params, spec

    def train_batches(self, spec, local_batch: int, start_example: int, sharding):
        from sequencer_jax.data import pipeline, segmentation as seg_data  # TensorFlow
        ds = pipeline.train_dataset(spec, self.config, local_batch, start_example,
                                    preprocess=seg_data.train_preprocess(spec, self.config))
        return pipeline.GlobalBatches(ds, sharding, f'{spec.name} train', skippable=True)

    def eval_batches(self, spec, local_batch: int, sharding):
        from sequencer_jax.data import pipeline
        ds, count = self.eval_dataset(spec, local_batch)
        return pipeline.GlobalBatches(ds, sharding, f'{spec.name} eval'), count

    def eval_dataset(self, spec, local_batch: int, split: str | None = None):
        """The eval split (or ``split``) as a tf.data stream of padded local batches."""
        from sequencer_jax.data import segmentation as seg_data  # TensorFlow
        return seg_data.eval_dataset(spec, self.config, local_batch, split)

    def train_step(self, model, tx, ema_decay: float | None, accum_steps: int):
        loss = functools.partial(segmentation_loss, model=model,
                                 ignore_label=self.seg.ignore_label,
                                 aux_weight=self.seg.aux_weight)
        return functools.partial(steps.train_step, loss_fn=loss, tx=tx, ema_decay=ema_decay,
                                 accum_steps=accum_steps)

    def eval_step(self, model):
        return functools.partial(segmentation_eval_step, model=model,
                                 ignore_label=self.seg.ignore_label,
                                 **self.logits_options())

    def logits_options(self) -> dict:
        """Keyword arguments of ``segmentation_logits`` from ``config.segmentation``."""
        seg = self.seg
        return dict(rescaled=bool(seg.eval_scale), inference=dict(
            mode=seg.inference, crop=(self.config.image_size,) * 2,
            stride=tuple(seg.slide_stride), flip=seg.eval_flip, scales=tuple(seg.eval_scales)))

    def summarise(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
        pixels = max(float(totals['pixels']), 1.0)
        return segmentation_metrics.scores(totals['confusion']) | {
            'loss': float(totals['loss_sum']) / pixels}

    def summary(self, final: dict[str, float]) -> str:
        line = (f"Final eval: mIoU {final['eval/miou']:.4f}, mAcc {final['eval/macc']:.4f}, "
                f"aAcc {final['eval/aacc']:.4f}")
        if 'eval_ema/miou' in final:
            line += f", EMA mIoU {final['eval_ema/miou']:.4f}"
        return line


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int
                        ) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy over the labelled pixels, the labelled pixels' mask).
    logits ``[B, H, W, K]``, labels ``[B, H, W]``."""
    valid = labels != ignore_label
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), valid


def segmentation_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model,
                      ignore_label: int, aux_weight: float
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pixel cross-entropy (mmsegmentation's default: summed over the labelled pixels and
    divided by all of them), plus ``aux_weight`` times the auxiliary head's; metric
    ``pixel_acc`` over the labelled pixels."""
    logits, aux = model.apply({'params': params}, batch['image'], train=True,
                              rngs={'dropout': rng})
    labels = batch['label']
    total, valid = pixel_cross_entropy(logits, labels, ignore_label)
    loss = total / labels.size
    if aux is not None:
        loss = loss + aux_weight * pixel_cross_entropy(aux, labels, ignore_label)[0] / labels.size
    hits = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
    return loss, {'pixel_acc': hits / jnp.maximum(jnp.sum(valid), 1)}


def segmentation_logits(params: Any, batch: dict[str, jax.Array], *, model, inference: dict,
                        rescaled: bool) -> jax.Array:
    """The logits ``[B, Hl, Wl, K]`` of an eval batch (see ``segmentation_eval_step``)
    where its labels are: at the labels' original size when the images were ``rescaled``."""
    apply = lambda x: model.apply({'params': params}, x, train=False)  # noqa: E731
    logits = seg_models.predict_logits(apply, batch['image'], batch['size'], **inference)
    if not rescaled:
        return logits
    return seg_models.resized_to_labels(logits, batch['size'], batch['label_size'],
                                        batch['label'].shape[1:3])


def segmentation_eval_step(params: Any, batch: dict[str, jax.Array], *, model,
                           ignore_label: int, inference: dict, rescaled: bool
                           ) -> dict[str, jax.Array]:
    """One padded batch's ``confusion [K, K]``, ``loss_sum`` and labelled ``pixels``.
    batch: ``image [B, H, W, 3]`` canvases with ``size [B, 2]``, ``label [B, Hl, Wl]``
    with ``label_size [B, 2]``, and ``mask [B]``; ``inference``: keyword arguments of
    ``predict_logits``. ``rescaled``: the images were rescaled (``eval_scale``), so their
    logits are resized to the labels' original sizes first."""
    logits = segmentation_logits(params, batch, model=model, inference=inference,
                                 rescaled=rescaled)
    labels = batch['label']
    num_classes = logits.shape[-1]
    loss_sum, valid = pixel_cross_entropy(logits, labels, ignore_label)
    valid = valid & (batch['mask'][:, None, None] > 0)
    confusion = segmentation_metrics.confusion_matrix(
        jnp.where(valid, labels, 0), jnp.argmax(logits, -1), num_classes, valid)
    return {'confusion': confusion, 'loss_sum': loss_sum, 'pixels': jnp.sum(valid)}


TASKS = {'classification': Classification, 'segmentation': Segmentation}


def get_task(config):
    """The task ``config.task`` names (``config_defaults.validate`` checked the name)."""
    return TASKS[config.task](config)
