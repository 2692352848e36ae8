"""The command-line tools run end to end on tiny models."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import sequencer_jax as sj
from conftest import run_cli
from sequencer_jax import benchmark
from sequencer_jax.errors import UserError

TINY_ARGS = json.dumps(dict(layers=[1, 1, 1, 1], embed_dims=[16, 24, 24, 24],
                            hidden_sizes=[4, 6, 6, 6], scan_blocks=True))


def test_benchmark_cli_measures_forward_and_train_step(tmp_path, capsys):
    out = tmp_path / 'new_dir' / 'bench.json'  # created, as by the other CLIs
    results = run_cli(benchmark.main, '--model=sequencer2d_s', '--batch_size=2',
                      '--image_size=28', '--num_classes=5', '--reps=2', '--warmup=1',
                      f'--model_args={TINY_ARGS}', f'--output_json={out}', '--gemm',
                      '--peak_tflops=2')
    ours = results['sequencer_jax']
    for part in ('forward', 'train'):
        assert ours[part]['images_per_s_min'] <= ours[part]['images_per_s'] \
            <= ours[part]['images_per_s_max']
        assert ours[part]['images_per_s'] > 0
        assert ours[f'{part}_compile_s'] > 0
        assert ours[part]['memory']['xla_estimate_mib'] > 0
    written = json.loads(out.read_text())
    assert written['config']['model_args']['scan_blocks'] is True
    assert set(written['platform']['environment']) == set(benchmark.ENVIRONMENT)
    assert written['platform']['transparent_hugepages'] in (None, 'always', 'madvise', 'never')
    assert written['platform']['host_cpu'] == benchmark.host_cpu() != ''
    assert 'torch' not in written['platform']  # measured without --compare_timm
    rates = results['flop_rates']
    assert rates['train']['gflops_per_step'] == 3 * rates['forward']['gflops_per_step']
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


@pytest.mark.parametrize('name, paper_gmacs', [('sequencer2d_s', 8.4), ('sequencer2d_l', 16.6)])
def test_model_flops_match_the_paper(name, paper_gmacs):
    """The paper's Table 1 counts multiply-adds at 224 px (8.4G for S, 16.6G for L); ours
    counts matmul and convolution FLOPs, every iteration of a loop (scanned blocks,
    recurrence steps) included."""
    images = jnp.zeros((1, 224, 224, 3))
    counts = []
    for scan_blocks in (False, True):
        model = sj.create_model(name, scan_blocks=scan_blocks)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
        counts.append(benchmark.model_flops(lambda p, x: model.apply({'params': p}, x),
                                            params, images))
    assert counts[0] == counts[1]
    assert counts[0] / 2e9 == pytest.approx(paper_gmacs, rel=0.015)


def test_benchmark_cli_rejects_bad_input(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('')
    for argv, message in [
            (['--image_size=13'], 'the smallest size that works is 14x14'),
            (['--model_args={"unrol": 2}'], "Unknown option(s) ['unrol']"),
            (['--model_args={unroll: 2}'], "--model_args '{unroll: 2}' is not valid JSON"),
            (['--model_args=[2]'], 'must be a JSON object of model options'),
            (['--model=sequencer2d_xs'], "Unknown model 'sequencer2d_xs'"),
            (['--peak_tflops=-5'], '--peak_tflops=-5.0 must be a positive number'),
            (['--grad_accum_steps=3'], '--grad_accum_steps=3 must divide --batch_size=8'),
            (['--grad_accum_steps=2', '--compare_timm'], 'changes only our train step'),
            ([f'--output_json={tmp_path / "a_file" / "b.json"}'],
             f'Cannot create the output directory {tmp_path / "a_file"}')]:
        with pytest.raises(UserError, match=re.escape(message)):
            run_cli(benchmark.main, *argv)
    for argv, message in [
            (['--batch_size=0'], 'flag --batch_size=0: 0 is not a positive integer'),
            (['--reps=0'], 'flag --reps=0: 0 is not a positive integer'),
            (['--warmup=two'], "flag --warmup=two: invalid literal for int() with base 10"),
            (['--dtype=float16'], 'flag --dtype=float16: value should be one of')]:
        with pytest.raises(SystemExit) as err:
            run_cli(benchmark.main, *argv)
        assert err.value.code == 1 and message in capsys.readouterr().err, argv


@pytest.mark.slow
def test_benchmark_grad_accumulation_cuts_the_train_steps_memory():
    """XLA's estimate of the train step's memory falls with 4 micro-batches."""
    estimates = []
    for accum in ('1', '4'):
        results = run_cli(benchmark.main, '--batch_size=16', '--image_size=56',
                          '--num_classes=5', f'--model_args={TINY_ARGS}', '--compile_only',
                          f'--grad_accum_steps={accum}')
        estimates.append(results['sequencer_jax']['train']['memory']['xla_estimate_mib'])
        assert results['config']['grad_accum_steps'] == int(accum)
    assert estimates[1] < 0.75 * estimates[0]  # 0.52 here


CUDA_PLUGIN = (importlib.util.find_spec('jax_plugins') is not None
               and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None)
LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.fixture
def restore_jax_platforms():
    """--target sets jax_platforms (which no longer matters once backends run)."""
    previous = jax.config.jax_platforms
    yield
    jax.config.update('jax_platforms', previous)


def test_benchmark_target_rejects_bad_input(restore_jax_platforms, capsys):
    for argv, message in [
            (['--target=a100'],
             "neither one of ['h100', 'h200', 'v4', 'v5e', 'v5p', 'v6e'] nor an XLA:GPU"),
            (['--target=h200', '--compare_timm'], 'only compiles; drop --compare_timm'),
    ] + ([] if CUDA_PLUGIN else [(['--target=h200'], 'pip install "jax[cuda12]"')]) + (
            [] if LIBTPU else [(['--target=v5e'], 'pip install "jax[tpu]"')]):
        with pytest.raises(UserError, match=re.escape(message)):
            run_cli(benchmark.main, *argv)


@pytest.mark.skipif(not CUDA_PLUGIN, reason='needs jax\'s CUDA plugin: pip install "jax[cuda12]"')
def test_benchmark_compiles_for_a_gpu_it_does_not_have(tmp_path):
    """XLA:GPU compiles the whole train step, the Pallas kernels through Triton and ptxas,
    for an H200 description on this GPU-less machine (a fresh process: the CUDA plugin's
    compile-only devices need JAX to start on CPU)."""
    _assert_compiles_for(tmp_path, 'h200', 'NVIDIA H200', 'gpu')


@pytest.mark.skipif(not LIBTPU, reason='needs libtpu: pip install "jax[tpu]"')
def test_benchmark_compiles_for_a_tpu_it_does_not_have(tmp_path):
    """libtpu compiles the whole train step, the Pallas kernels through Mosaic, for one
    chip of a TPU v5e on this TPU-less machine."""
    _assert_compiles_for(tmp_path, 'v5e', 'TPU v5 lite', 'tpu')


def _assert_compiles_for(tmp_path, target, device_kind, platform):
    out = tmp_path / f'{target}.json'
    args = json.loads(TINY_ARGS) | {'recurrence': 'pallas'}
    subprocess.run([sys.executable, '-m', 'sequencer_jax.benchmark', f'--target={target}',
                    '--batch_size=4', '--image_size=28', '--num_classes=5',
                    f'--model_args={json.dumps(args)}', f'--output_json={out}'], check=True,
                   env=os.environ | {'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'})  # parallel workers
    results = json.loads(out.read_text())
    assert results['platform']['device_kind'] == device_kind
    assert results['platform']['backend'] == f'{platform}, compile only'
    for part in ('forward', 'train'):
        assert results['sequencer_jax'][f'{part}_compile_s'] > 0
        assert 'images_per_s' not in results['sequencer_jax'][part]
        assert results['sequencer_jax'][part]['memory']['xla_estimate_mib'] > 0


@pytest.mark.slow
def test_benchmark_compile_only_shows_remat_saving_memory(capsys):
    """--compile-only reports XLA's memory estimate without running; remat over scanned
    blocks must shrink the train step's (what lets sequencer2d_l fit at batch 64)."""
    estimates = {}
    for remat in (False, True):
        args = json.loads(TINY_ARGS) | {'remat': remat, 'layers': [3, 1, 1, 1]}
        results = run_cli(benchmark.main, '--batch_size=32', '--image_size=56',
                          '--num_classes=5', f'--model_args={json.dumps(args)}',
                          '--compile_only')
        train = results['sequencer_jax']['train']
        assert 'images_per_s' not in train
        estimates[remat] = train['memory']['xla_estimate_mib']
    assert estimates[True] < 0.7 * estimates[False]
    assert 'train step' in capsys.readouterr().out
    with pytest.raises(UserError, match='--compile_only measures no speed'):
        run_cli(benchmark.main, '--compile_only', '--compare_timm')


