"""Models: parameter counts, parity with timm (committed fixture), options, errors."""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sequencer_jax as sj
from conftest import run_cli
from sequencer_jax import convert
from sequencer_jax.convert import __main__ as convert_cli
from sequencer_jax.errors import UserError
from sequencer_jax.models import layout
from sequencer_jax.models.sequencer import LayerNorm

# Counted from the PyTorch references (timm, and the official repository's ablations
# built in tests/torch_reference.py); test_torch_parity.py re-counts them live.
PARAM_COUNTS = {
    'gru_sequencer2d_s': 24_874_600,
    'rnn_sequencer2d_s': 19_320_424,
    'sequencer2d_l': 54_298_216,
    'sequencer2d_l_d4_3x': 96_252_392,
    'sequencer2d_m': 38_307_688,
    'sequencer2d_s': 27_651_688,
    'sequencer2d_s_add': 26_545_768,
    'sequencer2d_s_h2x': 45_395_560,
    'sequencer2d_s_horizontal': 27_645_544,
    'sequencer2d_s_unidirectional': 20_991_592,
    'sequencer2d_s_without_fc': 25_433_704,
    'sequencer2d_vertical': 27_645_544,
    'v_sequencer_s': 33_016_552,
    'v_sequencer_s_h': 27_645_544,
    'v_sequencer_s_pe': 33_114_856,
}


def param_count(model, size=224):
    images = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_registry_lists_every_variant():
    assert sj.list_models() == sorted(PARAM_COUNTS)


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_parameter_count_equals_reference(name):
    assert param_count(sj.create_model(name, num_classes=1000)) == PARAM_COUNTS[name]


def _fixture_model(timm_fixture, case, **extra):
    info = timm_fixture.case(case)
    model = sj.create_model(info['variant'], num_classes=timm_fixture.meta['num_classes'],
                            **info['overrides'], **extra)
    return model, info


@pytest.mark.parametrize('case', [
    'sequencer2d_s', 'sequencer2d_s_unidirectional', 'sequencer2d_s_add',
    'sequencer2d_s_without_fc', 'sequencer2d_vertical', 'sequencer2d_s_horizontal',
    'gru_sequencer2d_s', 'rnn_sequencer2d_s', 'v_sequencer_s_pe', 'v_sequencer_s_h'])
