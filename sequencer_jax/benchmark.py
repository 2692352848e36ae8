"""Throughput, compile time and memory of a Sequencer variant, side by side with timm.

    python -m sequencer_jax.benchmark --model=sequencer2d_s --batch_size=8 --image_size=224 \
        --compare_timm --output_json=bench.json

Measures in one run: compile time of the forward and of the train step (forward,
backward, AdamW update), images/s of both (warm-up excluded; median and spread over
``--reps`` timed repetitions), and memory; with ``--compare_timm`` the same for timm's
PyTorch model on the same device and thread count, and the ratios. Model FLOPs (the
forward's matmuls and convolutions, counted from its jaxpr; a train step counts three
forwards; timm's model does the same math) give both sides an achieved FLOP/s, and a
model FLOPs utilisation with ``--peak_tflops`` (the device's peak for the dtype).
``--gemm`` adds the throughput of the model's largest GEMMs in their three forms
(forward ``x @ w``, input gradient ``dy @ w.T``, weight gradient ``x.T @ dy``; XLA next
to torch, XLA first): the bound on what a compiler can do for a model whose FLOPs are
mostly in those GEMMs. ``--compile_only`` reports compile times and XLA's memory
estimate without running, e.g.

    python -m sequencer_jax.benchmark --model=sequencer2d_l --batch_size=64 \
        --model_args='{"remat": true, "scan_blocks": true}' --compile_only

and ``--target`` does the same for a GPU or TPU this machine does not have: ``h100``,
``h200`` or an XLA:GPU target-config file (XLA:GPU compiles for the description; needs
jax's CUDA plugin, ``pip install "jax[cuda12]"``, but no GPU), or one chip of a TPU
``v4``, ``v5e``, ``v5p`` or ``v6e`` (libtpu compiles for the topology; needs ``pip install
"jax[tpu]"``, but no TPU): memory estimates, and the Pallas kernels through Triton or
Mosaic.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies
from jax.extend import core as jax_core
from absl import flags
from jax.sharding import SingleDeviceSharding

from sequencer_jax import cli, config_defaults, errors, host_memory, storage, xla_options
from sequencer_jax.errors import UserError
from sequencer_jax.models import registry
from sequencer_jax.train import state as state_lib
from sequencer_jax.train import steps

DTYPES = config_defaults.DTYPES
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
# The paper's on-device mixing, so that the step measured is the step trained.
MIXING = (('mixup_alpha', 0.8), ('cutmix_alpha', 1.0), ('switch_prob', 0.5), ('smoothing', 0.1))
# --model_args that change the architecture, passed to timm too so both sides match.
TIMM_ARCH_ARGS = ('layers', 'patch_sizes', 'embed_dims', 'hidden_sizes', 'mlp_ratios',
                  'bidirectional', 'union', 'with_fc')
# Settings outside the program that move CPU results by 10% or more (see the README).
ENVIRONMENT = ('XLA_FLAGS', 'GLIBC_TUNABLES', host_memory.OPT_OUT, 'OMP_NUM_THREADS',
               'OMP_WAIT_POLICY')


def _hopper_target(name: str, memory_bytes: int, bandwidth: int) -> str:
    """An XLA:GPU target config (text proto) of an sm_90 GPU with 132 SMs."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory_bytes}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{name}"
