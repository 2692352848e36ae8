"""The first run on a GPU, in one command and one time budget.

    OUT=/tmp/bench launch/device_benchmark.sh            # on the GPU machine
    OUT=/tmp/bench SMOKE=1 launch/device_benchmark.sh    # every phase at toy sizes, CPU
    python -m sequencer_jax.device_benchmark --out=DIR [--budget_s=450] [--smoke]

Phases run most valuable first, each in a process of its own (a crash or a hung kernel
costs that phase alone), each with an estimate of its seconds: one whose estimate does
not fit the time left is skipped and says so. Each phase writes ``DIR/<n>_<name>.json``
as its results come in (``status``, ``seconds``, ``results``, and for a failure its
``error`` in one line and its ``traceback``) and a line to ``DIR/progress.log``; a
summary table is printed last. Nothing here imports TensorFlow or TFDS.

1. ``machine``: versions, the device, and the ceilings measured: a large matmul in
   bfloat16 and float32, a device-to-device copy.
2. ``correctness``: the 'natural' and 'pallas' recurrences of every cell (output and
   gradients) and a small Sequencer2D on the device against the 'scan' reference on the
   CPU (float32 at full precision), on fresh random inputs.
3. ``train``: sequencer2d_s's train step, bfloat16 and float32, 'natural' and 'pallas':
   images/s, compile seconds, memory, model FLOPs utilisation of the measured ceiling.
4. ``timm``: timm's sequencer2d_s (AMP bfloat16 and float32) and vit_small_patch16_224
   (AMP), train step and forward, on the same device.
5. ``forward``: our forward (inference) images/s at the forward batch.
6. ``trainer``: ``main`` on the ``synthetic`` dataset: train, checkpoint, kill, resume.
7. ``large``: sequencer2d_m and _l in bfloat16, and _l at batch 64 with remat and
   scan_blocks.

What these rows should give on an H100 is predicted, with its reasons, by
``python -m sequencer_jax.prediction`` (docs/benchmark.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

from absl import flags

from sequencer_jax import cli
from sequencer_jax.errors import UserError

_OUT = flags.DEFINE_string('out', None, 'the folder for each phase\'s JSON and progress.log')
_BUDGET_S = flags.DEFINE_float('budget_s', 450.0, 'wall-clock seconds for every phase '
                               'together (a GPU check of a few seconds comes first); a '
                               'phase whose estimate does not fit is skipped')
_SMOKE = flags.DEFINE_bool('smoke', False, 'every phase at toy sizes, on any device (CPU '
                           'included; Pallas interpreted): a test of this script')
_PHASE = flags.DEFINE_string('phase', None, 'run this one phase in this process (what '
                             'the driver does in each child process)')

# Seconds the driver keeps for itself after the phases (the summary, the last JSON).
RESERVE_S = 5.0
REFERENCE_DEVICE = 'cpu'


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each phase measures: the device run's sizes, or the smoke run's."""

    matmul: int  # side of the square matmuls of the ceiling
    copy_mib: int  # the device-to-device copy's array
    image_size: int
    train_batch: int
    forward_batch: int
    reps: int  # timed repetitions (median reported)
    model_args: dict  # overrides of the benchmarked variants' structure
    timm_models: tuple[tuple[str, str], ...]  # (timm name, dtype)
    trainer_steps: int
    trainer_config: str
    large: tuple[tuple[str, int, dict], ...]  # (variant, batch, model_args)
    estimates: dict  # seconds per phase


DEVICE_SIZES = Sizes(
    matmul=8192, copy_mib=2048, image_size=224, train_batch=128, forward_batch=256, reps=10,
    model_args={},
    timm_models=(('sequencer2d_s', 'bfloat16'), ('sequencer2d_s', 'float32'),
                 ('vit_small_patch16_224', 'bfloat16')),
    trainer_steps=100, trainer_config='configs/imagenet.py:dataset=synthetic,dtype=bfloat16',
    large=(('sequencer2d_m', 128, {}), ('sequencer2d_l', 128, {}),
           ('sequencer2d_l', 64, {'remat': True, 'scan_blocks': True})),
    estimates={'machine': 30, 'correctness': 90, 'train': 150, 'timm': 60, 'forward': 60,
               'trainer': 150, 'large': 150})

# Sequencer2D-S's structure, narrowed and shortened (the README's digits model, smaller).
_TOY_MODEL = dict(layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), embed_dims=(16, 24, 24, 24),
                  hidden_sizes=(4, 6, 6, 6))