def test_logits_equal_reference(timm_fixture, case):
    model, info = _fixture_model(timm_fixture, case)
    variables = convert.from_torch_state_dict(timm_fixture.state_dict(case), info['variant'],
                                              **info['overrides'])
    # Every case has sides that are not multiples of the total stride (VALID convolutions).
    stride = model.total_stride
    assert any(h % stride or w % stride for h, w in info['sizes'])
    for h, w in info['sizes']:
        logits = model.apply(variables, timm_fixture.images(h, w))
        ref = timm_fixture.logits(case, h, w)
        assert logits.shape == ref.shape
        np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def _official_keys(state_dict, layers):
    """timm key names -> the official repository's (the inverse of timm's filter)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == 'stages' and parts[2] == 'downsample':
            stage = int(parts[1]) - 1
            key = '.'.join(['blocks', str(stage), str(layers[stage])] + parts[3:])
        elif parts[0] == 'stages':
            key = '.'.join(['blocks', parts[1]] + parts[3:])
        elif parts[:2] == ['head', 'fc']:
            key = '.'.join(['head'] + parts[2:])
        out[key] = value
    return out


def test_official_key_names_convert_identically(timm_fixture):
    model, info = _fixture_model(timm_fixture, 'sequencer2d_s')
    sd = timm_fixture.state_dict('sequencer2d_s')
    official = _official_keys(sd, model.layers)
    assert 'blocks.1.1.down.weight' in official and 'head.weight' in official
    a = convert.from_torch_state_dict(sd, 'sequencer2d_s', **info['overrides'])
    b = convert.from_torch_state_dict({'model': official}, 'sequencer2d_s', **info['overrides'])
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_scan_blocks_and_remat_equal_unrolled(timm_fixture):
    model, info = _fixture_model(timm_fixture, 'sequencer2d_s')
    sd = timm_fixture.state_dict('sequencer2d_s')
    images = timm_fixture.images(42, 42)
    ref = model.apply(convert.from_torch_state_dict(sd, 'sequencer2d_s', **info['overrides']),
                      images)
    for extra in (dict(scan_blocks=True), dict(scan_blocks=True, remat=True), dict(remat=True)):
        variant, _ = _fixture_model(timm_fixture, 'sequencer2d_s', **extra)
        variables = convert.from_torch_state_dict(sd, 'sequencer2d_s', **info['overrides'],
                                                  scan_blocks=extra['scan_blocks'] if
                                                  'scan_blocks' in extra else False)
        np.testing.assert_allclose(variant.apply(variables, images), ref, atol=1e-5)


def test_scan_blocks_gradients_equal_unrolled(timm_fixture):
    model, info = _fixture_model(timm_fixture, 'sequencer2d_s')
    scanned, _ = _fixture_model(timm_fixture, 'sequencer2d_s', scan_blocks=True, remat=True)
    sd = timm_fixture.state_dict('sequencer2d_s')
    images = timm_fixture.images(42, 42)
    v_unrolled = convert.from_torch_state_dict(sd, 'sequencer2d_s', **info['overrides'])
    v_scanned = convert.from_torch_state_dict(sd, 'sequencer2d_s', **info['overrides'],
                                              scan_blocks=True)
    loss = lambda m: lambda v: jnp.sum(m.apply(v, images) ** 2)  # noqa: E731
    g_unrolled = jax.grad(loss(model))(v_unrolled)
    g_scanned = jax.grad(loss(scanned))(v_scanned)
    g_restacked = layout.stack_stage_blocks(g_unrolled['params'], model.layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 g_restacked, g_scanned['params'])
    # Checkpoints load into either layout, exactly.
    for target, source, expected in [(scanned, v_unrolled, v_scanned),
                                     (model, v_scanned, v_unrolled),
                                     (model, v_unrolled, v_unrolled)]:
        jax.tree.map(np.testing.assert_array_equal,
                     layout.match_layout(source['params'], target), expected['params'])


def test_fused_axes_equal_separate_scans(timm_fixture):
    model, info = _fixture_model(timm_fixture, 'sequencer2d_s')
    separate, _ = _fixture_model(timm_fixture, 'sequencer2d_s', fuse_axes=False)
    variables = convert.from_torch_state_dict(timm_fixture.state_dict('sequencer2d_s'),
                                              'sequencer2d_s', **info['overrides'])
    images = timm_fixture.images(42, 42)
    np.testing.assert_allclose(model.apply(variables, images),
                               separate.apply(variables, images), atol=1e-6)


@pytest.mark.parametrize('cell', ['lstm', 'gru', 'rnn'])
@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('union', ['cat', 'vertical'])
def test_fast_recurrence_equals_the_nn_scan_path_with_gradients(cell, bidirectional, union):
    """The default in-place ('natural', custom derivative) recurrence and the fused Pallas
    kernels (interpreted on CPU) against the reference nn.scan path, with both axes in one
    recurrence or in two, square and non-square: values, gradients and forward-mode
    derivatives (Pallas: its tangent kernel)."""
    reference = sj.BiRNN2D(6, cell=cell, bidirectional=bidirectional, union=union,
                           recurrence='scan', fuse_axes=False)
    variants = [sj.BiRNN2D(6, cell=cell, bidirectional=bidirectional, union=union,
                           recurrence=r, fuse_axes=f)
                for r, f in (('natural', True), ('natural', False), ('scan', True),
                             ('pallas', True))]

    @jax.jit  # one compilation of every path: much faster than running them eagerly
    def outputs_and_derivatives(variables, x, tangents):
        loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
        # Forward mode w.r.t. weights and input.
        return [(m.apply(variables, x), jax.grad(loss(m), argnums=(0, 1))(variables, x),
                 jax.jvp(lambda v, x: m.apply(v, x), (variables, x), tangents)[1])
                for m in [reference] + variants]

    for shape in ((2, 5, 5, 8), (2, 3, 6, 8)):
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        variables = jax.jit(reference.init)(jax.random.PRNGKey(1), x)
        tangents = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(2), a.shape),
                                (variables, x))
        (expected, g_expected, t_expected), *others = outputs_and_derivatives(
            variables, x, tangents)
        for y, grads, tangent in others:
            np.testing.assert_allclose(y, expected, atol=1e-6)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         grads, g_expected)
            np.testing.assert_allclose(tangent, t_expected, atol=1e-5)


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
@pytest.mark.parametrize('recurrence', ['natural', 'pallas'])
def test_fast_recurrence_of_the_vanilla_mixer_equals_nn_scan(cell, recurrence):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 8))
    fast, reference = (sj.BiRNN1D(4, cell=cell, recurrence=r) for r in (recurrence, 'scan'))
    variables = fast.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(fast.apply(variables, x), reference.apply(variables, x),
                               atol=1e-6)
    loss = lambda m: lambda v: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 jax.grad(loss(fast))(variables), jax.grad(loss(reference))(variables))


TINY = dict(layers=(1, 1, 2, 1), embed_dims=(16, 24, 24, 24), hidden_sizes=(4, 6, 6, 6))


@pytest.mark.parametrize('recurrence', ['natural', 'scan'])
def test_forward_mode_autodiff_through_the_model(recurrence):
    """jax.jacfwd w.r.t. the input (it stopped at the custom VJPs of LayerNorm and the
    'natural' recurrence) equals jax.jacrev; each rule is checked against autodiff above."""
    model = sj.create_model('sequencer2d_s', 3, recurrence=recurrence, **TINY)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 14, 28, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    variables = jax.tree.map(  # the head starts at zero
        lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(2), v.shape), variables)
    logits = lambda x: model.apply(variables, x)  # noqa: E731
    forward = jax.jit(jax.jacfwd(logits))(x)
    assert forward.shape == (1, 3, 1, 14, 28, 3) and np.abs(forward).max() > 1e-3
    np.testing.assert_allclose(forward, jax.jit(jax.jacrev(logits))(x), atol=1e-5)


def test_features_and_pooled_outputs():
    model = sj.create_model('sequencer2d_s', num_classes=0, **TINY)
    images = jnp.ones((2, 56, 84, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    feats = model.apply(variables, images, method='features')
    assert [f.shape for f in feats] == [(2, 8, 12, 16), (2, 4, 6, 24), (2, 4, 6, 24),
                                        (2, 4, 6, 24)]
    assert model.apply(variables, images).shape == (2, 24)


def test_any_resolution_same_weights():
    model = sj.create_model('sequencer2d_s', num_classes=3, **TINY)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 3)))
    for h, w in [(14, 14), (28, 28), (70, 42), (112, 98)]:
        assert model.apply(variables, jnp.ones((1, h, w, 3))).shape == (1, 3)


def test_one_export_with_symbolic_batch_and_sides_serves_every_size():
    from jax import export
    model = sj.create_model('sequencer2d_s', num_classes=3, **TINY)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 3)))
    shape = export.symbolic_shape('b, h, w, 3', constraints=['h >= 14', 'w >= 14'])
    exported = export.export(jax.jit(model.apply))(
        variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    for size in ((2, 28, 42), (3, 30, 31)):
        images = jax.random.normal(jax.random.PRNGKey(1), (*size, 3))
        np.testing.assert_allclose(exported.call(variables, images),
                                   model.apply(variables, images), atol=1e-5)


def test_drop_path_schedules():
    linear = sj.create_model('sequencer2d_s', drop_path_rate=0.3, layers=(1, 1, 2, 1))
    rates = linear.drop_path_rates()
    assert [len(r) for r in rates] == [1, 1, 2, 1]
    np.testing.assert_allclose(sum(rates, []), [0.0, 0.075, 0.15, 0.225, 0.3])
    constant = sj.create_model('sequencer2d_s', drop_path_rate=0.3, layers=(1, 1, 2, 1),
                               drop_path_schedule='constant')
    assert sum(constant.drop_path_rates(), []) == [0.3] * 5


def test_drop_path_is_random_in_training_only():
    model = sj.create_model('sequencer2d_s', num_classes=0, drop_path_rate=0.5,
                            drop_path_schedule='constant', **TINY)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    train = lambda seed: model.apply(variables, images, train=True,  # noqa: E731
                                     rngs={'dropout': jax.random.PRNGKey(seed)})
    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(model.apply(variables, images),
                                  model.apply(variables, images, train=False))


def test_bfloat16_compute_keeps_float32_params():
    model = sj.create_model('sequencer2d_s', num_classes=3, dtype=jnp.bfloat16, **TINY)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
    ref = sj.create_model('sequencer2d_s', num_classes=3, **TINY).apply(variables, images)
    out = model.apply(variables, images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=5e-2)


@pytest.mark.parametrize('scan_blocks', [pytest.param(False, marks=pytest.mark.slow), True])
def test_bfloat16_training_keeps_bfloat16_activations(scan_blocks):
    """Under scan_blocks drop path's rate is a traced float32; it used to promote the
    bfloat16 activations, which broke nn.scan's carry: bfloat16 training crashed."""
    model = sj.create_model('sequencer2d_s', num_classes=3, dtype=jnp.bfloat16,
                            drop_path_rate=0.2, scan_blocks=scan_blocks, remat=scan_blocks,
                            **TINY)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    rngs = {'dropout': jax.random.PRNGKey(2)}
    features = model.apply(variables, images, True, rngs=rngs, method='features')
    assert [f.dtype for f in features] == [jnp.dtype(jnp.bfloat16)] * 4
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, images, train=True, rngs=rngs) ** 2))(
        variables)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_equals_flax_with_gradients(dtype):
    """Our LayerNorm (hand-written derivative) against flax's (autodiff), same params:
    values, gradients, forward-mode derivatives."""
    x = (3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 32)) + 1.0).astype(dtype)
    ours, ref = LayerNorm(dtype=dtype), nn.LayerNorm(1e-6, dtype=dtype)
    variables = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.PRNGKey(1), x))
    variables = jax.tree.map(lambda v: v + jax.random.normal(jax.random.PRNGKey(2), v.shape),
                             variables)

    def grads(module):
        loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32)))
        return (jax.grad(loss, argnums=(0, 1))(variables, x),
                jax.jvp(lambda v, x: module.apply(v, x), (variables, x), tangents)[1])

    tangents = jax.tree.map(lambda v: jax.random.normal(jax.random.PRNGKey(3), v.shape,
                                                        v.dtype), (variables, x))

    assert ours.apply(variables, x).dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(ours.apply(variables, x), np.float32),
                               np.asarray(ref.apply(variables, x), np.float32), atol=tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol),
        grads(ours), grads(ref))


