"""Recurrent cells and batched, hoisted-projection recurrences.

Every recurrence in Sequencer is short (the side of the patch grid) and very wide
(every row or column of every image is one sequence). So the work is laid out as:

1. ``input_gates``: one large matmul computes ``x @ W_ih`` for all time steps and all
   recurrences, in the input's own layout ``[B, H, W, K, G*D]``. ``K`` stacks independent
   recurrences that share a length: the two directions, and (for square grids) the
   vertical and horizontal passes.
2. One scan over time whose body only does ``h @ W_hh``, the biases and the gate
   nonlinearities, for all ``K`` recurrences at once:
   ``run_recurrence_natural`` reads each step's gates in place from that layout (the
   default; a custom derivative keeps the gradients off the in-place reads),
   ``run_recurrence`` is the ``nn.scan`` over a time-major copy ``[T, K, N, G*D]`` (the
   reference path).

Weights follow PyTorch's conventions (two bias vectors, gate order i, f, g, o for the
LSTM and r, z, n for the GRU), transposed to ``[in, out]`` and stacked over ``K``, so
converted PyTorch weights give the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sequencer_jax.errors import UserError

Array = jax.Array

CELL_TYPES = ('lstm', 'gru', 'rnn')


def _varying_axes(x) -> frozenset:
    """The manual mesh axes (inside ``jax.shard_map``) that ``x`` varies over; empty
    outside shard_map."""
    return jax.typeof(x).manual_axis_type.varying


def varying_like(tree, *refs):
    """``tree`` marked as varying over every manual mesh axis that a leaf of ``refs``
    varies over. Inside ``jax.shard_map`` (its default ``check_vma=True``) a scan's carry
    must keep its type: a carry that starts as zeros is invariant, but becomes varying
    once the step adds the inputs; outside shard_map this changes nothing."""
    vma = _varying_axes
    axes = frozenset().union(*(vma(r) for r in jax.tree.leaves(refs)))

    def cast(x):
        missing = tuple(sorted(axes - vma(x)))
        return lax.pcast(x, missing, to='varying') if missing else x

    return jax.tree.map(cast, tree)


def cotangent_like(cotangent: Array, primal: Array) -> Array:
    """A hand-written VJP's (the Pallas kernels') cotangent with the type of its primal:
    summed over the manual mesh axes it varies over and the primal does not (an
    invariant weight used by every shard gets the sum of their gradients, as autodiff's
    transpose of the implicit broadcast gives it)."""
    axes = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return lax.psum(cotangent, axes) if axes else cotangent


def _sigmoid(x: Array) -> Array:
    # sigmoid(x) = (1 + tanh(x / 2)) / 2: on XLA:CPU tanh is a fast vectorised
    # polynomial while logistic lowers to exp + divide.
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


@dataclasses.dataclass(frozen=True)
class Cell:
    """A recurrent cell: how many gate blocks it has and what one step does.

    ``step`` takes the hoisted input projection and the recurrent term for one time step
    and returns ``(new_carry, h_out [K, N, D])``.
    """

    name: str
    num_gates: int
    num_carries: int  # arrays in the carry: (h, c) for the LSTM, (h,) otherwise

    def step(self, carry, gx: Array, gh: Array, b_ih: Array, b_hh: Array):
        """One time step. gx = x @ W_ih and gh = h @ W_hh (no biases): [K, N, G*D]; b_ih,
        b_hh: [K, G*D]. Adding the biases here rather than to the hoisted projection keeps
        XLA:CPU from fusing the add into (and slowing down) that matmul; here it fuses into
        the gate arithmetic for free."""
        split = lambda a, b: jnp.split(a + b[:, None], self.num_gates, axis=-1)  # noqa: E731
        return self.step_gates(carry, split(gx, b_ih), split(gh, b_hh))

    def step_gates(self, carry, gx: Sequence[Array], gh: Sequence[Array]):
        """PyTorch's formulas on the pre-activations split per gate, biases included:
        ``gx[q] = (x @ W_ih + b_ih)[q]``, ``gh[q] = (h @ W_hh + b_hh)[q]``, each [..., D].
        Only elementwise arithmetic, so fused kernels can run (and differentiate) it too."""
        if self.name == 'lstm':
            _, c = carry
            i, f, g, o = (x + h for x, h in zip(gx, gh))
            c = _sigmoid(f) * c + _sigmoid(i) * jnp.tanh(g)
            h = _sigmoid(o) * jnp.tanh(c)
            return (h, c), h
        (h,) = carry
        if self.name == 'gru':
            xr, xz, xn = gx
            hr, hz, hn = gh
            r = _sigmoid(xr + hr)
            z = _sigmoid(xz + hz)
            n = jnp.tanh(xn + r * hn)
            h = (1.0 - z) * n + z * h
            return (h,), h
        h = jnp.tanh(gx[0] + gh[0])
        return (h,), h


CELLS = {
    'lstm': Cell('lstm', 4, 2),
    'gru': Cell('gru', 3, 1),
    'rnn': Cell('rnn', 1, 1),
}


def get_cell(name: str) -> Cell:
    if name not in CELLS:
        raise UserError(f'Unknown cell type {name!r}; expected one of {sorted(CELLS)}.')
    return CELLS[name]


class RecurrentWeights(nn.Module):
    """Holds the weights of ``num_directions`` recurrences of one cell type.

    Returns a dict with ``w_ih [K, C, G*D]``, ``w_hh [K, D, G*D]``, ``b_ih [K, G*D]``,
    ``b_hh [K, G*D]``. Initialised as PyTorch does: uniform(+-1/sqrt(D)).
    """

    hidden_size: int
    cell: str = 'lstm'
    num_directions: int = 2
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_size: int) -> dict[str, Array]:
        k, d = self.num_directions, self.hidden_size
        gd = get_cell(self.cell).num_gates * d
        bound = 1.0 / math.sqrt(d)

        def init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        return {
            'w_ih': self.param('w_ih', init, (k, input_size, gd), self.param_dtype),
            'w_hh': self.param('w_hh', init, (k, d, gd), self.param_dtype),
            'b_ih': self.param('b_ih', init, (k, gd), self.param_dtype),
            'b_hh': self.param('b_hh', init, (k, gd), self.param_dtype),
        }


def concat_weights(weights: Sequence[dict[str, Array]]) -> dict[str, Array]:
    """Stacks several ``RecurrentWeights`` outputs along K, so they share one scan."""
    return {name: jnp.concatenate([w[name] for w in weights]) for name in weights[0]}


class _Step(nn.Module):
    """The scanned body: one step of ``K`` recurrences over ``N`` sequences."""

    cell: Cell
    dtype: Any

    @nn.compact
    def __call__(self, carry, gx: Array, w_hh: Array, b_ih: Array, b_hh: Array):
        carry = _cell_step(self.cell, self.dtype, carry, gx, w_hh, b_ih, b_hh)
        return carry, carry[0]


def run_recurrence(gx: Array, weights: dict[str, Array], cell: Cell, reverse: Sequence[bool],
                   *, unroll: int = 1, dtype: Any = jnp.float32) -> Array:
    """Runs K recurrences over precomputed input gates with one ``nn.scan``.

    Args:
      gx: [T, K, N, G*D] input projections ``x @ W_ih``.
      weights: ``RecurrentWeights`` output stacked over K.
      cell: the cell type.
      reverse: K booleans; True runs that recurrence from t = T-1 down to 0.
      unroll: steps unrolled per scan iteration.
      dtype: compute dtype of the recurrent matmul; the carry stays in float32.

    Returns:
      [T, K, N, D] hidden states, in input time order for every k.
    """
    t, k, n, _ = gx.shape
    if len(reverse) != k:
        raise ValueError(f'reverse has {len(reverse)} entries for {k} recurrences.')
    d = weights['w_hh'].shape[1]
    flip = jnp.asarray(reverse)[None, :, None, None]
    any_reverse = any(reverse)
    if any_reverse:
        gx = jnp.where(flip, gx[::-1], gx)
    zeros = jnp.zeros((k, n, d), jnp.float32)
    carry = varying_like((zeros,) * cell.num_carries, gx, weights)
    # Rematerialising the step recomputes its gates in the backward pass instead of
    # storing them: measured ~20% faster fwd+bwd on XLA:CPU (less memory traffic).
    scan = nn.scan(nn.remat(_Step, prevent_cse=False), variable_broadcast='params',
                   split_rngs={'params': False},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), out_axes=0,
                   length=t, unroll=unroll)
    _, hs = scan(cell=cell, dtype=dtype)(carry, gx, *_recurrent_params(weights))
    if any_reverse:
        hs = jnp.where(flip, hs[::-1], hs)
    return hs


def input_gates(x: Array, weights: Sequence[dict[str, Array]],
                dtype: Any = jnp.float32) -> Array:
    """The hoisted input projection ``x @ W_ih`` of several weight sets at once.

    One matmul in the input's own layout (measured faster on XLA:CPU than einsums that
    write a time-major layout directly, whose transposes XLA fuses poorly):
    ``x [..., C] -> [..., K_total, G*D]``, the K of every weight set in order. The
    biases are added in the cell step (see ``Cell.step``).
    """
    w_ih = jnp.concatenate([w['w_ih'] for w in weights])          # [K, C, G]
    k, c, g = w_ih.shape
    kernel = jnp.transpose(w_ih, (1, 0, 2)).reshape(c, k * g).astype(dtype)
    # A 2-D matmul: its gradients stay plain matmuls as well.
    gx = jnp.dot(x.reshape(-1, c).astype(dtype), kernel, preferred_element_type=jnp.float32)
    return gx.reshape(*x.shape[:-1], k, g)


def _recurrent_params(weights: dict[str, Array]) -> tuple[Array, Array, Array]:
    """(w_hh, b_ih, b_hh) in float32: what the recurrence needs besides the inputs."""
    return tuple(weights[n].astype(jnp.float32) for n in ('w_hh', 'b_ih', 'b_hh'))


def _cell_step(cell: Cell, dtype: Any, carry, gx: Array, w_hh: Array, b_ih: Array,
               b_hh: Array):
    """The new carry after one step; the recurrent matmul in ``dtype``, gates in float32."""
    gh = jnp.einsum('knd,kdg->kng', carry[0].astype(dtype), w_hh.astype(dtype),
                    preferred_element_type=jnp.float32)
    return cell.step(carry, gx.astype(jnp.float32), gh, b_ih, b_hh)[0]


def _read_step(g: Array, t: Array, time_axes: Sequence[int], reverse: Sequence[bool]) -> Array:
    """Step t's input gates of every recurrence, [K, N, G], read in place from the natural
    layout ``g [B, *spatial, K, G]`` (recurrence k runs along ``time_axes[k]``)."""
    parts = []
    for k, (axis, rev) in enumerate(zip(time_axes, reverse)):
        # One slice at (t, k), never g[..., k, :] first: that part does not depend on t,
        # and autodiff's partial evaluation would copy it out of the loop (a full-size
        # copy per recurrence).
        start, sizes = [0] * g.ndim, list(g.shape)
        start[axis], start[-2] = g.shape[axis] - 1 - t if rev else t, k
        sizes[axis], sizes[-2] = 1, 1
        parts.append(lax.dynamic_slice(g, start, sizes).reshape(-1, g.shape[-1]))
    return jnp.stack(parts)


def _zero_carry(cell: Cell, g: Array, time_axes: Sequence[int], hidden: int, *refs):
    """The initial carry of every recurrence of gates ``g``: zeros [K, N, D], varying
    (inside ``shard_map``) as ``refs`` do."""
    n = math.prod(g.shape[:-2]) // g.shape[time_axes[0]]
    zeros = jnp.zeros((g.shape[-2], n, hidden), jnp.float32)
    return varying_like((zeros,) * cell.num_carries, *refs)


def _natural_forward(cell, dtype, time_axes, reverse, g, w_hh, b_ih, b_hh):
    """The primal recurrence: every step's hidden state, stacked [T, K, N, D]."""
    def step(carry, t):
        carry = _cell_step(cell, dtype, carry, _read_step(g, t, time_axes, reverse), w_hh,
                           b_ih, b_hh)
        return carry, carry[0]

    carry = _zero_carry(cell, g, time_axes, w_hh.shape[1], g, w_hh, b_ih, b_hh)
    return lax.scan(step, carry, jnp.arange(g.shape[time_axes[0]]))[1]