SMOKE_SIZES = Sizes(
    matmul=256, copy_mib=16, image_size=32, train_batch=4, forward_batch=4, reps=3,
    model_args=_TOY_MODEL, timm_models=(('sequencer2d_s', 'float32'),),
    trainer_steps=6, trainer_config='configs/default.py:dataset=synthetic',
    large=(('sequencer2d_s', 2, dict(_TOY_MODEL, remat=True, scan_blocks=True)),),
    estimates={'machine': 10, 'correctness': 40, 'train': 60, 'timm': 20, 'forward': 30,
               'trainer': 60, 'large': 30})

DTYPES = ('bfloat16', 'float32')
RECURRENCES = ('natural', 'pallas')
CELLS = ('lstm', 'gru', 'rnn')


class PhaseRecord:
    """A phase's JSON file, rewritten whole at each change, so that a phase killed midway
    leaves every result it had."""

    def __init__(self, path: pathlib.Path, name: str, estimate_s: float):
        self.path = path
        self.data: dict[str, Any] = {'phase': name, 'status': 'running',
                                     'estimate_s': estimate_s, 'results': {}}

    @classmethod
    def read(cls, path: pathlib.Path) -> PhaseRecord:
        record = cls(path, path.stem.split('_', 1)[-1], 0.0)
        record.data = json.loads(path.read_text())
        return record

    def result(self, key: str, value: Any) -> None:
        self.data['results'][key] = value
        self.write()

    def row(self, key: str, measure: Callable[[], dict]) -> None:
        """``measure()``'s result as ``key``; an error or a result that has not
        ``passed`` is kept as the row's and the phase goes on to its next row (a Pallas
        failure must not cost the rows after it). ``measure`` runs now."""
        try:
            self.result(key, measure())
        except Exception as e:  # noqa: BLE001 - recorded, and raised by check()
            self.result(key, {'error': _one_line(e), 'traceback': traceback.format_exc()})

    def check(self) -> None:
        """An error naming the rows that failed, if any did."""
        failed = {k: v.get('error', 'outside tolerance') for k, v in self.data['results'].items()
                  if isinstance(v, dict) and ('error' in v or v.get('passed') is False)}
        if failed:
            first = next(iter(failed.items()))
            raise RuntimeError(f'{len(failed)} row(s) failed: {", ".join(failed)} (first: '
                               f'{first[0]}: {first[1]})')

    def write(self) -> None:
        temporary = self.path.with_suffix('.tmp')
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        temporary.replace(self.path)


# The phases. Each takes (record, sizes, out) and writes its results into ``record``.


