"""Live parity with the PyTorch reference (timm / official code). Skips without torch+timm."""

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('timm')

import torch_reference  # noqa: E402

import sequencer_jax as sj  # noqa: E402
from conftest import run_cli  # noqa: E402
from sequencer_jax import convert  # noqa: E402
from sequencer_jax.convert import __main__ as convert_cli  # noqa: E402

pytestmark = pytest.mark.torch


def _jax_logits(name, state_dict, images, num_classes, **overrides):
    # scan_blocks keeps compile time of the deep variants low; it is exact (see test_models).
    variables = convert.from_torch_state_dict(state_dict, name, num_classes, scan_blocks=True,
                                              **overrides)
    model = sj.create_model(name, num_classes, scan_blocks=True, **overrides)
    return np.asarray(jax.jit(model.apply)(variables, images))


@pytest.mark.parametrize('name', sj.list_models())
def test_parameter_counts_equal_torch(name):
    reference = torch_reference.build(name)
    expected = sum(p.numel() for p in reference.parameters())
    shapes = jax.eval_shape(lambda: sj.create_model(name).init(
        jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == expected


def _check(name, sizes, **overrides):
    torch.manual_seed(0)
    num_classes = 1000 if not overrides else 7
    reference = torch_reference.build(name, num_classes, **overrides)
    state_dict = reference.state_dict()
    rng = np.random.RandomState(0)
    for h, w in sizes:
        images = rng.randn(2, h, w, 3).astype(np.float32)
        ours = _jax_logits(name, state_dict, images, num_classes, **overrides)
        np.testing.assert_allclose(ours, torch_reference.logits(reference, images),
                                   atol=1e-4, rtol=0)


TINY = dict(layers=(1, 1, 2, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8))
TINY_WIDE = dict(TINY, hidden_sizes=(8, 16, 16, 16))
TINY_VANILLA = dict(TINY, embed_dims=(32, 32, 32, 32), hidden_sizes=(16, 16, 16, 16))


def _tiny(name: str) -> dict:
    """Small architecture arguments that variant ``name`` takes (the union of some needs
    twice the hidden size as channels)."""
    if name in ('sequencer2d_s_h2x', 'sequencer2d_vertical', 'sequencer2d_s_horizontal',
                'v_sequencer_s_h'):
        return TINY_WIDE
    return TINY_VANILLA if name in ('v_sequencer_s', 'v_sequencer_s_pe') else TINY


@pytest.mark.parametrize('name', sj.list_models())
def test_every_variant_tiny_logits_equal_torch(name):
    # The official position embedding is fixed to the training grid.
    sizes = [(224, 224), (230, 237)] if name == 'v_sequencer_s_pe' else [
        (224, 224), (112, 84), (128, 128), (160, 160), (225, 225), (97, 150)]
    _check(name, sizes, **_tiny(name))


def _initialised_with_noise(model, images):
    """``model``'s variables with noise added to each: the head is zero-initialised,
    which would hide a wrongly loaded one."""
    variables = model.init(jax.random.PRNGKey(0), images)
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def test_the_printed_timm_code_loads_every_variant_timm_has(tmp_path):
    """convert --to_timm's hint (timm_model_code) builds, for every variant timm's
    Sequencer2d can express, a module that loads the exported weights strictly and gives
    our logits; the others (GRU and RNN cells, the vanilla Sequencer) get no code."""
    import timm.models.sequencer
    images = np.random.RandomState(0).randn(2, 56, 42, 3).astype(np.float32)
    expressed = []
    for name in sj.list_models():
        model = sj.create_model(name, 7, **_tiny(name))
        code = convert_cli.timm_model_code(name, model)
        if code is None:
            continue
        expressed.append(name)
        variables = _initialised_with_noise(model, images)
        reference = eval(code, {'timm': timm})
        reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                   convert.to_timm_state_dict(variables['params']).items()},
                                  strict=True)
        np.testing.assert_allclose(np.asarray(model.apply(variables, images)),
                                   torch_reference.logits(reference, images), atol=1e-4,
                                   rtol=0, err_msg=name)
    assert sorted(set(sj.list_models()) - set(expressed)) == [
        'gru_sequencer2d_s', 'rnn_sequencer2d_s', 'v_sequencer_s', 'v_sequencer_s_h',
        'v_sequencer_s_pe']


