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
