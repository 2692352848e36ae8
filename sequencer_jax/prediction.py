"""What sequencer2d_s should do on one H100, predicted before any device run.

    python -m sequencer_jax.prediction                  # the table of docs/benchmark.md
    python -m sequencer_jax.prediction --measured=OUT   # with a device run's figures beside
    python -m sequencer_jax.prediction --count_programs # recount PROGRAMS_FILE (CUDA plugin)

A row's time per step is its parallel work, bounded by the larger of its FLOPs at a
fraction of the measured matmul ceiling and its bytes at the measured copy bandwidth,
plus what cannot overlap: one gap per kernel launched one after another (the compiled
program's launches, while loops unrolled by their trip counts) and, for the fused
Pallas kernels, their in-kernel sequential steps. The inputs are counted, not typed:
FLOPs per image from the forward's jaxpr (``benchmark.model_flops``), sequential
recurrence steps from the model's structure, and launches and memory from the XLA
programs compiled for an H100 here (``benchmark --target=h100``), kept in
``PROGRAMS_FILE``. The constants below are the assumptions, each with its reason; the
device run's JSON fills the measured column beside them (docs/benchmark.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

from absl import flags

from sequencer_jax import cli

PROGRAMS_FILE = pathlib.Path(__file__).parent / 'h100_programs.json'
MODEL, IMAGE_SIZE, TRAIN_BATCH, FORWARD_BATCH = 'sequencer2d_s', 224, 128, 256
DTYPES = ('bfloat16', 'float32')
RECURRENCES = ('natural', 'pallas')

# Measured on this workplace's H100 (the device tool's KINDS.md, 2026-11-13): an
# 8192^3 bf16 matmul at 798 TFLOP/s, a device-to-device copy at 3.0 TB/s. float32 dots
# run as TF32 on Hopper at JAX's default precision: half the bf16 rate.
CEILING_TFLOPS = {'bfloat16': 798.0, 'float32': 399.0}
COPY_TB_PER_S = 3.0
# Sequencer's GEMMs are narrow (K = 192 or 384, N up to 1152), with LayerNorm, GELU and
# gate math between them: half of the large-matmul ceiling.
GEMM_EFFICIENCY = 0.5
# Bytes per step: XLA's temporary buffers are written once and read about twice (the
# forward writes what the backward reads, the backward writes gradients it reads again).
PASSES_OVER_TEMPORARIES = 3
# Gap between kernels that depend on each other, issued by XLA:GPU one after another.
LAUNCH_S = 3e-6
# One time step inside a fused Pallas recurrence: load the gates, a [block, D] x [D, 4D]
# dot, the cell's pointwise math, store h: a few hundred cycles of dependent latency.
KERNEL_STEP_S = 1e-6
# timm's published figures (pytorch-image-models results/, AMP, cuDNN LSTM): RTX 3090
# training 462 img/s for sequencer2d_s, 0.44x vit_small_patch16_224's; RTX 4090
# inference 2321 img/s. Eager PyTorch on these small ops is bound by memory and launches,
# so they are scaled by the memory bandwidth of an H100 over each card's.
TIMM_PUBLISHED = {'sequencer2d_s_train': (462.0, 0.936), 'sequencer2d_s_forward': (2321.0, 1.008),
                  'vit_small_patch16_224_train': (462.0 / 0.44, 0.936)}


@dataclasses.dataclass(frozen=True)
class Row:
    """One predicted row: what bounds it and the images/s it gives."""

    name: str
    batch: int
    gflop_per_step: float
    gemm_ms: float
    memory_ms: float
    launches: int
    serial_ms: float
    images_per_s: float
    mfu: float
    bound: str


def sequential_steps(model, image_size: int) -> int:
    """The recurrence's time steps one forward takes one after another: per block, the
    grid's side (on square grids both axes and directions share one scan)."""
    side, steps = image_size, 0
    for patch, layers in zip(model.patch_sizes, model.layers):
        side //= patch
        steps += layers * side
    return steps


def flops_per_image(model, image_size: int) -> float:
    """Model FLOPs of one forward of one image (matmuls and convolutions, jaxpr)."""
    import jax
    import jax.numpy as jnp
    from sequencer_jax import benchmark

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']
    return benchmark.model_flops(benchmark._applied(model.clone(recurrence='scan')),
                                 params, images)


