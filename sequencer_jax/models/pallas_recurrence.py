"""Fused recurrence kernels in Pallas: the whole time loop of a recurrence in one kernel,
the carry kept on chip, forward and backward, on GPUs and TPUs.

XLA runs a ``lax.scan`` as a loop of separate kernels per step (the recurrent matmul, the
gate arithmetic, the slice updates), each launched and reading its operands from memory.
Here the carry of a block of sequences stays on chip for all T steps and each step reads
only its input gates. The backward kernel runs the steps in reverse, recomputes each
step's gates from the saved carries and differentiates ``Cell.step_gates`` (the same
formulas as the XLA paths) with ``jax.vjp``; the weight gradient
``sum_t h_{t-1}^T dgates_t`` is left to one large XLA matmul after the kernel, where it
runs at GEMM speed. Forward mode has its own kernel: the tangent kernel runs the steps
forwards and pushes tangents through ``Cell.step_gates`` with ``jax.jvp``; reverse mode
transposes that linear map into the backward kernel (``_LinearisedRecurrence``). One
step's arithmetic (``_step_forward``, ``_step_backward``, ``_step_tangent``) is shared by
two program forms:

* GPUs (Triton): a grid ``(K, N / block)`` of programs that run concurrently, each
  looping over all T steps of its ``block`` sequences. Triton needs power-of-two block
  sides: the hidden size is zero-padded to a power of two (padded units stay exactly zero:
  zero weights and inputs give ``i = f = o = 1/2``, ``g = 0``, so ``c = h = 0``) and the
  number of sequences to a multiple of the block.
* TPUs (Mosaic): a TPU core runs a grid's programs one after another, so many short
  programs would each multiply a few rows on the MXU. Instead the grid is
  ``(K, N / bn, T)`` with time innermost and sequential: each program is one step of a
  large block of sequences (``_tpu_block``: as many as VMEM holds, hundreds), the carry
  stays in VMEM scratch between steps, and Pallas' pipeline fetches the next step's
  gates while this one computes. Time runs backwards through the index maps.

The gates lie side by side on the last axis ([..., G * Dp]), so that the TPU's (8, 128)
tiles are not padded along a short gate axis. On CPU the GPU form runs in Pallas'
interpreter, which is how the tests check the arithmetic against the ``nn.scan`` path;
that is for testing, not speed. The platform is chosen when lowering, so that exporting
or compiling for a GPU or TPU from a CPU host gets its kernels.

XLA cannot split a Mosaic or Triton kernel over devices. Under a multi-device mesh set
with ``jax.set_mesh`` (the trainer sets its own), the kernels run inside ``shard_map``,
each device on its share of the sequences (they are independent; the batch is what the
mesh splits); the weights' gradients are summed by XLA outside.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import hijax, pallas as pl
from jax.experimental.pallas import tpu as pl_tpu
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import PartitionSpec

from sequencer_jax.models.recurrent import Cell, cotangent_like

Array = jax.Array

# Sequences per program: stage 0 of sequencer2d_s at batch 64 (4 recurrences of 2,048
# sequences) makes 256 programs, enough to fill a GPU's ~100-150 multiprocessors.
DEFAULT_BLOCK = 32
# Triton's dot needs every side of its operands to be at least 16.
_MIN_SIDE = 16
# One stage: software pipelining cannot overlap the steps of a recurrence, and Triton's
# default 3 stages asked for 387 KB of shared memory in the LSTM backward (sm_90 has 227).
_TRITON = dict(num_warps=4, num_stages=1)
# TPU: a step's blocks, double-buffered, take at most this much VMEM, leaving the rest of
# the default scoped VMEM (16 MiB on v4 and v5e, more on later chips) to the kernel's
# temporaries (the gates and their cotangents, a few blocks' worth).
_TPU_VMEM_BUDGET = 4 * 2**20
# float32 rows of a TPU tile.
_TPU_MIN_BLOCK = 8


def _next_power_of_two(n: int) -> int:
    return max(_MIN_SIDE, 1 << (n - 1).bit_length())


def _time_index(k: Array, s: Array, length: int, reverse: Sequence[bool]) -> Array:
    """The input time index of processing step s of recurrence k (the grid's first axis)."""
    flipped = [k == i for i, r in enumerate(reverse) if r]
    if not flipped:
        return s
    return jnp.where(functools.reduce(jnp.logical_or, flipped), length - 1 - s, s)


def _matmuls(h: Array, w_ref, dtype: Any) -> list[Array]:
    """``h @ W_hh`` per gate: [bn, Dp] each."""
    return [jnp.dot(h.astype(dtype), w_ref[q].astype(dtype),
                    preferred_element_type=jnp.float32) for q in range(w_ref.shape[0])]


def _recurrent_gates(h: Array, w_ref, b_hh_ref, dtype: Any) -> list[Array]:
    """``h @ W_hh + b_hh`` per gate: [bn, Dp] each."""
    return [m + b_hh_ref[q] for q, m in enumerate(_matmuls(h, w_ref, dtype))]


def _gate_slice(q: int, dp: int) -> slice:
    """Gate q's units on the last axis of a [..., G * Dp] array."""
    return slice(q * dp, (q + 1) * dp)


def _gates_at(ref, at: tuple, num_gates: int, dp: int) -> list[Array]:
    """Each gate's part of ``ref[at]`` ([bn, G*Dp]): [bn, Dp] each. Slices of the ref, not
    of a loaded value: Triton cannot slice values."""
    return [ref[(*at, slice(None), _gate_slice(q, dp))] for q in range(num_gates)]


def _input_gates(gx_ref, b_ih_ref, at: tuple) -> list[Array]:
    """``gx + b_ih`` per gate from ``gx_ref[at]`` ([bn, G*Dp]): [bn, Dp] each."""
    num_gates, _, dp = b_ih_ref.shape
    return [x + b_ih_ref[q] for q, x in enumerate(_gates_at(gx_ref, at, num_gates, dp))]


def _step_forward(cell: Cell, dtype: Any, weight_refs, gx_ref, at: tuple, carry):
    """One step of a block of sequences: the carry after it. ``weight_refs`` are
    (w [G, Dp, Dp], b_ih [G, 1, Dp], b_hh [G, 1, Dp]); the step's input gates are
    ``gx_ref[at]`` [bn, G*Dp]; carry: [bn, Dp] arrays."""
    w_ref, b_ih_ref, b_hh_ref = weight_refs
    carry, _ = cell.step_gates(carry, _input_gates(gx_ref, b_ih_ref, at),
                               _recurrent_gates(carry[0], w_ref, b_hh_ref, dtype))
    return carry


def _step_backward(cell: Cell, dtype: Any, weight_refs, gx_ref, at: tuple, prev, d_carry,
                   d_gate_refs):
    """The backward of one step: the cotangent of its input carry ``prev`` from
    ``d_carry`` (of its output carry). Writes the gates' cotangents to
    ``d_gate_refs[i][at]`` [bn, G*Dp] (gx's and, for the GRU whose two sides differ,
    gh's)."""
    w_ref, b_ih_ref, b_hh_ref = weight_refs
    dp = b_ih_ref.shape[-1]
    gx = _input_gates(gx_ref, b_ih_ref, at)
    gh = _recurrent_gates(prev[0], w_ref, b_hh_ref, dtype)
    _, vjp = jax.vjp(lambda c, x, h: cell.step_gates(c, x, h)[0], prev, gx, gh)
    d_prev, d_gx, d_gh = vjp(d_carry)
    for ref, d_gates in zip(d_gate_refs, (d_gx, d_gh)):
        for q, dq in enumerate(d_gates):
            ref[(*at, slice(None), _gate_slice(q, dp))] = dq
    d_h = d_prev[0]
    for q, dq in enumerate(d_gh):
        d_h = d_h + jax.lax.dot_general(dq.astype(dtype), w_ref[q].astype(dtype),
                                        (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
    return (d_h,) + tuple(d_prev[1:])


def _step_tangent(cell: Cell, dtype: Any, weight_refs, gx_ref, at: tuple, prev, d_prev,
                  d_gx_ref, d_gh_ref):
    """The tangent of one step: its output carry's from ``d_prev`` (the tangent of its
    input carry ``prev``) and the step's gate tangents ``d_gx_ref[at]`` (of gx + b_ih)
    and ``d_gh_ref[at]`` (of the weights' part, h_prev @ dW_hh + db_hh) [bn, G*Dp];
    the part d_h_prev @ W_hh is added here."""
    w_ref, b_ih_ref, b_hh_ref = weight_refs
    num_gates, _, dp = b_ih_ref.shape
    gx = _input_gates(gx_ref, b_ih_ref, at)
    gh = _recurrent_gates(prev[0], w_ref, b_hh_ref, dtype)
    d_gx = _gates_at(d_gx_ref, at, num_gates, dp)
    d_gh = [d + m for d, m in zip(_gates_at(d_gh_ref, at, num_gates, dp),
                                  _matmuls(d_prev[0], w_ref, dtype))]
    return jax.jvp(lambda c, x, h: cell.step_gates(c, x, h)[0], (prev, gx, gh),
                   (d_prev, d_gx, d_gh))[1]


def _previous(carry_refs, k: Array, s: Array, length: int, reverse: Sequence[bool]):
    """The input carry of processing step s, from the forward's carries [T, bn, Dp]:
    the step before's output (zero at the first step)."""
    t_prev = _time_index(k, jnp.maximum(s - 1, 0), length, reverse)
    return tuple(jnp.where(s > 0, ref[t_prev], 0.0) for ref in carry_refs)


def _zero_state_at_first_step(state_refs) -> None:
    """TPU form: the scratch carried across steps starts at zero."""
    @pl.when(pl.program_id(2) == 0)
    def _start():
        for ref in state_refs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)


def _forward_loop_kernel(*refs, cell, reverse, dtype):
    """GPU form: all T steps of one (recurrence, block) program. Refs: the three weights,
    gx [T, bn, G*Dp], then the outputs: every step's carry [T, bn, Dp]."""
    weight_refs, gx_ref, carry_refs = refs[:3], refs[3], refs[4:]
    length, bn, dp = carry_refs[0].shape
    k = pl.program_id(0)

    def step(s, carry):
        t = _time_index(k, s, length, reverse)
        carry = _step_forward(cell, dtype, weight_refs, gx_ref, (t,), carry)
        for ref, value in zip(carry_refs, carry):
            ref[t] = value
        return carry

    zeros = jnp.zeros((bn, dp), jnp.float32)
    jax.lax.fori_loop(0, length, step, (zeros,) * len(carry_refs))


def _backward_loop_kernel(*refs, cell, reverse, dtype):
    """GPU form, backward: the steps in reverse. Refs: as the forward's, then its carries
    and the hidden states' cotangent [T, bn, Dp]; outputs the gates' cotangents."""
    n_carry = cell.num_carries
    weight_refs, gx_ref, carry_refs = refs[:3], refs[3], refs[4:4 + n_carry]
    d_hs_ref, d_gate_refs = refs[4 + n_carry], refs[5 + n_carry:]
    length, bn, dp = d_hs_ref.shape
    k = pl.program_id(0)

    def step(i, d_carry):
        s = length - 1 - i
        t = _time_index(k, s, length, reverse)
        d_carry = (d_carry[0] + d_hs_ref[t],) + tuple(d_carry[1:])
        return _step_backward(cell, dtype, weight_refs, gx_ref, (t,),
                              _previous(carry_refs, k, s, length, reverse), d_carry,
                              d_gate_refs)

    zeros = jnp.zeros((bn, dp), jnp.float32)
    jax.lax.fori_loop(0, length, step, (zeros,) * n_carry)


def _tangent_loop_kernel(*refs, cell, reverse, dtype):
    """GPU form, tangent: the steps forward. Refs: the three weights, gx, the forward's
    carries, the gates' tangents (see ``_step_tangent``) [T, bn, G*Dp]; outputs the hidden
    states' tangent [T, bn, Dp]."""
    n_carry = cell.num_carries
    weight_refs, gx_ref, carry_refs = refs[:3], refs[3], refs[4:4 + n_carry]
    d_gx_ref, d_gh_ref, d_hs_ref = refs[4 + n_carry:]
    length, bn, dp = d_hs_ref.shape
    k = pl.program_id(0)

    def step(s, d_carry):
        t = _time_index(k, s, length, reverse)
        d_carry = _step_tangent(cell, dtype, weight_refs, gx_ref, (t,),
                                _previous(carry_refs, k, s, length, reverse), d_carry,
                                d_gx_ref, d_gh_ref)
        d_hs_ref[t] = d_carry[0]
        return d_carry

    zeros = jnp.zeros((bn, dp), jnp.float32)
    jax.lax.fori_loop(0, length, step, (zeros,) * n_carry)


def _forward_step_kernel(*refs, cell, dtype):
    """TPU form: step ``program_id(2)`` of one (recurrence, block). Refs: the three
    weights, this step's gx [bn, G*Dp], its carry outputs [bn, Dp], and the carry kept in
    scratch between steps."""
    n_carry = cell.num_carries
    weight_refs, gx_ref = refs[:3], refs[3]
    carry_refs, state_refs = refs[4:4 + n_carry], refs[4 + n_carry:]

    _zero_state_at_first_step(state_refs)
    carry = _step_forward(cell, dtype, weight_refs, gx_ref, (),
                          tuple(ref[...] for ref in state_refs))
    for out, state, value in zip(carry_refs, state_refs, carry):
        out[...] = value
        state[...] = value


def _backward_step_kernel(*refs, cell, dtype):
    """TPU form, backward: processing step ``program_id(2)`` counted from the last. Refs:
    the three weights, this step's gx, the previous step's carries, this step's hidden
    cotangent; outputs this step's gates' cotangents; scratch: the carry's cotangent."""
    n_carry = cell.num_carries
    weight_refs, gx_ref, prev_refs = refs[:3], refs[3], refs[4:4 + n_carry]
    d_hs_ref, d_gate_refs = refs[4 + n_carry], refs[5 + n_carry:-n_carry]
    state_refs = refs[-n_carry:]
    _zero_state_at_first_step(state_refs)
    first_step = pl.program_id(2) == pl.num_programs(2) - 1  # its input carry is zero
    prev = tuple(jnp.where(first_step, 0.0, ref[...]) for ref in prev_refs)
    d_carry = ((state_refs[0][...] + d_hs_ref[...],)
               + tuple(ref[...] for ref in state_refs[1:]))
    d_prev = _step_backward(cell, dtype, weight_refs, gx_ref, (), prev, d_carry, d_gate_refs)
    for ref, value in zip(state_refs, d_prev):
        ref[...] = value


def _tangent_step_kernel(*refs, cell, dtype):
    """TPU form, tangent: step ``program_id(2)``. Refs: the three weights, this step's gx,
    the previous step's carries, this step's gate tangents; outputs this step's hidden
    tangent; scratch: the carry's tangent."""
    n_carry = cell.num_carries
    weight_refs, gx_ref, prev_refs = refs[:3], refs[3], refs[4:4 + n_carry]
    d_gx_ref, d_gh_ref, d_hs_ref = refs[4 + n_carry:7 + n_carry]
    state_refs = refs[7 + n_carry:]
    _zero_state_at_first_step(state_refs)
    first_step = pl.program_id(2) == 0  # its input carry is zero
    prev = tuple(jnp.where(first_step, 0.0, ref[...]) for ref in prev_refs)
    d_carry = _step_tangent(cell, dtype, weight_refs, gx_ref, (), prev,
                            tuple(ref[...] for ref in state_refs), d_gx_ref, d_gh_ref)
    d_hs_ref[...] = d_carry[0]
    for ref, value in zip(state_refs, d_carry):
        ref[...] = value


def _weight_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
    """Weights [K, G, ...]: recurrence k's, for any grid whose first axis is k."""
    return pl.BlockSpec((None, *shape[1:]), lambda k, *_: (k,) + (0,) * (len(shape) - 1))


def _out_shapes(shapes, sequences: Sequence[Array]) -> list[jax.ShapeDtypeStruct]:
    """float32 outputs of these shapes that vary over the manual mesh axes (inside
    ``jax.shard_map``) as the sequences do, which its ``check_vma`` requires."""
    manual = jax.typeof(sequences[0]).manual_axis_type
    return [jax.ShapeDtypeStruct(s, jnp.float32, manual_axis_type=manual) for s in shapes]


def _loop_call(kernel, weights: Sequence[Array], sequences: Sequence[Array],
               out_shapes: Sequence[tuple[int, ...]], block: int, **options):
    """The GPU form: ``kernel(*weights, *sequences, *outputs)`` on the grid (K, Np / block);
    sequences and outputs [T, K, Np, ...] blocked over K and Np, all T steps at once."""
    length, k, n = out_shapes[0][:3]

    def sequence_spec(shape):
        rest = shape[3:]
        return pl.BlockSpec((length, None, block, *rest),
                            lambda i, j: (0, i, j) + (0,) * len(rest))

    return pl.pallas_call(
        kernel, grid=(k, n // block),
        in_specs=[_weight_spec(w.shape) for w in weights]
        + [sequence_spec(x.shape) for x in sequences],
        out_specs=[sequence_spec(s) for s in out_shapes],
        out_shape=_out_shapes(out_shapes, sequences),
        **options,
    )(*weights, *sequences)


def _tpu_block(n: int, shapes: Sequence[tuple[int, ...]]) -> int:
    """Sequences per TPU step: the largest multiple of 8 dividing ``n`` whose one-step
    blocks of the [T, K, Np, ...] ``shapes``, double-buffered, fit ``_TPU_VMEM_BUDGET``."""
    bytes_per_sequence = sum(math.prod(s[3:]) * 4 for s in shapes)
    fitting = _TPU_VMEM_BUDGET // (2 * bytes_per_sequence)
    divisors = [b for b in range(_TPU_MIN_BLOCK, n + 1, _TPU_MIN_BLOCK) if n % b == 0]
    return max([b for b in divisors if b <= fitting], default=_TPU_MIN_BLOCK)


def _step_call(kernel, weights: Sequence[Array], sequences: Sequence[Array],
               at_previous_step: Sequence[bool], out_shapes: Sequence[tuple[int, ...]],
               reverse: Sequence[bool], backward: bool, n_state: int, **options):
    """The TPU form: ``kernel(*weights, *sequences, *outputs, *scratch)`` on the grid
    (K, Np / bn, T), one step per program, processing order along the last axis (from the
    last step when ``backward``); a sequence marked in ``at_previous_step`` is read at
    the step before in processing order (clamped at the first: the kernel masks it).
    ``n_state`` scratch arrays [bn, Dp] carry state across steps. ``options`` go to
    ``pallas_call`` (the tests interpret this form on CPU)."""
    length, k, n = out_shapes[0][:3]
    dp = weights[0].shape[-1]
    bn = _tpu_block(n, [x.shape for x in sequences] + list(out_shapes))

    def processing_step(i):
        return length - 1 - i if backward else i

    def sequence_spec(shape, previous=False):
        def index(kk, j, i):
            s = processing_step(i)
            s = jnp.maximum(s - 1, 0) if previous else s
            return (_time_index(kk, s, length, reverse), kk, j) + (0,) * len(shape[3:])
        return pl.BlockSpec((None, None, bn, *shape[3:]), index)

    return pl.pallas_call(
        kernel, grid=(k, n // bn, length),
        in_specs=[_weight_spec(w.shape) for w in weights]
        + [sequence_spec(x.shape, p) for x, p in zip(sequences, at_previous_step)],
        out_specs=[sequence_spec(s) for s in out_shapes],
        out_shape=_out_shapes(out_shapes, sequences),
        scratch_shapes=[pl_tpu.VMEM((bn, dp), jnp.float32)] * n_state,
        compiler_params=pl_tpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')),
        **options,
    )(*weights, *sequences)


def _on_platform(loop_call, step_call):
    """``loop_call(**pallas_call options)`` (the GPU form) on GPUs and, interpreted, on
    CPU; ``step_call(**options)`` (the TPU form) on TPUs. Chosen when lowering."""
    triton = lambda: loop_call(compiler_params=pl_triton.CompilerParams(**_TRITON))  # noqa: E731
    return jax.lax.platform_dependent(cpu=lambda: loop_call(interpret=True), cuda=triton,
                                      rocm=triton, tpu=step_call)


def _per_shard(mesh, kernels, weights: Sequence[Array], sequences: Sequence[Array]):
    """``kernels(weights, sequences)`` on each device's share of the sequences (axis 2 of
    [T, K, Np, ...], split over every axis of ``mesh``; weights whole). XLA cannot split
    a Mosaic or Triton kernel over devices itself, and the sequences are independent."""
    axes = _split_axes(mesh)
    if _devices_over(mesh, axes) == 1:
        return kernels(tuple(weights), tuple(sequences))
    split = PartitionSpec(None, None, axes)
    return jax.shard_map(kernels, mesh=mesh, in_specs=(PartitionSpec(), split),
                         out_specs=split, axis_names=frozenset(axes),
                         check_vma=False)(tuple(weights), tuple(sequences))


def _split_axes(mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` the sequences are still to be split over: all but the manual
    ones (inside a user's ``shard_map`` the sequences are already that device's share)."""
    return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def _devices_over(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def _fold_batch(x: Array, batched: bool, size: int, axis: int) -> Array:
    """``x`` [B, ...] (broadcast to B copies when not ``batched``) with B folded into
    ``axis`` of the unbatched shape, batch-major: [T, K, N, C] at axis 2 -> [T, K, B*N, C]."""
    x = jnp.moveaxis(x if batched else jnp.broadcast_to(x, (size, *x.shape)), 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _unfold_batch(x: Array, size: int, axis: int) -> Array:
    """The inverse of ``_fold_batch``: B split out of ``axis`` to the front."""
    return jnp.moveaxis(x.reshape(*x.shape[:axis], size, -1, *x.shape[axis + 1:]), axis, 0)


def _launch(loop_kernel, step_kernel, backward, cell, reverse, dtype, block, mesh, weights,
            sequences, at_previous_step, out_widths):
    """Runs the GPU form ``loop_kernel`` or the TPU form ``step_kernel`` (``_on_platform``)
    on each device's sequences (``_per_shard``): one [T, K, Np, width] float32 output per
    ``out_widths``; the TPU form keeps one scratch array per carry array.

    Under ``jax.vmap`` the mapped axis is folded into the sequences (shared weights) or
    the recurrences (per-example weights) of one launch: Pallas' own batching rule adds
    a grid axis that the TPU form's ``dimension_semantics`` does not name. Unmapped
    operands are copied once per mapped index (under ``jax.jacfwd``: the input gates and
    the carries)."""
    loop = functools.partial(loop_kernel, cell=cell, reverse=reverse, dtype=dtype)
    step = functools.partial(step_kernel, cell=cell, dtype=dtype)

    def kernels(weights, sequences):
        out_shapes = [(*sequences[0].shape[:3], width) for width in out_widths]
        return _on_platform(
            lambda **options: _loop_call(loop, weights, sequences, out_shapes, block,
                                         **options),
            lambda **options: _step_call(step, weights, sequences, at_previous_step,
                                         out_shapes, reverse, backward, cell.num_carries,
                                         **options))

    @jax.custom_batching.custom_vmap
    def launch(weights, sequences):
        return tuple(_per_shard(mesh, kernels, weights, sequences))

    @launch.def_vmap
    def fold_batch(size, in_batched, weights, sequences):
        per_example_weights = any(in_batched[0])
        axis = 1 if per_example_weights else 2
        if per_example_weights:
            weights = tuple(_fold_batch(w, b, size, 0) for w, b in zip(weights, in_batched[0]))
        sequences = tuple(_fold_batch(x, b, size, axis)
                          for x, b in zip(sequences, in_batched[1]))
        outs = _launch(loop_kernel, step_kernel, backward, cell,
                       reverse * size if per_example_weights else reverse, dtype, block,
                       mesh, weights, sequences, at_previous_step, out_widths)
        return tuple(_unfold_batch(o, size, axis) for o in outs), (True,) * len(outs)

    return launch(tuple(weights), tuple(sequences))


def _forward(cell, reverse, dtype, block, mesh, gx, w_hh, b_ih, b_hh) -> tuple[Array, ...]:
    """Every step's carry: [T, K, Np, Dp] per carry array."""
    return tuple(_launch(_forward_loop_kernel, _forward_step_kernel, False, cell, reverse,
                         dtype, block, mesh, (w_hh, b_ih, b_hh), (gx,), (False,),
                         [w_hh.shape[-1]] * cell.num_carries))


def _previous_hidden(hs: Array, reverse: Sequence[bool]) -> Array:
    """Each step's input hidden state [T, K, Np, Dp]: the previous step's output in
    processing order (zero at the first)."""
    zero = jnp.zeros_like(hs[:1])
    flip = jnp.asarray(reverse)[None, :, None, None]
    return jnp.where(flip, jnp.concatenate([hs[1:], zero]), jnp.concatenate([zero, hs[:-1]]))


def _tangent(cell, reverse, dtype, block, mesh, residuals, tangents) -> Array:
    """The hidden states' tangent from those of (gx, w_hh, b_ih, b_hh): the tangent
    kernel, after one large XLA matmul for the weights' part h_prev @ dW_hh."""
    gx, w_hh, b_ih, b_hh, carries = residuals
    d_gx, d_w_hh, d_b_ih, d_b_hh = tangents
    k, g, _, dp = w_hh.shape
    on_gate_axis = lambda b: b.reshape(k, 1, g * dp)  # noqa: E731  [K, G, 1, Dp]
    d_gh = jnp.einsum('tknd,kqde->tknqe', _previous_hidden(carries[0], reverse).astype(dtype),
                      d_w_hh.astype(dtype), preferred_element_type=jnp.float32)
    (d_hs,) = _launch(_tangent_loop_kernel, _tangent_step_kernel, False, cell, reverse, dtype,
                      block, mesh, (w_hh, b_ih, b_hh),
                      (gx, *carries, d_gx + on_gate_axis(d_b_ih),
                       d_gh.reshape(d_gx.shape) + on_gate_axis(d_b_hh)),
                      (False,) + (True,) * len(carries) + (False, False), [dp])
    return d_hs


def _backward(cell, reverse, dtype, block, mesh, residuals, d_hs):
    """The transpose of ``_tangent``: the cotangents of (gx, w_hh, b_ih, b_hh)."""
    gx, w_hh, b_ih, b_hh, carries = residuals
    # The GRU's two gate sides differ (r scales gh's n gate), so gh gets its own cotangent.
    d_gates = _launch(_backward_loop_kernel, _backward_step_kernel, True, cell, reverse,
                      dtype, block, mesh, (w_hh, b_ih, b_hh), (gx, *carries, d_hs),
                      (False,) + (True,) * len(carries) + (False,),
                      [gx.shape[-1]] * (2 if cell.name == 'gru' else 1))
    d_gx, d_gh = d_gates[0], d_gates[-1]
    k, g, _, dp = w_hh.shape
    d_w_hh = jnp.einsum('tknd,tknqe->kqde', _previous_hidden(carries[0], reverse).astype(dtype),
                        d_gh.reshape(*d_gh.shape[:3], g, dp).astype(dtype),
                        preferred_element_type=jnp.float32)
    d_b_ih, d_b_hh = (d.sum((0, 2)).reshape(k, g, 1, dp) for d in (d_gx, d_gh))
    return d_gx, *(cotangent_like(d, w) for d, w in ((d_w_hh, w_hh), (d_b_ih, b_ih),
                                                     (d_b_hh, b_hh)))


class _LinearisedRecurrence(hijax.VJPHiPrimitive):
    """The recurrence's tangent map, linear in the tangents of (gx, w_hh, b_ih, b_hh):
    forward mode evaluates it with the tangent kernel (``_tangent``), reverse mode
    transposes it into the backward kernel (``_backward``). JAX's ``custom_jvp`` and
    ``custom_vjp`` exclude each other, and ``custom_derivatives.linear_call`` has no
    batching rule, which ``jacfwd`` and ``jacrev`` need."""

    def __init__(self, options: tuple, residuals, tangents):
        self.in_avals = jax.tree.map(jax.typeof, (residuals, tangents))
        self.out_aval = jax.typeof(residuals[-1][0])
        self.params = dict(options=options)
        super().__init__()

    def expand(self, residuals, tangents):
        return _tangent(*self.options, residuals, tangents)

    def transpose(self, d_hs, residuals, accumulators):
        cotangents = _backward(*self.options, residuals, hijax.instantiate_zeros(d_hs))
        for accumulator, cotangent in zip(accumulators, cotangents):
            if not isinstance(accumulator, jax.Array):  # a tangent, not a known value
                accumulator.accum(cotangent)

    def batch_dim_rule(self, axis_data, dims):
        # Unbatched inputs have dim None, which jax.tree.leaves drops.
        return 0 if jax.tree.leaves(dims) else None


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3, 4))
def _fused(cell, reverse, dtype, block, mesh, gx, w_hh, b_ih, b_hh):
    return _forward(cell, reverse, dtype, block, mesh, gx, w_hh, b_ih, b_hh)[0]


@_fused.defjvp
def _fused_jvp(cell, reverse, dtype, block, mesh, primals, tangents):
    carries = _forward(cell, reverse, dtype, block, mesh, *primals)
    residuals, tangents = (*primals, carries), tuple(tangents)
    linearised = _LinearisedRecurrence((cell, reverse, dtype, block, mesh), residuals, tangents)
    return carries[0], linearised(residuals, tangents)


def _pad_to(x: Array, axis: int, size: int) -> Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths) if size != x.shape[axis] else x


def run_recurrence_pallas(gx: Array, weights: dict[str, Array], cell: Cell,
                          reverse: Sequence[bool], *, dtype: Any = jnp.float32,
                          block: int = DEFAULT_BLOCK) -> Array:
    """``run_recurrence`` as fused Pallas kernels: same arguments, same result.

    Args:
      gx: [T, K, N, G*D] input projections ``x @ W_ih``.
      weights: ``RecurrentWeights`` output stacked over K.
      cell: the cell type.
      reverse: K booleans; True runs that recurrence from t = T-1 down to 0.
      dtype: dtype of the recurrent matmuls; carries and gates stay float32.
      block: sequences per GPU program (a power of two, at least 16); TPUs take as many
        per step as fit VMEM (``_tpu_block``).

    Returns:
      [T, K, N, D] hidden states, in input time order for every k.
    """
    if block < _MIN_SIDE or block & (block - 1):
        raise ValueError(f'block must be a power of two >= {_MIN_SIDE}, got {block}.')
    t, k, n, _ = gx.shape
    if len(reverse) != k:
        raise ValueError(f'reverse has {len(reverse)} entries for {k} recurrences.')
    # Under a multi-device mesh (``jax.set_mesh``) each device runs its share of the
    # sequences, a whole number of blocks.
    mesh = jax.sharding.get_abstract_mesh()
    share = block * _devices_over(mesh, _split_axes(mesh))
    g, d = cell.num_gates, weights['w_hh'].shape[1]
    dp, np_ = _next_power_of_two(d), -(-n // share) * share
    gx = _pad_to(_pad_to(gx.reshape(t, k, n, g, d), 4, dp), 2, np_).reshape(t, k, np_, g * dp)
    w_hh = weights['w_hh'].astype(jnp.float32).reshape(k, d, g, d).transpose(0, 2, 1, 3)
    w_hh = _pad_to(_pad_to(w_hh, 2, dp), 3, dp)                       # [K, G, Dp, Dp]
    b_ih, b_hh = (_pad_to(weights[name].astype(jnp.float32).reshape(k, g, 1, d), 3, dp)
                  for name in ('b_ih', 'b_hh'))
    hs = _fused(cell, tuple(reverse), dtype, block, mesh, gx, w_hh, b_ih, b_hh)
    return hs[:, :, :n, :d]
