"""train_step / eval_step on a tiny model: the loss goes down, masks count once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sequencer_jax as sj
from sequencer_jax.train import state as state_lib
from sequencer_jax.train import steps

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 24, 24, 24), hidden_sizes=(4, 6, 6, 6))


def _train(mix, steps_count=30):
    model = sj.create_model('sequencer2d_s', num_classes=4, **TINY)
    rng = np.random.RandomState(0)
    labels = jnp.asarray(np.arange(8) % 4)
    images = jnp.asarray(rng.randn(8, 28, 28, 3) * 0.1, jnp.float32) + \
        labels[:, None, None, None].astype(jnp.float32)
    params = model.init(jax.random.PRNGKey(0), images)['params']
    tx = optax.adamw(3e-3, weight_decay=0.05, mask=state_lib.weight_decay_mask(params))
    state = state_lib.create_train_state(params, tx, use_ema=True)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.9,
                                     mix=mix))
    losses = []
    for _ in range(steps_count):
        state, metrics = step(state, {'image': images, 'label': labels}, jax.random.PRNGKey(1))
        losses.append(float(metrics['loss']))
    assert int(state.step) == steps_count
    assert all(np.isfinite(losses)) and float(metrics['grad_norm']) > 0
    assert not jax.tree_util.tree_all(jax.tree.map(jnp.array_equal, state.params,
                                                   state.ema_params))
    return losses


def test_train_step_reduces_loss():
    losses = _train(mix=None)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_train_step_with_mixing_reduces_loss():
    # Mixed, smoothed targets keep the loss far from 0; it must still fall.
    losses = _train(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1))
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5])


def test_weight_decay_mask_spares_biases_and_norms():
    model = sj.create_model('sequencer2d_s', num_classes=4, **TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 3)))['params']
    mask = state_lib.weight_decay_mask(params)
    block = mask['stages_0_blocks_0']
    assert block['rnn_tokens']['rnn_v']['w_ih'] and block['rnn_tokens']['rnn_v']['w_hh']
    assert not block['rnn_tokens']['rnn_v']['b_ih'] and not block['norm1']['scale']
    assert block['mlp_channels']['fc1']['kernel'] and not block['mlp_channels']['fc1']['bias']


def test_eval_step_counts_only_masked_examples():
    model = sj.create_model('sequencer2d_s', num_classes=6, **TINY)
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 3))
    params = model.init(jax.random.PRNGKey(0), images)['params']
    params['head']['bias'] = jnp.arange(6.0)  # every prediction is class 5, top-5 is 1..5
    batch = {'image': images, 'label': jnp.array([5, 0, 1, 5]), 'mask': jnp.array([1, 1, 1, 0])}
    out = steps.eval_step(params, batch, model=model)
    assert float(out['count']) == 3 and float(out['top1']) == 1 and float(out['top5']) == 2