def test_the_benchmark_names_the_cpu_with_its_family_and_model():
    amd = ('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n'
           'model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n'
           'model name\t: Other\n')
    assert benchmark.cpu_name(amd) == 'AMD EPYC (family 26, model 2)'
    assert benchmark.cpu_name('model name\t: Intel(R) Xeon(R) Platinum 8481C\n') == (
        'Intel(R) Xeon(R) Platinum 8481C')
    assert benchmark.cpu_name('processor\t: 0\nBogoMIPS\t: 48.00\n') is None  # e.g. arm64


def test_convert_cli_runs_without_runpy_warning():
    """``import sequencer_jax`` must not import ``convert`` itself: ``python -m`` would then
    warn (and run the CLI in a second copy of the module)."""
    result = subprocess.run([sys.executable, '-W', 'error::RuntimeWarning', '-m',
                             'sequencer_jax.convert', '--help'], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, SEQUENCER_JAX_HUGETLB='0'))
    assert result.returncode == 0 and '--input' in result.stdout, result.stderr[-3000:]
    assert sj.convert.from_torch_state_dict is not None  # still an attribute of the package


@pytest.mark.parametrize('module, listed', [
    ('main', ['--config', '--workdir', '--coordinator_address']),
    ('evaluate', ['--config', '--checkpoint', '--resolutions', '--output_json', '--ema']),
    ('convert', ['--input', '--output', '--model', '--to_timm', '--num_classes']),
    ('experiments.linear_probe', ['--checkpoint', '--image_size', '--data_dir'])])