# Opcodes of an optimised XLA:GPU program that launch no kernel of their own.
_NO_KERNEL = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while',
              'conditional', 'call', 'after-all', 'opt-barrier', 'partition-id',
              'replica-id', 'add-dependency', 'domain'}
_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.\-]+) ')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = .*? ([a-z][\w\-]*)\(')


def count_program(hlo_text: str) -> dict[str, int]:
    """Kernel launches of one run of a compiled XLA:GPU program (its optimised HLO text):
    every kernel-launching instruction reached from the entry, a while loop's body
    counted its known trip count times; the loops' iterations; and the loops whose trip
    count depends on data (mixup's Beta sampling: rejection loops of one or two
    iterations), counted once."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith('{'):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.strip() == '}':
            current = None
        elif current is not None:
            computations[current].append(line)

    unknown_trips = 0

    def count(name: str) -> tuple[int, int]:
        nonlocal unknown_trips
        launches = iterations = 0
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            opcode = match.group(1)
            if opcode == 'while':
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trips = int(known.group(1)) if known else 1
                unknown_trips += not known
                body = count(re.search(r'body=%([\w.\-]+)', line).group(1))
                launches += trips * body[0]
                iterations += trips * (1 + body[1])
            elif opcode == 'conditional':
                branches = re.search(r'branch_computations=\{([^}]*)\}', line).group(1)
                launches += max(count(b.strip().lstrip('%'))[0] for b in branches.split(','))
            elif opcode == 'call':
                inner = count(re.search(r'to_apply=%([\w.\-]+)', line).group(1))
                launches, iterations = launches + inner[0], iterations + inner[1]
            elif opcode not in _NO_KERNEL:
                launches += 1
        return launches, iterations

    launches, iterations = count(entry)
    return {'launches': launches, 'loop_iterations': iterations,
            'loops_of_unknown_length': unknown_trips}


def count_programs() -> dict[str, Any]:
    """Compiles each row's program for an H100 (no GPU needed; needs jax's CUDA plugin)
    and counts it: launches, loop iterations and XLA's memory estimate."""
    import jax
    import jax.numpy as jnp
    jax.config.update('jax_platforms', 'cpu')  # before any backend starts (see benchmark)
    import optax
    from sequencer_jax import benchmark
    from sequencer_jax.models import registry
    from sequencer_jax.train import state as state_lib, steps

    device = benchmark.target_device('h100')
    programs: dict[str, Any] = {'jax': jax.__version__, 'target': 'h100'}
    for dtype in DTYPES:
        for recurrence in RECURRENCES:
            model = registry.create_model(MODEL, 1000, getattr(jnp, dtype),
                                          recurrence=recurrence)
            for kind, batch in (('train', TRAIN_BATCH), ('forward', FORWARD_BATCH)):
                params, images, labels = benchmark._abstract_inputs(model, batch, IMAGE_SIZE,
                                                                    device)
                if kind == 'forward':
                    compiled = jax.jit(benchmark._applied(model)).lower(params, images)
                else:
                    tx = optax.adamw(benchmark.LEARNING_RATE)
                    state, key = benchmark._placed(jax.eval_shape(
                        lambda p: (state_lib.create_train_state(p, tx), jax.random.PRNGKey(1)),
                        params), device)
                    step = steps.classification_train_step(model=model, tx=tx,
                                                           mix=dict(benchmark.MIXING))
                    compiled = jax.jit(step, donate_argnums=0).lower(
                        state, {'image': images, 'label': labels}, key)
                compiled = compiled.compile()
                memory = compiled.memory_analysis()
                programs[f'{kind}_{dtype}_{recurrence}'] = count_program(compiled.as_text()) | {
                    'batch': batch, 'temp_bytes': memory.temp_size_in_bytes,
                    'argument_bytes': memory.argument_size_in_bytes}
    return programs


