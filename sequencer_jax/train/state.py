"""Train state and optimizer construction."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

# Parameters that get weight decay: matrices and kernels. Biases (including the LSTM's
# bias vectors, which are 2-D here because directions are stacked), norm scales and the
# position embedding do not, as in timm's optimizer factory.
DECAYED_PARAM_NAMES = ('kernel', 'w_ih', 'w_hh')


@flax.struct.dataclass
class TrainState:
    """Everything a train step updates. ``ema_params`` is None when EMA is off."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools: True where weight decay applies (see DECAYED_PARAM_NAMES)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) in DECAYED_PARAM_NAMES, params)


def create_train_state(params: Any, tx: optax.GradientTransformation,
                       use_ema: bool = False) -> TrainState:
    """A fresh state at step 0 for ``params`` (float32)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None)


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from ``warmup_lr`` to the batch-scaled peak, then ``schedule``:
    'cosine' to ``min_lr``, or 'poly' (mmsegmentation's PolyLR: ``(1 - t) ** power``
    down to ``min_lr``).

    peak = ``base_lr * batch_size / reference_batch_size`` (the linear scaling rule). The
    warmup lasts ``warmup_steps``, or else ``warmup_epochs``.
    """
    opt = config.optimizer
    peak = opt.base_lr * config.batch_size / opt.reference_batch_size
    warmup = opt.warmup_steps if opt.warmup_steps is not None else \
        int(opt.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    if opt.schedule == 'cosine':
        return optax.warmup_cosine_decay_schedule(
            init_value=opt.warmup_lr, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=opt.min_lr)
    return optax.join_schedules([
        optax.linear_schedule(opt.warmup_lr, peak, warmup),
        optax.polynomial_schedule(peak, opt.min_lr, opt.power, max(total_steps - warmup, 1))],
        [warmup])


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on kernels only, optional global-norm clipping."""
    opt = config.optimizer
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=weight_decay_mask)
    if opt.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
    return adamw