def _time_major(g: Array, time_axes: Sequence[int], reverse: Sequence[bool]) -> Array:
    """g [B, *spatial, K, G] -> [T, K, N, G] in processing order: what ``_read_step``
    reads at each t, as one linear reshuffle (split, transposes, flips, stack). Its
    transpose is the inverse reshuffle, where the transpose of T in-place reads would
    add a full-size buffer at every step."""
    parts = []
    for part, axis, rev in zip(lax.split(g, [1] * g.shape[-2], axis=g.ndim - 2), time_axes,
                               reverse):
        part = jnp.moveaxis(part[..., 0, :], axis, 0)
        parts.append((part[::-1] if rev else part).reshape(part.shape[0], -1, g.shape[-1]))
    return jnp.stack(parts, axis=1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _natural_recurrence(cell, dtype, time_axes, reverse, g, w_hh, b_ih, b_hh):
    return _natural_forward(cell, dtype, time_axes, reverse, g, w_hh, b_ih, b_hh)


@_natural_recurrence.defjvp
def _natural_recurrence_jvp(cell, dtype, time_axes, reverse, primals, tangents):
    """One scan carrying the primal and the tangent carries. Reverse mode linearises it
    and transposes the tangent half: the known half is the primal recurrence (gates read
    in place, every step's carry kept for the other half), the transposed half a reverse
    scan that recomputes each step from its carry (the step is rematerialised) and emits
    the step's gate gradients as scan outputs, laid back out by the transpose of
    ``_time_major``."""
    g, *params = primals
    dg, *d_params = tangents
    hidden = params[0].shape[1]
    carry = _zero_carry(cell, g, time_axes, hidden, g, *params)
    d_carry = _zero_carry(cell, g, time_axes, hidden, dg, *d_params)

    # prevent_cse=False: inside a scan there is nothing for XLA to merge it with.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def step_jvp(carry, d_carry, t, d_gx, *d_params):
        return jax.jvp(functools.partial(_cell_step, cell, dtype),
                       (carry, _read_step(g, t, time_axes, reverse), *params),
                       (d_carry, d_gx, *d_params))

    def step(state, xs):
        carry, d_carry = step_jvp(*state, *xs, *d_params)
        return (carry, d_carry), (carry[0], d_carry[0])

    steps = jnp.arange(g.shape[time_axes[0]])
    _, (hs, d_hs) = lax.scan(step, (carry, d_carry),
                             (steps, _time_major(dg, time_axes, reverse)))
    return hs, d_hs


def run_recurrence_natural(g: Array, weights: dict[str, Array], cell: Cell,
                           time_axes: Sequence[int], reverse: Sequence[bool], *,
                           dtype: Any = jnp.float32) -> Array:
    """Like ``run_recurrence``, but reads the gates in place from their natural layout.

    Args:
      g: [B, *spatial, K, G*D] input projections as ``input_gates`` returns them.
      weights: ``RecurrentWeights`` output stacked over K.
      time_axes: for each k, the axis of ``g`` its sequences run along (1 = H, 2 = W);
        all must have the same length T and the same number N of sequences.
      reverse: for each k, whether it runs from the end.

    Returns:
      [T, K, N, D] hidden states in input time order, N ordered as the remaining axes
      of ``g`` (e.g. (B, W) for time along H).

    No transposes to time-major are materialised, which roughly halves the forward time
    of BiRNN2D on XLA:CPU. Its derivative is a custom JVP (``_natural_recurrence_jvp``)
    that forward mode uses as it is and reverse mode transposes: autodiff of the
    in-place reads would add a full-size gradient buffer at every step. Numerically
    identical to autodiff in both modes (tested).
    """
    lengths = {g.shape[a] for a in time_axes}
    if len(lengths) != 1 or len(time_axes) != len(reverse) or len(reverse) != g.shape[-2]:
        raise ValueError(f'time_axes {time_axes} / reverse {reverse} do not fit gates '
                         f'{g.shape}: one entry per recurrence, all of equal length.')
    hs = _natural_recurrence(cell, dtype, tuple(time_axes), tuple(reverse), g,
                             *_recurrent_params(weights))
    flip = jnp.asarray(reverse)[None, :, None, None]
    return jnp.where(flip, hs[::-1], hs) if any(reverse) else hs
