"""launch/device_benchmark.sh as the GPU machine's image will run it: TensorFlow, TFDS and
ml_collections absent but for the carried wheels; and the H100 prediction."""

import json
import os
import pathlib
import re
import subprocess

import pytest

from sequencer_jax import device_benchmark, prediction
from sequencer_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKED_IMPORTS = pathlib.Path(__file__).parent / 'blocked_imports'


@pytest.fixture(scope='module')
def wheels(tmp_path_factory):
    """The carried wheels, downloaded by launch/device_wheels.sh (from pip's cache once it
    has them; skipped where no package index answers)."""
    folder = tmp_path_factory.mktemp('whl')
    result = subprocess.run(['bash', str(ROOT / 'launch' / 'device_wheels.sh')], cwd=ROOT,
                            env=dict(os.environ, WHEELS=str(folder)), capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f'launch/device_wheels.sh could not download: {result.stderr[-300:]}')
    return folder


def _device_benchmark(tmp_path, wheels, budget_s, timeout=900):
    """The script in smoke mode on one CPU device, the imports blocked as on the image."""
    site = tmp_path / 'site'
    env = dict(os.environ, OUT=str(tmp_path / 'out'), SMOKE='1', BUDGET_S=str(budget_s),
               WHEELS=str(wheels), SITE=str(site), PYTHON=os.environ.get('PYTHON', 'python'),
               PYTHONPATH=str(BLOCKED_IMPORTS), SEQUENCER_JAX_ALLOWED_SITE=str(site),
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    return subprocess.run(['bash', str(ROOT / 'launch' / 'device_benchmark.sh')], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _phases(out):
    return {path.stem.split('_', 1)[1]: json.loads(path.read_text())
            for path in sorted(out.glob('*_*.json'))}


def test_a_budget_too_small_skips_the_later_phases_and_keeps_the_earlier(tmp_path, wheels):
    result = _device_benchmark(tmp_path, wheels, budget_s=25)
    assert result.returncode == 0, result.stdout + result.stderr
    phases = _phases(tmp_path / 'out')
    assert list(phases) == [name for name, _ in device_benchmark.PHASES]
    machine = phases.pop('machine')
    assert machine['status'] == 'ok', machine
    assert machine['results']['versions']['ml-collections'] == '1.1.0'
    assert machine['results']['matmul_float32_tflops'] > 0
    for name, phase in phases.items():
        assert phase['status'] == 'skipped', phase
        assert re.fullmatch(rf'estimate {device_benchmark.SMOKE_SIZES.estimates[name]} s > '
                            r'\d+ s left of the budget', phase['error'])
    log = (tmp_path / 'out' / 'progress.log').read_text()
    assert 'machine: ok in' in log and 'correctness: skipped (estimate 40 s' in log
    table = result.stdout[result.stdout.index('phase       status'):].splitlines()
    assert table[1].startswith('machine     ok') and 'TFLOP/s' in table[1]
    assert table[2].startswith('correctness skipped') and 'left of the budget' in table[2]
    assert len(list((tmp_path / 'out').iterdir())) <= 8  # what the device tool returns


@pytest.mark.slow
def test_every_phase_runs_at_toy_sizes_without_tensorflow(tmp_path, wheels):
    result = _device_benchmark(tmp_path, wheels, budget_s=800)
    assert result.returncode == 0, result.stdout + result.stderr
    phases = _phases(tmp_path / 'out')
    try:
        import timm  # noqa: F401
        expected_timm = 'ok'
    except ImportError:
        expected_timm = 'failed'
    assert {name: phase['status'] for name, phase in phases.items()} == {
        'machine': 'ok', 'correctness': 'ok', 'train': 'ok', 'timm': expected_timm,
        'forward': 'ok', 'trainer': 'ok', 'large': 'ok'}
    correctness = phases['correctness']['results']
    assert all(correctness[f'{cell}_{recurrence}']['passed'] for cell in ('lstm', 'gru', 'rnn')
               for recurrence in ('natural', 'pallas'))
    for rows in (phases['train']['results'], phases['forward']['results']):
        assert set(rows) == {'bfloat16_natural', 'bfloat16_pallas', 'float32_natural',
                             'float32_pallas'}
        assert all(row['images_per_s'] > 0 and 0 < row['mfu_of_measured']
                   for row in rows.values())
    trainer = phases['trainer']['results']
    assert trainer['killed_run']['returncode'] == -9
    assert trainer['resumed_run']['resumed'][0].startswith('Resuming from step 3')
    if expected_timm == 'failed':
        assert "No module named 'torch'" in phases['timm']['error']
        assert 'Traceback' in phases['timm']['traceback']
    assert re.search(r'^forward +float32_pallas +[\d.]+ +[\d.]+ +[\d.]+%$', result.stdout,
                     re.M)
    rates = prediction.measured(tmp_path / 'out')  # the measured column, from these files
    assert {f'ours {kind} {dtype} {recurrence}' for kind in ('train', 'forward')
            for dtype in ('bfloat16', 'float32') for recurrence in ('natural', 'pallas')} <= set(rates)
    table = prediction.markdown_table(prediction.predict(), rates)
    assert f"| {rates['ours train float32 natural']:,.0f} |" in table


def test_a_failing_row_is_kept_with_its_error_and_the_next_rows_still_run(tmp_path):
    record = device_benchmark.PhaseRecord(tmp_path / '3_train.json', 'train', 60)

    def pallas_fails():
        raise RuntimeError('Triton could not lower the kernel\nsecond line')

    record.row('bfloat16_natural', lambda: {'images_per_s': 10.0})
    record.row('bfloat16_pallas', pallas_fails)
    record.row('float32_natural', lambda: {'images_per_s': 5.0})
    saved = json.loads((tmp_path / '3_train.json').read_text())['results']
    assert list(saved) == ['bfloat16_natural', 'bfloat16_pallas', 'float32_natural']
    assert saved['bfloat16_pallas']['error'] == 'RuntimeError: Triton could not lower the kernel'
    assert 'Traceback' in saved['bfloat16_pallas']['traceback']
    with pytest.raises(RuntimeError, match=r'^1 row\(s\) failed: bfloat16_pallas \(first: '):
        record.check()
    record.row('bfloat16_pallas', lambda: {'output': 0.1, 'passed': False})
    with pytest.raises(RuntimeError, match='outside tolerance'):
        record.check()


def test_without_a_gpu_it_says_so_before_spending_time(tmp_path):
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'device_benchmark.sh')], cwd=ROOT, capture_output=True,
        text=True, env=dict(os.environ, OUT=str(tmp_path / 'out'), WHEELS='/none',
                            PYTHON=os.environ.get('PYTHON', 'python')))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: jax sees no GPU or TPU here (backend 'cpu'): this benchmark is for the device "
        'machine. On a CPU, SMOKE=1 (--smoke) runs every phase at toy sizes.')
    assert not (tmp_path / 'out').exists()


