"""A fused recurrence kernel in Pallas: the whole time loop of a block of sequences in one
GPU or TPU program, forward and backward.

XLA runs a ``lax.scan`` as a loop of separate kernels per step (the recurrent matmul, the
gate arithmetic, the slice updates), each launched and reading its operands from memory.
Here one program of a grid ``(K, N / block)`` keeps the carry of ``block`` sequences of
recurrence ``k`` on chip for all T steps and reads only that step's input gates. The
backward kernel runs the steps in reverse, recomputes each step's gates from the saved
carries and differentiates ``Cell.step_gates`` (the same formulas as the XLA paths) with
``jax.vjp``; the weight gradient ``sum_t h_{t-1}^T dgates_t`` is left to one large XLA
matmul after the kernel, where it runs at GEMM speed.

On GPUs the kernels lower through Triton, which needs power-of-two block sides: the
hidden size is zero-padded to a power of two (padded units stay exactly zero: zero weights
and inputs give ``i = f = o = 1/2``, ``g = 0``, so ``c = h = 0``) and the number of
sequences to a multiple of the block. On TPUs they lower through Mosaic, where a program's
blocks (all T steps of its sequences) sit in VMEM: the block shrinks with T to fit (see
``_tpu_block``). The gates lie side by side on the last axis ([..., G * Dp]), so that the
TPU's (8, 128) tiles are not padded along a short gate axis. On CPU the kernels run in
Pallas' interpreter, which is how the tests check them against the ``nn.scan`` path; that
is for testing, not speed. The platform is chosen when lowering, so that exporting or
compiling for a GPU or TPU from a CPU host gets its kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pl_tpu
from jax.experimental.pallas import triton as pl_triton

from sequencer_jax.models.recurrent import Cell

Array = jax.Array

# Sequences per program: stage 0 of sequencer2d_s at batch 64 (4 recurrences of 2,048
# sequences) makes 256 programs, enough to fill a GPU's ~100-150 multiprocessors.
DEFAULT_BLOCK = 32
# Triton's dot needs every side of its operands to be at least 16.
_MIN_SIDE = 16
# One stage: software pipelining cannot overlap the steps of a recurrence, and Triton's
# default 3 stages asked for 387 KB of shared memory in the LSTM backward (sm_90 has 227).
_TRITON = dict(num_warps=4, num_stages=1)
# TPU: a program's blocks, double-buffered, must fit the default scoped VMEM (16 MiB on
# v4 and v5e, more on later chips) next to the kernel's temporaries.
_TPU_VMEM_BUDGET = 12 * 2**20
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


def _recurrent_gates(h: Array, w_ref, b_hh_ref, dtype: Any) -> list[Array]:
    """``h @ W_hh + b_hh`` per gate: [bn, Dp] each."""
    return [jnp.dot(h.astype(dtype), w_ref[q].astype(dtype),
                    preferred_element_type=jnp.float32) + b_hh_ref[q]
            for q in range(w_ref.shape[0])]


def _gate_slice(q: int, dp: int) -> slice:
    """Gate q's units on the last axis of a [..., G * Dp] array."""
    return slice(q * dp, (q + 1) * dp)


def _input_gates(gx_ref, b_ih_ref, t: Array) -> list[Array]:
    num_gates, _, dp = b_ih_ref.shape
    return [gx_ref[t, :, _gate_slice(q, dp)] + b_ih_ref[q] for q in range(num_gates)]


def _forward_kernel(w_ref, b_ih_ref, b_hh_ref, gx_ref, *carry_refs, cell, reverse, dtype):
    """One (recurrence, block of sequences) program. gx_ref [T, bn, G*Dp]; w_ref
    [G, Dp, Dp]; b refs [G, 1, Dp]; writes every step's carry to carry_refs [T, bn, Dp]."""
    length, bn, dp = carry_refs[0].shape
    k = pl.program_id(0)

    def step(s, carry):
        t = _time_index(k, s, length, reverse)
        carry, _ = cell.step_gates(carry, _input_gates(gx_ref, b_ih_ref, t),
                                   _recurrent_gates(carry[0], w_ref, b_hh_ref, dtype))
        for ref, value in zip(carry_refs, carry):
            ref[t] = value
        return carry

    zeros = jnp.zeros((bn, dp), jnp.float32)
    jax.lax.fori_loop(0, length, step, (zeros,) * len(carry_refs))