@pytest.mark.parametrize('name', ['sequencer2d_s', 'sequencer2d_m', 'sequencer2d_l'])
def test_full_size_logits_equal_timm(name):
    _check(name, [(224, 224), (168, 252), (160, 160), (392, 392)])


@pytest.mark.parametrize('name', ['sequencer2d_s', 'gru_sequencer2d_s', 'rnn_sequencer2d_s',
                                  'sequencer2d_s_unidirectional', 'v_sequencer_s'])
def test_input_gradients_equal_torch(name):
    overrides = TINY_VANILLA if name == 'v_sequencer_s' else TINY
    torch.manual_seed(0)
    reference = torch_reference.build(name, 7, **overrides)
    images = np.random.RandomState(1).randn(2, 56, 56, 3).astype(np.float32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).requires_grad_(True)
    torch.sin(reference(x)).sum().backward()
    expected = x.grad.permute(0, 2, 3, 1).numpy()
    variables = convert.from_torch_state_dict(reference.state_dict(), name, 7, **overrides)
    model = sj.create_model(name, 7, **overrides)
    grad = jax.grad(lambda im: jax.numpy.sum(jax.numpy.sin(model.apply(variables, im))))
    np.testing.assert_allclose(np.asarray(grad(images)), expected, atol=1e-5,
                               rtol=1e-4)


def test_exported_weights_give_timm_the_same_logits(tmp_path, capsys):
    """JAX params (scanned layout) -> convert --to_timm -> timm, loaded strictly."""
    from safetensors.torch import load_file
    model = sj.create_model('sequencer2d_s', 7, scan_blocks=True, **TINY)
    images = np.random.RandomState(0).randn(2, 28, 42, 3).astype(np.float32)
    variables = _initialised_with_noise(model, images)
    convert.save_converted(tmp_path / 'jax', 'sequencer2d_s', 7, variables,
                           dict(TINY, scan_blocks=True))
    exported = tmp_path / 'timm.safetensors'
    run_cli(convert_cli.main, '--to_timm', f'--input={tmp_path / "jax"}', f'--output={exported}')
    reference = torch_reference.build('sequencer2d_s', 7, **TINY)
    reference.load_state_dict(load_file(str(exported)), strict=True)
    # The code the CLI prints builds timm's model of this custom size.
    import timm.models.sequencer
    code = re.search(r'in PyTorch: (.+?)\.load_state_dict', capsys.readouterr().out).group(1)
    assert code.startswith('timm.models.sequencer.Sequencer2d(layers=')
    eval(code, {'timm': timm}).load_state_dict(load_file(str(exported)), strict=True)
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)),
                               torch_reference.logits(reference, images), atol=1e-4, rtol=0)


def test_benchmark_measures_timm_beside_us_in_one_run(tmp_path):
    """--compare_timm: timm's figures, the ratios, and the versions that produced them."""
    import timm
    from sequencer_jax import benchmark
    tiny = '{"layers": [1, 1, 1, 1], "embed_dims": [16, 24, 24, 24], "hidden_sizes": [4, 6, 6, 6]}'
    results = run_cli(benchmark.main, '--batch_size=2', '--image_size=28', '--num_classes=5',
                      '--reps=2', '--warmup=1', f'--model_args={tiny}', '--compare_timm')
    for part in ('forward', 'train'):
        assert results['ratio'][part] == pytest.approx(
            results['sequencer_jax'][part]['images_per_s']
            / results['timm'][part]['images_per_s'])
    assert (results['platform']['torch'], results['platform']['timm']) == (
        torch.__version__, timm.__version__)