"""


# --target names of GPUs; any other XLA:GPU target config can be given as a file.
GPU_TARGETS = {
    'h100': _hopper_target('NVIDIA H100 80GB HBM3', 84_929_347_584, 3_352_320_000_000),
    'h200': _hopper_target('NVIDIA H200', 150_754_820_096, 4_800_000_000_000),
}


# --target names of TPUs: the smallest topology of each generation (one chip is used).
TPU_TOPOLOGIES = {'v4': 'v4:2x2x1', 'v5e': 'v5e:2x2', 'v5p': 'v5p:2x2x1', 'v6e': 'v6e:2x2'}


def target_device(target: str) -> jax.Device:
    """A compile-only device for ``target``: a ``TPU_TOPOLOGIES`` or ``GPU_TARGETS`` name,
    or an XLA:GPU target-config file. Only while JAX has not tried to start a GPU or TPU
    backend (which fails without the hardware and takes the plugin's compile-only
    devices with it): ``main`` sets ``jax_platforms`` to 'cpu' first."""
    if target in TPU_TOPOLOGIES:
        try:
            topology = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[target],
                                                    platform='tpu')
        except RuntimeError as e:
            if 'not installed' in str(e):
                raise UserError(f'--target {target} needs libtpu (no TPU needed): '
                                 'pip install "jax[tpu]"') from e
            # e.g. libtpu's lock: one process at a time unless ALLOW_MULTIPLE_LIBTPU_LOAD=1.
            raise UserError(f'--target {target}: libtpu did not start: {e}') from e
        return topology.devices[0]
    if target in GPU_TARGETS:
        config = GPU_TARGETS[target]
    elif os.path.isfile(target):
        with open(target) as f:
            config = f.read()
    else:
        raise UserError(f'--target {target!r} is neither one of '
                         f'{sorted(GPU_TARGETS) + sorted(TPU_TOPOLOGIES)} '
                         'nor an XLA:GPU target-config file.')
    try:
        topology = topologies.get_topology_desc(platform='cuda', topology='1x1x1',
                                                target_config=config)
    except NotImplementedError as e:
        raise UserError(f"--target {target} needs jax's CUDA plugin (no GPU needed): "
                         'pip install "jax[cuda12]"') from e
    except jax.errors.JaxRuntimeError as e:
        raise UserError(f'--target {target!r}: XLA rejected the target config: {e}') from e
    return topology.devices[0]


def cpu_name(cpuinfo: str) -> str | None:
    """The CPU named by the text of ``/proc/cpuinfo``, with its family and model numbers
    (vendors' names can be as bare as 'AMD EPYC'), e.g. 'AMD EPYC (family 26, model 2)';
    None if the text names none. Which library's GEMMs win on a CPU depends on it (the
    README's two CPU machines disagree)."""
    fields = {}
    for line in cpuinfo.split('\n\n')[0].splitlines():  # the first processor's block
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
    name = fields.get('model name')
    if not name:
        return None
    if 'cpu family' in fields and 'model' in fields:
        name += f' (family {fields["cpu family"]}, model {fields["model"]})'
    return name


def host_cpu() -> str:
    """This host's CPU: from ``/proc/cpuinfo`` on Linux, else what Python's ``platform``
    knows."""
    try:
        with open('/proc/cpuinfo') as f:
            name = cpu_name(f.read())
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def _time_calls(fn: Callable[[], Any], warmup: int, reps: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` (which must block), ``reps`` times, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters)
    return times


def _summary(seconds: list[float], batch: int) -> dict[str, float]:
    rates = [batch / s for s in seconds]
    return {'images_per_s': statistics.median(rates), 'images_per_s_min': min(rates),
            'images_per_s_max': max(rates), 'ms_per_step': 1e3 * statistics.median(seconds)}


def _memory(compiled, ran: bool) -> dict[str, float | None]:
    out: dict[str, float | None] = {'xla_estimate_mib': None, 'device_peak_mib': None}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        total = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                 + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
        out['xla_estimate_mib'] = total / 2**20
    stats = (jax.devices()[0].memory_stats() if ran else None) or {}
    if 'peak_bytes_in_use' in stats:
        out['device_peak_mib'] = stats['peak_bytes_in_use'] / 2**20
    return out


def model_flops(fn: Callable, *args) -> float:
    """Matmul and convolution FLOPs of one call of ``fn(*args)``, counted from its jaxpr
    (nothing is compiled or run). Scan bodies count once per step, which XLA's own cost
    analysis does not do (it counts a loop body once)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'dot_general':
            (contracting, _), _ = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[d] for d in contracting)
        elif eqn.primitive.name == 'conv_general_dilated':
            kernel = eqn.invars[1].aval.shape
            spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                kernel[d] for d in spec[1:])
        else:
            inner = [_jaxpr_flops(j) for j in jax_core.jaxprs_in_params(eqn.params)]
            if eqn.primitive.name == 'cond':
                total += max(inner, default=0.0)
            elif eqn.primitive.name == 'scan':
                total += eqn.params['length'] * sum(inner)
            else:
                total += sum(inner)
    return total


def _applied(model):
    """The forward of ``model`` as a function of (params, images)."""
    return lambda p, x: model.apply({'params': p}, x)


def _placed(tree, device: jax.Device):
    """The shapes of ``tree`` as ShapeDtypeStructs on ``device``; nothing is allocated."""
    sharding = SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


def _abstract_inputs(model, batch_size: int, image_size: int, device: jax.Device):
    """(params, images, labels) as shapes on ``device``."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return _placed((params['params'], images, labels), device)


def benchmark_jax(model, batch_size: int, image_size: int, warmup: int, reps: int,
                  iters: int, train: bool = True, timed: bool = True,
                  device: jax.Device | None = None, accum_steps: int = 1,
                  forward: bool = True) -> dict[str, Any]:
    """Compile time, images/s and memory of our forward (unless not ``forward``: its
    FLOPs only) and train step (its gradient summed over ``accum_steps`` micro-batches,
    see ``steps.train_step``).

    With ``timed=False`` only compiles: compile times and XLA's memory estimate, e.g.
    to check that a large configuration fits a device's memory before renting one. With
    ``device`` (a compile-only device, see ``target_device``) compiles for it and
    runs nothing.
    """
    timed = timed and device is None
    if device is None:
        rng = np.random.RandomState(0)
        images = jnp.asarray(rng.randn(batch_size, image_size, image_size, 3), jnp.float32)
        labels = jnp.asarray(rng.randint(0, model.num_classes, batch_size))
        params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])['params']
    else:
        params, images, labels = _abstract_inputs(model, batch_size, image_size, device)
    results: dict[str, Any] = {}

    options = xla_options.compiler_options(device.platform if device else None)
    results['forward'] = {}
    if forward:
        start = time.perf_counter()
        compiled = jax.jit(_applied(model), compiler_options=options).lower(
            params, images).compile()
        results['forward_compile_s'] = time.perf_counter() - start
        results['forward'] = _summary(_time_calls(
            lambda: compiled(params, images).block_until_ready(), warmup, reps, iters),
            batch_size) if timed else {}
        results['forward']['memory'] = _memory(compiled, timed)
    # Model FLOPs, the usual convention for utilisation: a train step counts three
    # forwards (forward + backward), rematerialised work not included. Counted on the
    # reference recurrence: a fused kernel's matmuls run once per grid program, unseen.
    results['forward']['flops'] = model_flops(_applied(model.clone(recurrence='scan')),
                                              params, images)
    if not train:
        return results

    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                     mask=state_lib.weight_decay_mask(params))
    if device is None:
        state, key = state_lib.create_train_state(params, tx), jax.random.PRNGKey(1)
    else:
        state, key = _placed(jax.eval_shape(
            lambda p: (state_lib.create_train_state(p, tx), jax.random.PRNGKey(1)), params),
            device)
    step = jax.jit(steps.classification_train_step(model=model, tx=tx, mix=dict(MIXING),
                                                   accum_steps=accum_steps),
                   donate_argnums=0, compiler_options=options)
    batch = {'image': images, 'label': labels}
    start = time.perf_counter()
    compiled_step = step.lower(state, batch, key).compile()
    results['train_compile_s'] = time.perf_counter() - start

    def run_step():
        nonlocal state
        state, metrics = compiled_step(state, batch, key)
        metrics['loss'].block_until_ready()

    results['train'] = _summary(_time_calls(run_step, warmup, reps, iters),
                                batch_size) if timed else {}
    results['train']['memory'] = _memory(compiled_step, timed)
    results['train']['flops'] = 3 * results['forward']['flops']
    return results


def _torch_device():
    """(device, sync) for torch: the GPU when JAX runs on one too, else the CPU; ``sync``
    waits for queued work so that timings cover it."""
    import torch

    if torch.cuda.is_available() and jax.default_backend() == 'gpu':
        return 'cuda', torch.cuda.synchronize
    return 'cpu', lambda: None


def benchmark_timm(name: str, num_classes: int, batch_size: int, image_size: int, dtype: str,
                   warmup: int, reps: int, iters: int, train: bool = True,
                   arch_args: dict | None = None, channels_last: bool = False
                   ) -> dict[str, Any]:
    """The same figures for timm's PyTorch model (eager; cuDNN LSTM and AMP on GPU), its
    weights and images in ``channels_last`` memory format when asked."""
    import timm
    import torch

    device, sync = _torch_device()
    model = timm.create_model(name, num_classes=num_classes, **(arch_args or {})).to(device)
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randn(batch_size, 3, image_size, image_size)
                              .astype(np.float32)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(rng.randint(0, num_classes, batch_size)).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
    results: dict[str, Any] = {'device': device, 'threads': torch.get_num_threads(),
                               'channels_last': channels_last}

    def forward():
        with torch.no_grad(), autocast:
            model(images)
        sync()

    model.eval()
    start = time.perf_counter()
    forward()
    results['forward_first_call_s'] = time.perf_counter() - start
    results['forward'] = _summary(_time_calls(forward, warmup, reps, iters), batch_size)
    if not train:
        return results

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_step()
    results['train_first_call_s'] = time.perf_counter() - start
    results['train'] = _summary(_time_calls(train_step, warmup, reps, iters), batch_size)
    if device == 'cuda':
        results['train']['memory'] = {
            'device_peak_mib': torch.cuda.max_memory_allocated() / 2**20}
    return results


def benchmark_checkpoint(model, image_size: int, reps: int, directory: str) -> dict[str, Any]:
    """Seconds to checkpoint the model's train state (params, AdamW moments, EMA) in
    ``directory`` as the trainer does, medians over ``reps``: the save's blocking part
    and its whole write, the restore, and the array checksums that each of the two adds
    (``checkpoint.array_checksums``; included in the save and restore times)."""
    from sequencer_jax.train import checkpoint  # orbax: only for this measurement
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 jnp.zeros((1, image_size, image_size, 3)))['params']
    state = jax.block_until_ready(state_lib.create_train_state(params, tx, use_ema=True))
    abstract = checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
    times: dict[str, list[float]] = {'save_blocking_s': [], 'save_total_s': [],
                                     'restore_s': [], 'checksums_s': []}
    manager = checkpoint.make_manager(directory, 1, None)
    try:
        for step in range(reps + 1):  # the first of each compiles the checksums
            start = time.perf_counter()
            checkpoint.save(manager, step, state, {'step': step})
            blocking = time.perf_counter() - start
            checkpoint.wait(manager)
            total = time.perf_counter() - start
            start = time.perf_counter()
            jax.block_until_ready(checkpoint.restore_latest(manager, abstract))
            restore = time.perf_counter() - start
            start = time.perf_counter()
            checkpoint.array_checksums(state)
            checksums = time.perf_counter() - start
            if step:
                for key, value in zip(times, (blocking, total, restore, checksums)):
                    times[key].append(value)
    finally:
        checkpoint.close(manager)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {'state_mib': size / 2**20} | {k: statistics.median(v) for k, v in times.items()}


def _print_table(name: str, ours: dict, timm_results: dict | None) -> None:
    rows = [('forward', 'forward'), ('train step', 'train')]
    print(f'\n{name}: images/s (median [min, max]), compile time, XLA memory estimate')
    header = f'{"":<12}{"sequencer-jax":>44}'
    if timm_results:
        header += f'{"timm":>34}{"ratio":>8}'
    print(header)
    for label, key in rows:
        if key not in ours:
            continue
        r = ours[key]
        rate = (f'{r["images_per_s"]:>12.2f} [{r["images_per_s_min"]:.2f}, '
                f'{r["images_per_s_max"]:.2f}]' if 'images_per_s' in r else f'{"-":>12}')
        memory = r['memory']['xla_estimate_mib']
        line = (f'{label:<12}{rate}  {ours[key + "_compile_s"]:>6.1f}s'
                f'{float("nan") if memory is None else memory:>9.0f} MiB')
        if timm_results and key in timm_results:
            t = timm_results[key]
            line += (f'{t["images_per_s"]:>12.2f} [{t["images_per_s_min"]:.2f}, '
                     f'{t["images_per_s_max"]:.2f}]  (eager)'
                     f'{r["images_per_s"] / t["images_per_s"]:>8.2f}x')
        print(line)


def flop_rates(results: dict[str, Any], peak_tflops: float | None) -> dict[str, dict]:
    """Achieved TFLOP/s of each timed step (ours and timm's, same model FLOPs), and its
    fraction of ``peak_tflops`` when given (model FLOPs utilisation)."""
    rates: dict[str, dict] = {}
    for key in ('forward', 'train'):
        ours = results['sequencer_jax'].get(key, {})
        if not ours.get('flops') or 'ms_per_step' not in ours:
            continue
        row = {'gflops_per_step': ours['flops'] / 1e9}
        for side in ('sequencer_jax', 'timm'):
            timed = results.get(side, {}).get(key)
            if timed:
                row[f'{side}_tflops'] = ours['flops'] / timed['ms_per_step'] / 1e9
                if peak_tflops:
                    row[f'{side}_mfu'] = row[f'{side}_tflops'] / peak_tflops
        rates[key] = row
    return rates


def _print_flop_rates(rates: dict[str, dict]) -> None:
    print('\nModel FLOPs (matmuls and convolutions; train step = 3 forwards) and achieved '
          'TFLOP/s [utilisation of --peak_tflops]')
    for key, row in rates.items():
        line = f'  {key:<8}{row["gflops_per_step"]:>9.4g} GFLOP/step'
        for side, label in (('sequencer_jax', 'ours'), ('timm', 'timm')):
            if f'{side}_tflops' in row:
                line += f'   {label} {row[f"{side}_tflops"]:.3g}'
                if f'{side}_mfu' in row:
                    line += f' [{100 * row[f"{side}_mfu"]:.1f}%]'
        print(line)


def dense_shapes(model, batch_size: int, image_size: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of each stage's MLP's first Linear ([tokens, C] x [C, ratio*C]): the
    GEMMs that, with the LSTM input projections of the same M and K, carry most of a
    Sequencer's FLOPs. Repeated shapes are listed once."""
    shapes, side = [], image_size
    for patch, dim, ratio in zip(model.patch_sizes, model.embed_dims, model.mlp_ratios):
        side //= patch
        shape = (batch_size * side * side, dim, int(ratio * dim))
        if shape not in shapes:
            shapes.append(shape)
    return shapes


# The three products of a Linear layer x [M, K] @ w [K, N]: forward, input gradient,
# weight gradient, as (name, operand shapes, function).
GEMM_FORMS = (
    ('x @ w', lambda m, k, n: ((m, k), (k, n)), lambda a, b: a @ b),
    ('dy @ w.T', lambda m, k, n: ((m, n), (k, n)), lambda a, b: a @ b.T),
    ('x.T @ dy', lambda m, k, n: ((m, k), (m, n)), lambda a, b: a.T @ b),
)


def benchmark_gemm(shapes: list[tuple[int, int, int]], dtype: str, reps: int,
                   library: str) -> list[dict[str, Any]]:
    """GFLOP/s of ``library``'s ('xla' or 'torch') matmul for each (M, K, N) in the
    three forms of ``GEMM_FORMS``: one row per shape and form.

    Run XLA's before torch has run anything: torch's OpenMP workers keep spinning on
    the cores after each call, which cost XLA up to 40% of its GEMM throughput when the
    two were timed alternately on 2 cores (with ``OMP_WAIT_POLICY=passive`` the loss
    went away).
    """
    rows = []
    options = xla_options.compiler_options()
    for m, k, n in shapes:
        for form, operand_shapes, product in GEMM_FORMS:
            a_shape, b_shape = operand_shapes(m, k, n)
            if library == 'xla':
                a, b = jnp.ones(a_shape, DTYPES[dtype]), jnp.ones(b_shape, DTYPES[dtype])
                compiled = jax.jit(product, compiler_options=options).lower(a, b).compile()

                def call():
                    compiled(a, b).block_until_ready()
            else:
                import torch
                device, sync = _torch_device()
                a = torch.ones(a_shape, dtype=getattr(torch, dtype), device=device)
                b = torch.ones(b_shape, dtype=getattr(torch, dtype), device=device)

                def call():
                    product(a, b)
                    sync()
            seconds = statistics.median(_time_calls(call, 2, reps, 1))
            rows.append({'shape': [m, k, n], 'form': form,
                         f'{library}_gflops': 2 * m * k * n / seconds / 1e9})
    return rows


def _print_gemm(rows: list[dict[str, Any]]) -> None:
    print('\nGEMMs of this model, x [M, K] @ w [K, N] and its gradients '
          '(GFLOP/s, median; XLA timed before torch ran)')
    for row in rows:
        m, k, n = row['shape']
        line = f'  M={m} K={k} N={n}  {row["form"]:<9} XLA {row["xla_gflops"]:8.1f}'
        if 'torch_gflops' in row:
            line += (f'   torch {row["torch_gflops"]:8.1f}   ratio '
                     f'{row["xla_gflops"] / row["torch_gflops"]:.2f}x')
        print(line)


_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(DTYPES), 'compute dtype')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed calls first', lower_bound=0)
_REPS = flags.DEFINE_integer('reps', 5, 'timed repetitions', lower_bound=1)
_ITERS = flags.DEFINE_integer('iters', 1, 'calls per repetition', lower_bound=1)
_FORWARD_ONLY = flags.DEFINE_bool('forward_only', False, 'skip the train step')
_COMPILE_ONLY = flags.DEFINE_bool('compile_only', False,
                                  "only compile: compile times and XLA's memory estimate")
_TARGET = flags.DEFINE_string(
    'target', None, 'compile for this GPU or TPU without having one (implies '
    f'--compile_only): one of {sorted(GPU_TARGETS)} or an XLA:GPU target-config file (needs '
    f'pip install "jax[cuda12]"), or a chip of a TPU {sorted(TPU_TOPOLOGIES)} (needs pip '
    'install "jax[tpu]")')
_GEMM = flags.DEFINE_bool('gemm', False, "also measure the matmul throughput of the model's "
                          'largest GEMM shapes (with --compare_timm: XLA next to torch)')
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', None, "the device's peak TFLOP/s for "
                                  '--dtype: adds model FLOPs utilisation (MFU) of both sides')
_COMPARE_TIMM = flags.DEFINE_bool('compare_timm', False,
                                  'also measure timm (needs torch and timm installed)')
_THREADS = flags.DEFINE_integer('threads', None, 'torch intra-op threads (default: all '
                                'cores, as XLA uses)', lower_bound=1)
_CHECKPOINT_DIR = flags.DEFINE_string(
    'checkpoint_dir', None, "also time checkpoints of the model's train state written there "
    '(the save, the restore, and what the array checksums add to each)')
_GRAD_ACCUM_STEPS = flags.DEFINE_integer(
    'grad_accum_steps', 1, 'the train step sums its gradient over this many micro-batches '
    '(config.grad_accum_steps); must divide --batch_size', lower_bound=1)
for _name in ('model', 'batch_size', 'image_size', 'num_classes', 'model_args', 'output_json'):
    flags.declare_key_flag(_name)
# Defaults of the shared flags.
DEFAULT_MODEL, DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE, DEFAULT_NUM_CLASSES = \
    'sequencer2d_s', 8, 224, 1000


def _arguments() -> types.SimpleNamespace:
    """The flags' values (recorded in the results' ``config``), checked together."""
    args = types.SimpleNamespace(
        model=cli.MODEL.value or DEFAULT_MODEL,
        batch_size=cli.BATCH_SIZE.value or DEFAULT_BATCH_SIZE,
        image_size=cli.IMAGE_SIZE.value or DEFAULT_IMAGE_SIZE,
        num_classes=cli.NUM_CLASSES.value or DEFAULT_NUM_CLASSES, dtype=_DTYPE.value,
        warmup=_WARMUP.value, reps=_REPS.value, iters=_ITERS.value,
        forward_only=_FORWARD_ONLY.value, compile_only=_COMPILE_ONLY.value,
        target=_TARGET.value, gemm=_GEMM.value, peak_tflops=_PEAK_TFLOPS.value,
        compare_timm=_COMPARE_TIMM.value, threads=_THREADS.value,
        grad_accum_steps=_GRAD_ACCUM_STEPS.value, model_args=cli.MODEL_ARGS.value,
        output_json=cli.OUTPUT_JSON.value, checkpoint_dir=_CHECKPOINT_DIR.value)
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        raise UserError(f'--peak_tflops={args.peak_tflops} must be a positive number.')
    if args.target and (args.compare_timm or args.gemm):
        raise UserError('--target only compiles; drop --compare_timm and --gemm.')
    if args.compile_only and args.compare_timm:
        raise UserError('--compile_only measures no speed; drop --compare_timm.')
    if args.grad_accum_steps > 1 and (args.compare_timm or args.forward_only):
        raise UserError('--grad_accum_steps changes only our train step; drop --compare_timm '
                        'and --forward_only.')
    if args.batch_size % args.grad_accum_steps:
        raise UserError(f'--grad_accum_steps={args.grad_accum_steps} must divide '
                        f'--batch_size={args.batch_size}.')
    if args.compare_timm:
        errors.require_package('timm', '--compare_timm', extra='torch')
    return args


def main(argv) -> dict[str, Any]:
    del argv
    args = _arguments()
    output_json = cli.output_file(cli.OUTPUT_JSON)
    device = None
    if args.target:
        # Before any backend starts: a GPU or TPU backend that failed to start (none here)
        # would take the plugin's compile-only devices with it.
        jax.config.update('jax_platforms', 'cpu')
        device = target_device(args.target)
    overrides = registry.overrides_from_json(args.model_args)
    model = registry.create_model(args.model, args.num_classes, DTYPES[args.dtype], **overrides)
    model.check_input_shape((1, args.image_size, args.image_size, model.in_chans))
    if args.compare_timm:
        import timm  # the optional reference, checked above
        import torch
        torch.set_num_threads(args.threads or os.cpu_count())

    target = device or jax.devices()[0]
    results: dict[str, Any] = {
        'config': vars(args) | {'model_args': overrides},
        'platform': {'backend': (f'{device.platform}, compile only' if device
                                 else jax.default_backend()),
                     'device': str(target), 'device_kind': target.device_kind,
                     'host_cpu': host_cpu(), 'cpus': os.cpu_count(),
                     'machine': platform.machine(), 'jax': jax.__version__,
                     'compiler_options': xla_options.compiler_options(target.platform),
                     'environment': {name: os.environ.get(name) for name in ENVIRONMENT},
                     'transparent_hugepages': host_memory.transparent_hugepages()},
    }
    if args.compare_timm:
        results['platform'] |= {'torch': torch.__version__, 'timm': timm.__version__}
    host = (f': {results["platform"]["host_cpu"]}, {results["platform"]["cpus"]} CPUs'
            if target.platform == 'cpu' else '')
    print(f'Benchmarking {args.model} on {results["platform"]["device_kind"]} '
          f'({results["platform"]["backend"]}{host}), batch {args.batch_size}, '
          f'{args.image_size}px, {args.dtype}', flush=True)
    results['sequencer_jax'] = benchmark_jax(model, args.batch_size, args.image_size,
                                             args.warmup, args.reps, args.iters,
                                             not args.forward_only, not args.compile_only,
                                             device, args.grad_accum_steps)
    shapes = dense_shapes(model, args.batch_size, args.image_size) if args.gemm else []
    if args.gemm:  # XLA's side before torch runs anything (see benchmark_gemm)
        results['gemm'] = benchmark_gemm(shapes, args.dtype, args.reps, 'xla')
    timm_results = None
    if args.compare_timm:
        timm_results = benchmark_timm(args.model, args.num_classes, args.batch_size,
                                      args.image_size, args.dtype, args.warmup, args.reps,
                                      args.iters, not args.forward_only,
                                      {k: v for k, v in overrides.items() if k in TIMM_ARCH_ARGS})
        results['timm'] = timm_results
        results['ratio'] = {k: results['sequencer_jax'][k]['images_per_s']
                            / timm_results[k]['images_per_s']
                            for k in ('forward', 'train') if k in timm_results}
    _print_table(args.model, results['sequencer_jax'], timm_results)
    results['flop_rates'] = flop_rates(results, args.peak_tflops)
    if results['flop_rates']:
        _print_flop_rates(results['flop_rates'])
    if args.gemm:
        if args.compare_timm:
            for row, torch_row in zip(results['gemm'],
                                      benchmark_gemm(shapes, args.dtype, args.reps, 'torch')):
                row.update(torch_row)
        _print_gemm(results['gemm'])
    if args.checkpoint_dir:
        results['checkpoint'] = benchmark_checkpoint(model, args.image_size, args.reps,
                                                     args.checkpoint_dir)
        c = results['checkpoint']
        print(f"checkpoint of {c['state_mib']:,.0f} MiB: save {c['save_blocking_s']:.2f} s "
              f"blocking, {c['save_total_s']:.2f} s written; restore {c['restore_s']:.2f} s; "
              f"checksums {c['checksums_s']:.2f} s of each", flush=True)
    if output_json:
        storage.write_json(output_json, results)
    return results


if __name__ == '__main__':
    cli.run(main, huge_pages=True)