def _backward_kernel(w_ref, b_ih_ref, b_hh_ref, gx_ref, *refs, cell, reverse, dtype):
    """Reverse steps of one program. Inputs as the forward's plus its carries and the
    hidden states' cotangent [T, bn, Dp]; writes the gates' cotangents [T, bn, G*Dp] (of
    gx and, for the GRU whose two sides differ, of gh)."""
    n_carry = 2 if cell.has_cell_state else 1
    carry_refs, d_hs_ref, d_gate_refs = refs[:n_carry], refs[n_carry], refs[n_carry + 1:]
    length, bn, dp = d_hs_ref.shape
    k = pl.program_id(0)

    def step(i, d_carry):
        s = length - 1 - i
        t = _time_index(k, s, length, reverse)
        t_prev = _time_index(k, jnp.maximum(s - 1, 0), length, reverse)
        prev = tuple(jnp.where(s > 0, ref[t_prev], 0.0) for ref in carry_refs)
        gx = _input_gates(gx_ref, b_ih_ref, t)
        gh = _recurrent_gates(prev[0], w_ref, b_hh_ref, dtype)
        _, vjp = jax.vjp(lambda c, x, h: cell.step_gates(c, x, h)[0], prev, gx, gh)
        d_prev, d_gx, d_gh = vjp((d_carry[0] + d_hs_ref[t],) + tuple(d_carry[1:]))
        for q, dq in enumerate(d_gx):
            d_gate_refs[0][t, :, _gate_slice(q, dp)] = dq
        for q, dq in enumerate(d_gh if len(d_gate_refs) > 1 else ()):
            d_gate_refs[1][t, :, _gate_slice(q, dp)] = dq
        d_h = d_prev[0]
        for q, dq in enumerate(d_gh):
            d_h = d_h + jax.lax.dot_general(dq.astype(dtype), w_ref[q].astype(dtype),
                                            (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)
        return (d_h,) + tuple(d_prev[1:])

    zeros = jnp.zeros((bn, dp), jnp.float32)
    jax.lax.fori_loop(0, length, step, (zeros,) * n_carry)


def _tpu_block(block: int, shapes: Sequence[tuple[int, ...]]) -> int:
    """The largest power-of-two divisor of ``block`` (at least 8) whose blocks of the
    [T, K, Np, ...] ``shapes``, double-buffered, fit ``_TPU_VMEM_BUDGET``. On a TPU
    backend, a clear error where even 8 sequences do not fit (Mosaic would fail later,
    deep in compilation)."""
    bytes_per_sequence = sum(s[0] * math.prod(s[3:]) * 4 for s in shapes)
    while block > _TPU_MIN_BLOCK and 2 * block * bytes_per_sequence > _TPU_VMEM_BUDGET:
        block //= 2
    needed = 2 * block * bytes_per_sequence
    if needed > _TPU_VMEM_BUDGET and jax.default_backend() == 'tpu':
        raise ValueError(
            f"recurrence='pallas' keeps all {shapes[0][0]} steps of a program's sequences "
            f'in TPU VMEM: {block} sequences need {needed / 2**20:.1f} MiB, over the '
            f'{_TPU_VMEM_BUDGET // 2**20} MiB it may use. Use recurrence=\'natural\' for '
            f'sequences this long (smaller images or larger patches shorten them).')
    return block


def _call(kernel, weights: Sequence[Array], sequences: Sequence[Array],
          out_shapes: Sequence[tuple[int, ...]], block: int):
    """Runs ``kernel(*weights, *sequences, *outputs)`` on the grid (K, Np / block).
    weights [K, G, ...] are blocked over K; sequences and outputs [T, K, Np, ...] over K
    and Np."""
    length, k, n = out_shapes[0][:3]

    def weight_spec(shape):
        return pl.BlockSpec((None, *shape[1:]), lambda i, j: (i,) + (0,) * (len(shape) - 1))

    def call(block: int, **options):
        def sequence_spec(shape):
            rest = shape[3:]
            return pl.BlockSpec((length, None, block, *rest),
                                lambda i, j: (0, i, j) + (0,) * len(rest))

        return pl.pallas_call(
            kernel, grid=(k, n // block),
            in_specs=[weight_spec(w.shape) for w in weights]
            + [sequence_spec(x.shape) for x in sequences],
            out_specs=[sequence_spec(s) for s in out_shapes],
            out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
            **options,
        )(*weights, *sequences)

    tpu_block = _tpu_block(block, [x.shape for x in sequences] + list(out_shapes))
    triton = lambda: call(block, compiler_params=pl_triton.CompilerParams(**_TRITON))  # noqa: E731
    return jax.lax.platform_dependent(
        cpu=lambda: call(block, interpret=True), cuda=triton, rocm=triton,
        tpu=lambda: call(tpu_block, compiler_params=pl_tpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel'))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(cell, reverse, dtype, block, gx, w_hh, b_ih, b_hh):
    return _fused_fwd(cell, reverse, dtype, block, gx, w_hh, b_ih, b_hh)[0]


def _fused_fwd(cell, reverse, dtype, block, gx, w_hh, b_ih, b_hh):
    length, k, n, _ = gx.shape
    dp = w_hh.shape[-1]
    kernel = functools.partial(_forward_kernel, cell=cell, reverse=reverse, dtype=dtype)
    n_carry = 2 if cell.has_cell_state else 1
    carries = _call(kernel, (w_hh, b_ih, b_hh), (gx,), [(length, k, n, dp)] * n_carry, block)
    return carries[0], (gx, w_hh, b_ih, b_hh, tuple(carries))


def _fused_bwd(cell, reverse, dtype, block, residuals, d_hs):
    gx, w_hh, b_ih, b_hh, carries = residuals
    kernel = functools.partial(_backward_kernel, cell=cell, reverse=reverse, dtype=dtype)
    separate_gh = cell.name == 'gru'
    d_gates = _call(kernel, (w_hh, b_ih, b_hh), (gx, *carries, d_hs),
                    [gx.shape] * (2 if separate_gh else 1), block)
    d_gx, d_gh = d_gates[0], d_gates[-1]
    # Each step's input hidden state: the previous step's output in processing order.
    hs = carries[0]
    zero = jnp.zeros_like(hs[:1])
    forward_prev = jnp.concatenate([zero, hs[:-1]])
    reverse_prev = jnp.concatenate([hs[1:], zero])
    flip = jnp.asarray(reverse)[None, :, None, None]
    h_prev = jnp.where(flip, reverse_prev, forward_prev)
    k, g, _, dp = w_hh.shape
    d_w_hh = jnp.einsum('tknd,tknqe->kqde', h_prev.astype(dtype),
                        d_gh.reshape(*d_gh.shape[:3], g, dp).astype(dtype),
                        preferred_element_type=jnp.float32)
    d_b_ih, d_b_hh = (d.sum((0, 2)).reshape(k, g, 1, dp) for d in (d_gx, d_gh))
    return d_gx, d_w_hh, d_b_ih, d_b_hh


_fused.defvjp(_fused_fwd, _fused_bwd)


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
      block: sequences per program (a power of two, at least 16); on TPUs, fewer where
        T is long (``_tpu_block``).

    Returns:
      [T, K, N, D] hidden states, in input time order for every k.
    """
    if block < _MIN_SIDE or block & (block - 1):
        raise ValueError(f'block must be a power of two >= {_MIN_SIDE}, got {block}.')
    t, k, n, _ = gx.shape
    if len(reverse) != k:
        raise ValueError(f'reverse has {len(reverse)} entries for {k} recurrences.')
    g, d = cell.num_gates, weights['w_hh'].shape[1]
    dp, np_ = _next_power_of_two(d), -(-n // block) * block
    gx = _pad_to(_pad_to(gx.reshape(t, k, n, g, d), 4, dp), 2, np_).reshape(t, k, np_, g * dp)
    w_hh = weights['w_hh'].astype(jnp.float32).reshape(k, d, g, d).transpose(0, 2, 1, 3)
    w_hh = _pad_to(_pad_to(w_hh, 2, dp), 3, dp)                       # [K, G, Dp, Dp]
    b_ih, b_hh = (_pad_to(weights[name].astype(jnp.float32).reshape(k, g, 1, d), 3, dp)
                  for name in ('b_ih', 'b_hh'))
    hs = _fused(cell, tuple(reverse), dtype, block, gx, w_hh, b_ih, b_hh)
    return hs[:, :, :n, :d]
