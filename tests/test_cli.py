"""The command-line tools run end to end on tiny models."""

import json

import pytest

from sequencer_jax import benchmark

TINY_ARGS = json.dumps(dict(layers=[1, 1, 1, 1], embed_dims=[16, 24, 24, 24],
                            hidden_sizes=[4, 6, 6, 6], scan_blocks=True))


def test_benchmark_cli_measures_forward_and_train_step(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    results = benchmark.main(['--model', 'sequencer2d_s', '--batch-size', '2',
                              '--image-size', '28', '--num-classes', '5', '--reps', '2',
                              '--warmup', '1', '--model-args', TINY_ARGS, '--json', str(out),
                              '--gemm', '--peak-tflops', '2'])
    ours = results['sequencer_jax']
    for part in ('forward', 'train'):
        assert ours[part]['images_per_s_min'] <= ours[part]['images_per_s'] \
            <= ours[part]['images_per_s_max']
        assert ours[part]['images_per_s'] > 0
        assert ours[f'{part}_compile_s'] > 0
        assert ours[part]['memory']['xla_estimate_mib'] > 0
    assert json.loads(out.read_text())['config']['model_args']['scan_blocks'] is True
    # A train step (forward, backward, update) costs about three forwards (3.0 for the
    # full-size model; a tiny one adds relatively more for the optimizer and mixing).
    rates = results['flop_rates']
    assert 2.5 < rates['train']['gflops_per_step'] / rates['forward']['gflops_per_step'] < 4.5
    for row in rates.values():
        assert row['sequencer_jax_mfu'] == pytest.approx(row['sequencer_jax_tflops'] / 2)
    # Three GEMM forms per distinct MLP shape: batch 2 at 28 px is a 4x4 grid of width
    # 16 in stage 0, then 2x2 grids of width 24 (MLP ratio 3).
    assert [(tuple(r['shape']), r['form']) for r in results['gemm']] == [
        (shape, form) for shape in [(2 * 4 * 4, 16, 48), (2 * 2 * 2, 24, 72)]
        for form in ('x @ w', 'dy @ w.T', 'x.T @ dy')]
    assert all(r['xla_gflops'] > 0 for r in results['gemm'])
    printed = capsys.readouterr().out
    assert 'train step' in printed and 'GFLOP/step' in printed and 'x.T @ dy' in printed


def test_benchmark_cli_rejects_bad_input():
    with pytest.raises(SystemExit) as err:
        benchmark.main(['--image-size', '30'])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        benchmark.main(['--model-args', '{"unrol": 2}'])


def test_benchmark_compile_only_shows_remat_saving_memory(capsys):
    """--compile-only reports XLA's memory estimate without running; remat over scanned
    blocks must shrink the train step's (what lets sequencer2d_l fit at batch 64)."""
    estimates = {}
    for remat in (False, True):
        args = json.loads(TINY_ARGS) | {'remat': remat, 'layers': [3, 1, 1, 1]}
        results = benchmark.main(['--model', 'sequencer2d_s', '--batch-size', '32',
                                  '--image-size', '56', '--num-classes', '5',
                                  '--model-args', json.dumps(args), '--compile-only'])
        train = results['sequencer_jax']['train']
        assert 'images_per_s' not in train
        estimates[remat] = train['memory']['xla_estimate_mib']
    assert estimates[True] < 0.7 * estimates[False]
    assert 'train step' in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        benchmark.main(['--compile-only', '--compare-timm'])
    assert err.value.code == 2