@pytest.mark.parametrize('cell', ['lstm', 'gru', 'rnn'])
def test_gradients_are_finite_and_nonzero(cell):
    model = sj.create_model('sequencer2d_s', num_classes=3, cell=cell, **TINY)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
    variables = model.init(jax.random.PRNGKey(0), images)
    # The zero-initialised head would zero every other gradient: perturb it.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if 'head' in jax.tree_util.keystr(p) else x, variables)
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, images) ** 2))(variables)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), jax.tree_util.keystr(path)


def test_init_matches_timm_scheme():
    model = sj.create_model('sequencer2d_s', num_classes=10, **TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 3)))['params']
    assert np.all(params['head']['kernel'] == 0)
    w_ih = params['stages_0_blocks_0']['rnn_tokens']['rnn_v']['w_ih']
    assert w_ih.shape == (2, 16, 16)
    bound = 1 / np.sqrt(4)
    assert np.abs(w_ih).max() <= bound and np.abs(w_ih).max() > 0.8 * bound
    np.testing.assert_array_equal(params['norm']['scale'], 1.0)


# ---- bad input ----

def test_bad_inputs_raise_clear_errors():
    model = sj.create_model('sequencer2d_s', num_classes=3, **TINY)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 3)))
    assert model.apply(variables, jnp.ones((1, 30, 28, 3))).shape == (1, 3)  # as timm
    with pytest.raises(ValueError, match=re.escape(
            'Images of 13x28 pixels are too small: each downsampling (patch sizes (7, 2, 1, '
            '1)) must leave at least one patch, so the smallest size that works is 14x14.')):
        model.apply(variables, jnp.ones((1, 13, 28, 3)))
    with_embedding = sj.create_model('v_sequencer_s_pe', 3, layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=re.escape(
            'This model learned a position embedding for a 16x16 grid, which 240x220 images '
            'do not give (as in the official code): give 224x224 images (sides up to 237x237 '
            'crop to it).')):
        with_embedding.check_input_shape((1, 240, 220, 3))
    with_embedding.check_input_shape((1, 237, 224, 3))
    with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
        model.apply(variables, jnp.ones((1, 28, 28, 4)))
    with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
        model.apply(variables, jnp.ones((1, 3, 28, 28)))
    with pytest.raises(ValueError, match="Unknown model 'sequencer2d_xl'"):
        sj.create_model('sequencer2d_xl')
    with pytest.raises(ValueError, match="Unknown union 'concat'"):
        sj.create_model('sequencer2d_s', union='concat')
    with pytest.raises(ValueError, match="Unknown cell type 'lstn'"):
        sj.create_model('sequencer2d_s', cell='lstn')
    with pytest.raises(ValueError, match='Unknown option'):
        sj.create_model('sequencer2d_s', hiden_sizes=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='drop path schedule'):
        sj.create_model('sequencer2d_s', drop_path_schedule='cosine')
    with pytest.raises(ValueError, match="Unknown recurrence 'cudnn'"):
        sj.create_model('sequencer2d_s', recurrence='cudnn')
    bad_width = sj.create_model('sequencer2d_s_without_fc', **dict(TINY, hidden_sizes=(8, 6, 6, 6)))
    with pytest.raises(ValueError, match='without fc must output its input width'):
        bad_width.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 3)))


