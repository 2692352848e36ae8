"""train_step / eval_step on a tiny model: the loss goes down, masks count once."""


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
    step = jax.jit(steps.classification_train_step(model=model, tx=tx, ema_decay=0.9, mix=mix))
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


def test_gradient_accumulation_gives_the_update_of_the_whole_batch():
    """Micro-batches of 8 and 4 (sharded over 8 devices, 1 and 2 rows each) give the
    update of the whole batch of 16 at once, mixing included (drawn for the whole batch);
    the model has no dropout, so only the order of the sums differs."""
    model = sj.create_model('sequencer2d_s', num_classes=4, **TINY)
    rng = np.random.RandomState(0)
    batch = {'image': jnp.asarray(rng.randn(16, 28, 28, 3), jnp.float32),
             'label': jnp.asarray(np.arange(16) % 4)}
    params = model.init(jax.random.PRNGKey(0), batch['image'])['params']
    head = params['head']['kernel']  # zero-initialised: every prediction would be class 0
    params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(2), head.shape)
    # Plain SGD: the update is the gradient itself (Adam's first step, g / (|g| + eps), would
    # blow up float noise in the near-zero gradients of the zero-initialised head).
    tx = optax.sgd(0.1)
    state = state_lib.create_train_state(params, tx, use_ema=True)
    mix = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
    sharded = jax.device_put(batch, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec('data')))
    results = []
    for accum_steps, inputs in ((1, batch), (2, sharded), (4, sharded)):
        step = jax.jit(steps.classification_train_step(model=model, tx=tx, ema_decay=0.9,
                                                       mix=mix, accum_steps=accum_steps))
        results.append(step(state, inputs, jax.random.PRNGKey(1)))
    (whole, whole_metrics), *accumulated = results
    for new_state, metrics in accumulated:
        assert int(new_state.step) == 1
        for key in ('loss', 'grad_norm'):
            np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=1e-5)
        assert float(metrics['top1']) == float(whole_metrics['top1'])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     new_state, whole)


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