def test_the_predicted_table_in_the_docs_is_the_codes():
    model = registry.create_model('sequencer2d_s', 1000)
    per_image = prediction.flops_per_image(model, 224)
    assert per_image == pytest.approx(2 * 8.33e9, rel=2e-3)  # the paper's 8.4 GMAC, 1%
    assert prediction.sequential_steps(model, 224) == 4 * 32 + (3 + 8 + 3) * 16
    docs = (ROOT / 'docs' / 'benchmark.md').read_text()
    assert prediction.markdown_table(prediction.predict()) in docs


@pytest.mark.slow
def test_the_committed_program_counts_are_what_xla_compiles_for_an_h100():
    pytest.importorskip('jax_cuda12_plugin', reason='needs pip install "jax[cuda12]"')
    code = ('import json, jax; from sequencer_jax import prediction\n'
            'print(json.dumps(prediction.count_programs()))')
    result = subprocess.run([os.environ.get('PYTHON', 'python'), '-c', code], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    counted = json.loads(result.stdout.splitlines()[-1])
    assert counted == json.loads(prediction.PROGRAMS_FILE.read_text()) | {
        'jax': counted['jax']}


def test_launches_are_counted_through_loops_and_branches():
    hlo = '''HloModule m
%body (p: (s32[])) -> (s32[]) {
  %p = (s32[]) parameter(0)
  %fusion.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused
  ROOT %custom-call.2 = f32[4]{0} custom-call(%y), custom_call_target="__cublas$gemm"
}
%cond (p: (s32[])) -> pred[] {
  ROOT %c = pred[] constant(true)
}
%a () -> f32[] {
  ROOT %f = f32[] fusion(), kind=kLoop, calls=%g
}
%b () -> f32[] {
  %f1 = f32[] fusion(), kind=kLoop, calls=%g
  ROOT %f2 = f32[] fusion(%f1), kind=kLoop, calls=%g
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %copy.3 = f32[4]{0} copy(%x)
  %while.4 = (s32[], f32[4,4]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"32"}}
  %conditional.5 = f32[] conditional(%i), branch_computations={%a, %b}
  ROOT %gte = f32[4]{0} get-tuple-element(%while.4), index=1
}
'''
    assert prediction.count_program(hlo) == {'launches': 1 + 32 * 2 + 2, 'loop_iterations': 32,
                                             'loops_of_unknown_length': 0}
    unknown = hlo.replace(', backend_config={"known_trip_count":{"n":"32"}}', '')
    assert prediction.count_program(unknown) == {'launches': 1 + 2 + 2, 'loop_iterations': 1,
                                                 'loops_of_unknown_length': 1}