def test_conversion_names_missing_unexpected_and_misshaped_keys(timm_fixture):
    info = timm_fixture.case('sequencer2d_s')
    sd = timm_fixture.state_dict('sequencer2d_s')
    broken = dict(sd)
    del broken['stages.0.blocks.0.rnn_tokens.fc.weight']
    broken['stages.9.blocks.0.extra.weight'] = np.zeros((2, 2), np.float32)
    broken['norm.bias'] = np.zeros(7, np.float32)
    with pytest.raises(ValueError) as err:
        convert.from_torch_state_dict(broken, 'sequencer2d_s', **info['overrides'])
    msg = str(err.value)
    assert 'stages_0_blocks_0/rnn_tokens/fc/kernel' in msg
    assert 'stages_9_blocks_0/extra/kernel' in msg
    assert 'norm/bias: got (7,)' in msg
    with pytest.raises(ValueError, match="does not match 'sequencer2d_m'"):
        convert.from_torch_state_dict(sd, 'sequencer2d_m')
    # A head without its weight is that key missing, not a model without a head.
    headless = {k: v for k, v in sd.items() if k != 'head.fc.weight'}
    with pytest.raises(UserError, match=r"with 5 classes\.\nMissing \(no torch key maps to\): "
                       r"\['head/kernel'\]\nCheck"):
        convert.from_torch_state_dict(headless, 'sequencer2d_s', **info['overrides'])