def phase_machine(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    record.result('versions', _versions())
    record.result('device', {'platform': device.platform, 'kind': device.device_kind,
                             'count': jax.device_count(),
                             'memory_gib': (device.memory_stats() or {}).get(
                                 'bytes_limit', 0) / 2**30})
    n = sizes.matmul
    for dtype in DTYPES:
        a, b = (jax.random.normal(k, (n, n), getattr(jnp, dtype))
                for k in jax.random.split(jax.random.PRNGKey(time.time_ns() % 2**31)))
        seconds = _median_seconds(jax.jit(jnp.matmul), a, b, reps=sizes.reps)
        record.result(f'matmul_{dtype}_tflops', 2 * n**3 / seconds / 1e12)
    copy = jnp.ones((sizes.copy_mib * 2**18,), jnp.float32)
    seconds = _median_seconds(jax.jit(lambda x: x + 1), copy, reps=sizes.reps)
    record.result('copy_tb_per_s', 2 * copy.nbytes / seconds / 1e12)  # read + written


def phase_correctness(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    import jax
    import numpy as np

    from sequencer_jax.models import registry
    from sequencer_jax.models.sequencer import BiRNN2D

    reference = jax.devices(REFERENCE_DEVICE)[0]
    device = jax.devices()[0]
    rng = np.random.default_rng()  # fresh inputs each run; the seed is recorded
    seed = int(rng.integers(2**31))
    record.result('seed', seed)
    rng = np.random.default_rng(seed)
    # Tolerances of ||out - ref|| / ||ref||: float32 at full precision; Triton's float32
    # dot is tf32 (about 3e-4 a product), and the errors add up along a sequence.
    tolerance = {'natural': 1e-4, 'pallas': 5e-3}
    x = rng.standard_normal((2, 8, 8, 12)).astype(np.float32)

    def compared(model, variables, inputs, recurrence):
        errors = _compare_on_devices(model.clone(recurrence=recurrence),
                                     model.clone(recurrence='scan'), variables, inputs, device,
                                     reference, rng)
        return errors | {'tolerance': tolerance[recurrence],
                         'passed': max(errors.values()) <= tolerance[recurrence]}

    toy = registry.create_model('sequencer2d_s', 10, **_TOY_MODEL)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    # Noise on every parameter: the zero-initialised head would give zero logits.
    toy_params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
                              toy.init(jax.random.PRNGKey(seed), images[:1]))
    for recurrence in RECURRENCES:  # 'natural' first: a Pallas crash costs it nothing
        for cell in CELLS:
            model = BiRNN2D(hidden_size=6, cell=cell)
            params = model.init(jax.random.PRNGKey(seed), x[:1])
            record.row(f'{cell}_{recurrence}',
                       lambda: compared(model, params, x, recurrence))
        record.row(f'sequencer2d_toy_{recurrence}',
                   lambda: compared(toy, toy_params, images, recurrence))


def phase_train(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    _small_rows(record, sizes, out, train=True)


def phase_timm(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    # JAX, asked which backend runs (benchmark._torch_device), would otherwise take 75% of
    # the GPU's memory from torch.
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    from sequencer_jax import benchmark

    gpu = _torch_gpu()
    for name, dtype in sizes.timm_models:
        arch = {k: v for k, v in sizes.model_args.items() if k in benchmark.TIMM_ARCH_ARGS} \
            if name.startswith('sequencer') else {}

        def measure():
            train, forward = (benchmark.benchmark_timm(
                name, 1000, batch, sizes.image_size, dtype, 2, sizes.reps, 1, is_train, arch,
                gpu) for batch, is_train in ((sizes.train_batch, True),
                                             (sizes.forward_batch, False)))
            return {'train': train['train'], 'forward': forward['forward'],
                    'channels_last': gpu}

        record.row(f'{name}_{dtype}', measure)


def phase_forward(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    _small_rows(record, sizes, out, train=False)


def _small_rows(record: PhaseRecord, sizes: Sizes, out: pathlib.Path, train: bool) -> None:
    """sequencer2d_s's train step or forward in each dtype with each recurrence."""
    ceilings = _ceilings(out)
    batch = sizes.train_batch if train else sizes.forward_batch
    for recurrence in RECURRENCES:  # 'natural' first: a Pallas crash costs it nothing
        for dtype in DTYPES:
            record.row(f'{dtype}_{recurrence}', lambda: _ours(
                'sequencer2d_s', batch, sizes, dtype, ceilings,
                dict(sizes.model_args, recurrence=recurrence), train=train))


def phase_trainer(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    """``main`` for ``trainer_steps`` with a checkpoint at half way; the first run is
    killed (SIGKILL) once that checkpoint exists, the second resumes and finishes. The
    two share a compilation cache, so the second does not compile again."""
    import tempfile

    workdir = pathlib.Path(tempfile.mkdtemp(prefix='sequencer_jax_trainer_'))
    half = sizes.trainer_steps // 2
    args = [sys.executable, '-m', 'sequencer_jax.main', f'--config={sizes.trainer_config}',
            f'--workdir={workdir / "run"}', f'--config.num_train_steps={sizes.trainer_steps}',
            f'--config.batch_size={sizes.train_batch}',
            f'--config.eval_batch_size={sizes.train_batch}',
            f'--config.checkpoint_every_steps={half}', '--config.log_every_steps=5',
            f'--config.eval_every_steps={sizes.trainer_steps}', '--config.progress=lines',
            '--config.optimizer.warmup_steps=5', '--config.dataset.synthetic.train_examples='
            f'{sizes.train_batch * sizes.trainer_steps}',
            f'--config.dataset.synthetic.eval_examples={2 * sizes.train_batch}',
            *[f'--config.model.args.{k}={v}' for k, v in sizes.model_args.items()]]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(workdir / 'jax_cache'),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    checkpoints = workdir / 'run' / 'checkpoints'
    log = workdir / 'first_run.log'  # a file, not a pipe: a full pipe would stall the run
    start = time.perf_counter()
    with log.open('w') as output:
        first = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        while first.poll() is None and not any(p.name.isdigit()
                                               for p in checkpoints.glob('*')):
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    output = log.read_text(errors='replace')
    record.result('killed_run', {
        'seconds': time.perf_counter() - start, 'returncode': first.returncode,
        'steps_logged': max(_logged(workdir / 'run'), default=0),
        'output_tail': output[-1500:]})
    if first.returncode != -signal.SIGKILL:
        raise RuntimeError(f'the first run ended by itself ({first.returncode}) before its '
                           f'checkpoint at step {half}: {output.strip().splitlines()[-1:]}')
    start = time.perf_counter()
    second = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    resumed = [line for line in second.stdout.splitlines() if line.startswith('Resuming')]
    if second.returncode != 0 or not resumed:
        raise RuntimeError(f'the resumed run failed ({second.returncode}): '
                           f'{second.stdout.strip().splitlines()[-1:]}')
    metrics = _logged(workdir / 'run')
    rates = [m['train/images_per_s'] for m in metrics.values() if 'train/images_per_s' in m]
    record.result('resumed_run', {
        'seconds': time.perf_counter() - start, 'returncode': second.returncode,
        'resumed': resumed, 'final': second.stdout.strip().splitlines()[-1:],
        'images_per_s_median': statistics.median(rates[1:] or rates or [0.0]),
        'losses': {step: m['train/loss'] for step, m in metrics.items() if 'train/loss' in m},
        'output_tail': second.stdout[-1500:]})


def phase_large(record: PhaseRecord, sizes: Sizes, out: pathlib.Path) -> None:
    ceilings = _ceilings(out)
    for name, batch, model_args in sizes.large:
        key = f'{name}_b{batch}' + ('_remat_scan' if model_args.get('remat') else '')
        record.row(key, lambda: _ours(name, batch, sizes, 'bfloat16', ceilings,
                                      dict(model_args), train=True))


PHASES: tuple[tuple[str, Callable[[PhaseRecord, Sizes, pathlib.Path], None]], ...] = (
    ('machine', phase_machine), ('correctness', phase_correctness), ('train', phase_train),
    ('timm', phase_timm), ('forward', phase_forward), ('trainer', phase_trainer),
    ('large', phase_large))


# What the phases share.


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


def _versions() -> dict[str, str | None]:
    from importlib import metadata
    versions: dict[str, str | None] = {'python': sys.version.split()[0]}
    for package in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax',
                    'optax', 'orbax-checkpoint', 'ml-collections', 'torch', 'timm', 'triton'):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _median_seconds(fn, *args, reps: int) -> float:
    """The median seconds of ``fn(*args)``, synced, after a compile and a warm-up call."""
    import jax
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compare_on_devices(model, reference_model, variables, x, device, reference, rng
                        ) -> dict[str, float]:
    """||out - ref|| / ||ref|| of ``model``'s output and of its gradients (input and
    parameters, of a random projection of the output) on ``device``, against
    ``reference_model`` on the ``reference`` device. The device's memory is filled with
    NaNs first and freed, so that an output element the kernels do not write shows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def value_and_grads(net, cotangent):
        def loss(v, x):
            return jnp.sum(net.apply(v, x) * cotangent)
        return jax.jit(lambda v, x: (net.apply(v, x), jax.grad(loss, (0, 1))(v, x)))

    cotangent = rng.standard_normal(jax.eval_shape(model.apply, variables, x).shape,
                                    np.float32)
    poison = jnp.full((1 << 22,), jnp.nan, jnp.float32, device=device)
    poison.block_until_ready()
    poison.delete()
    with jax.default_matmul_precision('highest'):
        on_device = jax.device_get(value_and_grads(model, jax.device_put(cotangent, device))(
            jax.device_put(variables, device), jax.device_put(x, device)))
        expected = jax.device_get(value_and_grads(
            reference_model, jax.device_put(cotangent, reference))(
            jax.device_put(variables, reference), jax.device_put(x, reference)))

    def error(a, b):
        a, b = np.concatenate([np.ravel(l) for l in jax.tree.leaves(a)]), \
            np.concatenate([np.ravel(l) for l in jax.tree.leaves(b)])
        if not np.all(np.isfinite(a)):
            return float('inf')
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    return {'output': error(on_device[0], expected[0]),
            'grad_input': error(on_device[1][1], expected[1][1]),
            'grad_params': error(on_device[1][0], expected[1][0])}


def _ceilings(out: pathlib.Path) -> dict[str, float]:
    """The machine phase's measured matmul TFLOP/s per dtype ({} if it has none)."""
    path = out / f'1_{PHASES[0][0]}.json'
    results = json.loads(path.read_text())['results'] if path.exists() else {}
    return {dtype: results[f'matmul_{dtype}_tflops'] for dtype in DTYPES
            if f'matmul_{dtype}_tflops' in results}


def _ours(name: str, batch: int, sizes: Sizes, dtype: str, ceilings: dict, model_args: dict,
          train: bool) -> dict[str, Any]:
    """One row of ours: images/s (median), compile seconds, memory and MFU of the
    train step (``train``) or of the forward."""
    import jax
    from sequencer_jax import benchmark
    from sequencer_jax.models import registry

    model = registry.create_model(name, 1000, benchmark.DTYPES[dtype], **model_args)
    results = benchmark.benchmark_jax(model, batch, sizes.image_size, warmup=2,
                                      reps=sizes.reps, iters=1, train=train, forward=not train)
    key = 'train' if train else 'forward'
    row = dict(results[key], compile_s=results[f'{key}_compile_s'], batch=batch,
               peak_so_far_mib=(jax.devices()[0].memory_stats() or {}).get(
                   'peak_bytes_in_use', 0) / 2**20)
    row['tflops'] = results[key]['flops'] / row['ms_per_step'] / 1e9
    if dtype in ceilings:
        row['mfu_of_measured'] = row['tflops'] / ceilings[dtype]
    return row


def _torch_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _logged(workdir: pathlib.Path) -> dict[int, dict]:
    """The records of a workdir's metrics.jsonl by step; a line torn by a kill is skipped."""
    path = workdir / 'metrics.jsonl'
    records = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record['step']] = record
    return records


# The driver.


def run_phase(name: str, out: pathlib.Path, sizes: Sizes) -> None:
    """Runs phase ``name`` in this process, into its JSON file (which the driver made)."""
    index, function = next((i, f) for i, (n, f) in enumerate(PHASES, 1) if n == name)
    record = PhaseRecord.read(out / f'{index}_{name}.json')
    function(record, sizes, out)
    record.check()
    record.data['status'] = 'ok'
    record.write()


def drive(out: pathlib.Path, budget_s: float, smoke: bool) -> list[dict]:
    """Every phase in priority order within ``budget_s``; returns their records."""
    sizes = SMOKE_SIZES if smoke else DEVICE_SIZES
    deadline = time.monotonic() + budget_s - RESERVE_S
    log = (out / 'progress.log').open('a')

    def progress(line: str) -> None:
        line = f'{time.strftime("%H:%M:%S")} {line}'
        print(line, flush=True)
        log.write(line + '\n')
        log.flush()

    records = []
    progress(f'budget {budget_s:.0f} s, {"smoke" if smoke else "device"} sizes, out {out}')
    for index, (name, _) in enumerate(PHASES, 1):
        record = PhaseRecord(out / f'{index}_{name}.json', name, sizes.estimates[name])
        left = deadline - time.monotonic()
        if sizes.estimates[name] > left:
            record.data.update(status='skipped', error=f'estimate {sizes.estimates[name]} s '
                               f'> {max(left, 0):.0f} s left of the budget')
            record.write()
            progress(f'{name}: skipped (estimate {sizes.estimates[name]} s, '
                     f'{max(left, 0):.0f} s left)')
            records.append(record.data)
            continue
        record.write()
        progress(f'{name}: started (estimate {sizes.estimates[name]} s, {left:.0f} s left)')
        start = time.monotonic()
        # Three times its estimate at most: a hung phase must not take the later ones' time.
        status, error, output = _child(name, out, smoke, min(left, 3 * sizes.estimates[name]))
        record = PhaseRecord.read(record.path)
        record.data['seconds'] = round(time.monotonic() - start, 1)
        if record.data['status'] != 'ok':
            record.data.update(status=status, error=error, traceback=output)
        record.write()
        shown = f': {record.data["error"]}' if record.data['status'] != 'ok' else ''
        progress(f'{name}: {record.data["status"]} in {record.data["seconds"]} s{shown}')
        records.append(record.data)
    log.close()
    return records


def _child(name: str, out: pathlib.Path, smoke: bool, timeout: float) -> tuple[str, str, str]:
    """Runs phase ``name`` in a child process for at most ``timeout`` seconds: (status,
    its error in one line, the end of its output)."""
    args = [sys.executable, '-m', 'sequencer_jax.device_benchmark', f'--phase={name}',
            f'--out={out}', f'--smoke={smoke}']
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output = process.communicate(timeout=max(timeout, 1))[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        return ('timed_out', f'stopped after {timeout:.0f} s (three times its estimate, or '
                'what was left of the budget)', output[-8000:])
    lines = [line for line in output.strip().splitlines() if line.strip()]
    error = lines[-1] if lines else f'exit status {process.returncode}'
    return 'failed', error[:300], output[-8000:]


def summary(records: list[dict]) -> str:
    """The table printed last: a line per phase, then one per measured row."""
    lines = [f'{"phase":<12}{"status":<11}{"s":>6}  note']
    for r in records:
        note = r.get('error') or _phase_note(r)
        lines.append(f'{r["phase"]:<12}{r["status"]:<11}{r.get("seconds", 0):>6.0f}  {note}'
                     [:160])
    rows = [(r['phase'], key, value) for r in records for key, value in r['results'].items()
            if isinstance(value, dict) and 'images_per_s' in value]
    rows += [(r['phase'], f'{key} {part}', value[part]) for r in records
             if r['phase'] == 'timm' for key, value in r['results'].items()
             if 'error' not in value for part in ('train', 'forward')]
    if rows:
        lines.append(f'\n{"phase":<9}{"row":<40}{"img/s":>10}{"compile s":>11}{"MFU":>7}')
        for phase, key, value in rows:
            mfu = value.get('mfu_of_measured')
            lines.append(f'{phase:<9}{key:<40}{value["images_per_s"]:>10.1f}'
                         f'{value.get("compile_s", float("nan")):>11.1f}'
                         f'{"" if mfu is None else f"{100 * mfu:.1f}%":>7}')
    return '\n'.join(lines)


def _phase_note(record: dict) -> str:
    results = record['results']
    if record['phase'] == 'machine' and 'device' in results:
        return (f'{results["device"]["kind"]}; matmul bf16 '
                f'{results.get("matmul_bfloat16_tflops", 0):.1f} / fp32 '
                f'{results.get("matmul_float32_tflops", 0):.1f} TFLOP/s; copy '
                f'{results.get("copy_tb_per_s", 0):.2f} TB/s')
    if record['phase'] == 'correctness':
        worst = {k: 'error' if 'error' in v else
                 f"{max(v[e] for e in ('output', 'grad_input', 'grad_params')):.1e}"
                 for k, v in results.items() if isinstance(v, dict)}
        return ', '.join(f'{k} {v}' for k, v in worst.items())
    if record['phase'] == 'trainer' and 'resumed_run' in results:
        run = results['resumed_run']
        return (f'{run["resumed"][:1]} {run["final"][:1]} '
                f'{run["images_per_s_median"]:.0f} img/s')
    return ''


def _check_accelerator(smoke: bool) -> None:
    """A UserError, before any time is spent, when jax sees no GPU or TPU outside
    ``smoke`` mode."""
    if smoke:
        return
    probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                           capture_output=True, text=True)
    backend = probe.stdout.strip().splitlines()[-1:] or ['none']
    if backend[0] not in ('gpu', 'tpu'):
        raise UserError(f'jax sees no GPU or TPU here (backend {backend[0]!r}): this '
                        'benchmark is for the device machine. On a CPU, SMOKE=1 (--smoke) '
                        'runs every phase at toy sizes.')


def main(argv) -> None:
    del argv
    cli.require(_OUT)
    out = pathlib.Path(_OUT.value)
    sizes = SMOKE_SIZES if _SMOKE.value else DEVICE_SIZES
    if _PHASE.value:
        try:
            run_phase(_PHASE.value, out, sizes)
        except Exception as e:  # noqa: BLE001 - the driver records it
            traceback.print_exc()
            print(_one_line(e), flush=True)
            sys.exit(1)
        return
    if not 0 < _BUDGET_S.value < float('inf'):
        raise UserError(f'--budget_s={_BUDGET_S.value} must be a positive number of seconds.')
    _check_accelerator(_SMOKE.value)
    out.mkdir(parents=True, exist_ok=True)
    print(summary(drive(out, _BUDGET_S.value, _SMOKE.value)), flush=True)


if __name__ == '__main__':
    cli.run(main)
