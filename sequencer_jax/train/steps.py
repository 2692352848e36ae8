"""train_step and eval_step: pure functions, jit-ed (and sharded) by the caller; and
``evaluate``, the host loop that sums eval_step over a split."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sequencer_jax.data import mixing
from sequencer_jax.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy in float32. logits, labels: [B, K] (labels may be soft)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.sum(labels.astype(jnp.float32) * logp, axis=-1))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               loss_fn: Callable, tx: optax.GradientTransformation,
               prepare: Callable | None = None, ema_decay: float | None = None,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step of any task.

    Args:
      state: the current TrainState.
      batch: arrays with a leading batch axis ``[B, ...]`` (sharded over the batch axes).
      rng: the run's root key; per-step keys are folded in from ``state.step``.
      loss_fn: ``(params, batch, rng) -> (loss, metrics)``: the task's scalar loss and its
        scalar train metrics (e.g. ``classification_loss`` with its model bound).
      tx: the optax optimizer.
      prepare: ``(rng, batch) -> batch`` on the whole batch before the loss (mixup/cutmix
        and label smoothing for classification); None: the batch as it is.
      ema_decay: update ``state.ema_params`` with this decay when EMA is enabled.
      accum_steps: the batch's gradient is summed over this many micro-batches of
        ``B / accum_steps`` examples, one after another (activation memory of a
        micro-batch), for the same update as the whole batch at once. Micro-batch ``i`` is
        rows ``i, i + accum_steps, ...``: on a batch sharded over devices, every device
        keeps working on its own rows.

    Returns:
      The new state and the scalar metrics: ``loss``, the task's, and ``grad_norm``.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    prepare_rng, dropout_rng = jax.random.split(step_rng)
    if prepare is not None:
        batch = prepare(prepare_rng, batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, metrics), grads = grad_fn(state.params, batch, dropout_rng)
    else:
        def accumulate(total, micro):
            (loss, metrics), grads = grad_fn(state.params, *micro)
            return jax.tree.map(jnp.add, total, grads), (loss, metrics)

        # [B, ...] -> [accum_steps, B / accum_steps, ...], micro-batch i = rows i::accum_steps.
        split = lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1)  # noqa: E731
        keys = jax.random.split(dropout_rng, accum_steps)
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, metrics) = jax.lax.scan(accumulate, zeros,
                                                (jax.tree.map(split, batch), keys))
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
        loss, metrics = jnp.mean(losses), jax.tree.map(jnp.mean, metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None and ema_decay is not None:
        ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    metrics = {'loss': loss, **metrics, 'grad_norm': optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics


def classification_train_step(*, model: nn.Module, tx: optax.GradientTransformation,
                              mix: dict[str, float] | None = None,
                              ema_decay: float | None = None, accum_steps: int = 1):
    """``train_step`` for classification (to jit): cross-entropy with mixup/cutmix and
    label smoothing on device (``mix``: see ``mixed_batch``; None: plain one-hot labels),
    metrics ``loss``, ``top1`` (against the unmixed labels) and ``grad_norm``. batch:
    ``image [B, H, W, 3]`` (normalised) and integer ``label [B]``."""
    return functools.partial(
        train_step, loss_fn=functools.partial(classification_loss, model=model), tx=tx,
        prepare=functools.partial(mixed_batch, num_classes=model.num_classes, mix=mix),
        ema_decay=ema_decay, accum_steps=accum_steps)


def mixed_batch(rng: jax.Array, batch: dict[str, jax.Array], *, num_classes: int,
                mix: dict[str, float] | None = None) -> dict[str, jax.Array]:
    """Classification's ``prepare`` of ``train_step``: ``batch`` (``image [B, H, W, 3]``,
    integer ``label [B]``) with mixup/cutmix applied and the soft ``target [B, K]``.
    ``mix``: keyword arguments of ``mixing.mix_batch`` (``mixup_alpha``, ``cutmix_alpha``,
    ``switch_prob``, ``smoothing``); None: plain one-hot targets."""
    images, targets = mixing.mix_batch(rng, batch['image'], batch['label'], num_classes,
                                       **(mix or dict(mixup_alpha=0.0, cutmix_alpha=0.0,
                                                      smoothing=0.0)))
    return batch | {'image': images, 'target': targets}


def classification_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *,
                        model: nn.Module) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy against ``batch['target']`` (from ``mix``) and ``top1`` against
    the unmixed ``label``."""
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': rng})
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return cross_entropy(logits, batch['target']), {'top1': top1}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              class_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums over one (padded) batch: ``mask [B]`` marks the real examples.

    batch: ``image [B, H, W, 3]``, ``label`` either integer ``[B]`` or multi-hot
    ``[B, K]`` (ImageNet-ReaL: a prediction is right when it is any of the labels;
    examples without labels are not counted), and ``mask [B]``.
    class_mask: optional bool ``[K]``; only these classes can be predicted (the
    200-class ImageNet-A/R subsets).
    Returns counts ``top1``, ``top5``, ``loss_sum`` and ``count``; divide after summing
    over all batches so that every example counts exactly once.
    """
    logits = model.apply({'params': params}, batch['image'], train=False).astype(jnp.float32)
    if class_mask is not None:
        logits = jnp.where(class_mask, logits, -jnp.inf)
    num_classes = logits.shape[-1]
    labels = batch['label']
    if labels.ndim == 1:
        labels = jax.nn.one_hot(labels, num_classes)
    mask = batch['mask'].astype(jnp.float32) * (jnp.sum(labels, axis=-1) > 0)
    topk = jax.lax.top_k(logits, min(5, num_classes))[1]
    hits = jnp.take_along_axis(labels, topk, axis=-1) > 0          # [B, k]
    logp = jax.nn.log_softmax(logits)
    # -log P(label set); for one label this is the usual cross-entropy.
    nll = -jax.nn.logsumexp(jnp.where(labels > 0, logp, -jnp.inf), axis=-1)
    return {
        'top1': jnp.sum(hits[:, 0] * mask),
        'top5': jnp.sum(jnp.any(hits, axis=-1) * mask),
        'loss_sum': jnp.sum(jnp.where(mask > 0, nll, 0.0)),
        'count': jnp.sum(mask),
    }


def evaluate(params: Any, batches: Callable[[], tuple[Any, int]], eval_fn,
             summarise: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None
             ) -> dict[str, float]:
    """A whole split's metrics: ``batches()`` gives its padded batches (and their count),
    ``eval_fn(params, batch)`` one batch's sums (``eval_step``), ``summarise`` turns their
    totals into metrics (default: ``classification_metrics``). The sums are added on the
    host in 64 bits, so that counts of pixels over a split stay exact."""
    dataset, _ = batches()
    totals, pending = None, None

    def add(totals, sums):
        sums = jax.tree.map(_wide, jax.device_get(sums))
        return sums if totals is None else jax.tree.map(np.add, totals, sums)

    for batch in dataset:
        sums = eval_fn(params, batch)
        if pending is not None:  # fetched one batch late: the device never waits for us
            totals = add(totals, pending)
        pending = sums
    if pending is not None:
        totals = add(totals, pending)
    return (summarise or classification_metrics)(totals)


def _wide(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64)


def classification_metrics(totals: dict[str, np.ndarray]) -> dict[str, float]:
    """top1, top5 and loss from the summed counts of ``eval_step``: every example once."""
    count = max(float(totals['count']), 1.0)
    return {'top1': float(totals['top1']) / count, 'top5': float(totals['top5']) / count,
            'loss': float(totals['loss_sum']) / count}