@pytest.mark.parametrize('scan_blocks', [False, True])
def test_to_timm_state_dict_inverts_the_conversion_exactly(timm_fixture, scan_blocks):
    for case in timm_fixture.cases:
        info = timm_fixture.case(case)
        # The 1D variants (not in timm) come in the official repository's key names.
        sd = convert.official_to_timm_keys(timm_fixture.state_dict(case))
        variables = convert.from_torch_state_dict(sd, info['variant'], **info['overrides'],
                                                  scan_blocks=scan_blocks)
        back = convert.to_timm_state_dict(variables['params'])
        assert sorted(back) == sorted(sd), case
        for key, value in sd.items():
            assert back[key].dtype == np.float32 and back[key].flags.c_contiguous
            np.testing.assert_array_equal(back[key], value, err_msg=f'{case}: {key}')


def test_convert_cli_writes_loadable_checkpoint(timm_fixture, tmp_path, capsys):
    info = timm_fixture.case('sequencer2d_s')
    sd = timm_fixture.state_dict('sequencer2d_s')
    npz = tmp_path / 'weights.npz'
    np.savez(npz, **sd)
    args = [f'--input={npz}', '--model=sequencer2d_s']
    with pytest.raises(UserError, match="does not match 'sequencer2d_s'"):  # tiny weights
        run_cli(convert_cli.main, *args, f'--output={tmp_path / "bad"}')
    with pytest.raises(UserError, match='must be a JSON object'):
        run_cli(convert_cli.main, *args, f'--output={tmp_path / "bad"}', '--model_args="layers"')
    with pytest.raises(UserError, match="Unknown model 'sequencer2d_xs'. Registered models: "):
        run_cli(convert_cli.main, f'--input={npz}', '--model=sequencer2d_xs',
                f'--output={tmp_path / "bad"}')
    with pytest.raises(SystemExit) as err:
        run_cli(convert_cli.main, *args, f'--output={tmp_path / "bad"}', '--num_classes=ten')
    assert err.value.code == 1
    assert "flag --num_classes=ten: invalid literal for int() with base 10: 'ten'" in \
        capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()
    model_args = json.dumps(info['overrides'])
    run_cli(convert_cli.main, *args, f'--output={tmp_path / "ckpt"}', f'--model_args={model_args}')
    model, restored = convert.load_converted(str(tmp_path / 'ckpt'))
    assert model.num_classes == 5 and tuple(model.layers) == (1, 1, 2, 1)
    np.testing.assert_allclose(model.apply(restored, timm_fixture.images(42, 42)),
                               timm_fixture.logits('sequencer2d_s', 42, 42), atol=1e-4)
    with pytest.raises(UserError, match='already exists'):  # never overwrites a conversion
        run_cli(convert_cli.main, *args, f'--output={tmp_path / "ckpt"}',
                f'--model_args={model_args}')
    with pytest.raises(ValueError, match='not a converted checkpoint'):
        convert.load_converted(str(tmp_path))
    with pytest.raises(ValueError, match='No such checkpoint file'):
        convert.load_state_dict_file(str(tmp_path / 'missing.pth'))