def predict(programs: dict[str, Any] | None = None) -> list[Row]:
    """The predicted rows of our train step and forward (phases 3 and 5), then timm's
    (phase 4), from ``programs`` (default: ``PROGRAMS_FILE``)."""
    from sequencer_jax.models import registry

    programs = programs or json.loads(PROGRAMS_FILE.read_text())
    model = registry.create_model(MODEL, 1000)
    per_image = flops_per_image(model, IMAGE_SIZE)
    steps = sequential_steps(model, IMAGE_SIZE)
    rows = []
    for kind, passes, serial_passes in (('train', 3, 2), ('forward', 1, 1)):
        for dtype in DTYPES:
            for recurrence in RECURRENCES:
                program = programs[f'{kind}_{dtype}_{recurrence}']
                batch = program['batch']
                flops = passes * per_image * batch
                gemm = flops / (CEILING_TFLOPS[dtype] * 1e12 * GEMM_EFFICIENCY)
                memory = PASSES_OVER_TEMPORARIES * (program['temp_bytes']
                                                    + program['argument_bytes']) / (
                    COPY_TB_PER_S * 1e12)
                serial = program['launches'] * LAUNCH_S
                if recurrence == 'pallas':  # the time loop runs inside the kernels
                    serial += serial_passes * steps * KERNEL_STEP_S
                seconds = max(gemm, memory) + serial
                bound = 'launches' if serial > max(gemm, memory) else (
                    'GEMMs' if gemm >= memory else 'HBM')
                rows.append(Row(f'ours {kind} {dtype} {recurrence}', batch, flops / 1e9,
                                1e3 * gemm, 1e3 * memory, program['launches'], 1e3 * serial,
                                batch / seconds, flops / seconds / (CEILING_TFLOPS[dtype] * 1e12),
                                bound))
    for name, (published, bandwidth) in TIMM_PUBLISHED.items():
        rate = published * COPY_TB_PER_S / bandwidth
        rows.append(Row(f'timm {name.replace("_train", " train").replace("_forward", " forward")}'
                        ' AMP', 0, 0.0, 0.0, 0.0, 0, 0.0, rate, 0.0, 'HBM, launches (scaled)'))
    return rows


def measured(out: pathlib.Path) -> dict[str, float]:
    """The images/s a device run (``device_benchmark``'s folder ``out``) measured for each
    predicted row, by the row's name; rows it did not measure are absent."""
    def results(phase: str) -> dict:
        path = next(out.glob(f'*_{phase}.json'), None)
        return json.loads(path.read_text())['results'] if path else {}

    rates = {}
    for kind, phase in (('train', 'train'), ('forward', 'forward')):
        for key, row in results(phase).items():
            rates[f'ours {kind} {key.replace("_", " ")}'] = row['images_per_s']
    for key, row in results('timm').items():
        name, dtype = key.rsplit('_', 1)
        if dtype == 'bfloat16':
            for kind in ('train', 'forward'):
                rates[f'timm {name} {kind} AMP'] = row[kind]['images_per_s']
    return rates


def markdown_table(rows: list[Row], measured_rates: dict[str, float] | None = None) -> str:
    """The rows as docs/benchmark.md shows them, with ``measured_rates`` (see ``measured``)
    in the last column, empty until a device run fills it."""
    lines = ['| row | batch | GFLOP/step | GEMM ms | HBM ms | launches | serial ms | '
             'bound | predicted img/s | predicted MFU | measured img/s |',
             '|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|']
    for r in rows:
        numbers = (f'{r.batch} | {r.gflop_per_step:,.0f} | {r.gemm_ms:.1f} | '
                   f'{r.memory_ms:.1f} | {r.launches:,} | {r.serial_ms:.1f}'
                   if r.batch else '- | - | - | - | - | -')
        mfu = f'{100 * r.mfu:.0f}%' if r.mfu else '-'
        rate = (measured_rates or {}).get(r.name)
        shown = '' if rate is None else f'{rate:,.0f}'
        lines.append(f'| {r.name} | {numbers} | {r.bound} | {r.images_per_s:,.0f} | {mfu} | '
                     f'{shown} |')
    return '\n'.join(lines)


_MEASURED = flags.DEFINE_string('measured', None, "a device run's OUT folder: its images/s "
                                'in the last column')
_COUNT = flags.DEFINE_bool('count_programs', False, f'compile every row for an H100 and '
                           f'write their counts to {PROGRAMS_FILE.name} (needs pip install '
                           '"jax[cuda12]"; no GPU)')


def main(argv) -> None:
    del argv
    if _COUNT.value:
        programs = count_programs()
        PROGRAMS_FILE.write_text(json.dumps(programs, indent=1) + '\n')
        print(f'Wrote {PROGRAMS_FILE}')
        return
    rates = measured(pathlib.Path(_MEASURED.value)) if _MEASURED.value else None
    print(markdown_table(predict(), rates))


if __name__ == '__main__':
    cli.run(main)