def test_help_lists_the_tools_flags_and_exits_0(module, listed):
    """--help printed absl's key flags only (main's lacked --config) and exited 1."""
    result = subprocess.run([sys.executable, '-m', f'sequencer_jax.{module}', '--help'],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, SEQUENCER_JAX_HUGETLB='0'))
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in listed:  # booleans are listed as --[no]name
        assert re.search(rf'^\s+--(\[no\])?{flag[2:]}:', result.stdout, re.M), (flag, result.stdout)
    if module == 'main':  # only the flags the tool uses
        assert '--batch_size' not in result.stdout and '--model:' not in result.stdout


@pytest.mark.slow
def test_benchmark_times_a_checkpoint_and_what_its_checksums_add(tmp_path, capsys):
    results = run_cli(benchmark.main, '--model=sequencer2d_s', '--batch_size=1',
                      '--image_size=28', '--num_classes=5', '--reps=2', '--warmup=0',
                      f'--model_args={TINY_ARGS}', '--forward_only',
                      f'--checkpoint_dir={tmp_path / "ckpt"}')
    timed = results['checkpoint']
    assert 0 < timed['save_blocking_s'] <= timed['save_total_s']
    assert 0 < timed['checksums_s'] and 0 < timed['restore_s']
    assert 0 < timed['state_mib'] < 1  # params, two AdamW moments and EMA of a tiny model
    assert 'checkpoint of 0 MiB: save' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / 'ckpt' / 'checkpoints')) == ['2']  # keeps the last