@pytest.mark.parametrize('recurrence, cell', [
    ('natural', 'lstm'), ('natural', 'gru'), ('natural', 'rnn'), ('scan', 'lstm'),
    *(pytest.param(r, c, marks=pytest.mark.slow)
      for r, c in (('scan', 'gru'), ('scan', 'rnn'), ('pallas', 'lstm')))])
def test_the_model_runs_under_shard_map_with_its_type_checks(recurrence, cell):
    """jax.shard_map's default check_vma=True: the recurrences' initial carries were
    invariant while their steps made them varying ('carry input and carry output must
    have equal types'), and the hand-written VJPs gave varying gradients of invariant
    weights; the Pallas kernels split the sequences again over the (manual) mesh axes.
    Values and gradients equal the plain ones."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    model = sj.create_model('sequencer2d_s', 5, recurrence=recurrence, cell=cell, **TINY)
    images = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (8, 28, 42, 3)))
    variables = model.init(jax.random.PRNGKey(1), images[:1])
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
    # Pallas's CPU interpreter trips over JAX's own type check (scan carries inside the
    # interpreted kernel): there the check is off and the gradient is summed by hand.
    check_vma = recurrence != 'pallas'

    def loss(v, x):
        return jnp.sum(model.apply(v, x) ** 2)

    def grad(v, x):
        grads = jax.grad(loss)(v, x)  # summed over the shards by autodiff under check_vma
        return grads if check_vma else jax.lax.psum(grads, 'data')

    sharded = (jax.device_put(variables, NamedSharding(mesh, P())),
               jax.device_put(images, NamedSharding(mesh, P('data'))))
    # Compiled: eagerly, shard_map and the recurrences run op by op (minutes).
    logits = jax.jit(jax.shard_map(lambda v, x: model.apply(v, x), mesh=mesh,
                                   check_vma=check_vma, in_specs=(P(), P('data')),
                                   out_specs=P('data')))(*sharded)
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(jax.jit(model.apply)(variables, images)), atol=1e-5)
    grads = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P(), P('data')), out_specs=P(),
                                  check_vma=check_vma))(*sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(grads), jax.jit(jax.grad(loss))(variables, images))
