"""Sequencer2D and Sequencer1D (Tatsunami & Taki, NeurIPS 2022) in Flax linen.

Shapes are channels-last throughout: images ``[B, H, W, 3]``, patch grids ``[B, h, w, C]``.
The module tree mirrors timm's ``Sequencer2d`` (``stem``, ``stages_i/downsample``,
``stages_i/blocks_j/{norm1, rnn_tokens, norm2, mlp_channels}``, ``norm``, ``head``) so
that PyTorch weights map one to one (see ``sequencer_jax.convert``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequencer_jax.errors import UserError
from sequencer_jax.models import pallas_recurrence, recurrent

Array = jax.Array

# union -> the axes whose recurrences it uses ('v': along H, 'h': along W)
AXES_OF_UNION = {'cat': ('v', 'h'), 'add': ('v', 'h'), 'vertical': ('v',),
                 'horizontal': ('h',)}
UNIONS = tuple(AXES_OF_UNION)
TIME_AXIS = {'v': 1, 'h': 2}  # axis of [B, H, W, ...] each pass runs along
RECURRENCES = ('natural', 'scan', 'pallas')
TOKEN_MIXERS = ('2d', '1d')
DROP_PATH_SCHEDULES = ('linear', 'constant')
LAYER_NORM_EPS = 1e-6

_xavier_uniform = nn.initializers.xavier_uniform()


def _check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f'Unknown {what} {value!r}; expected one of {list(choices)}.')


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, written as PyTorch's formula: on XLA:CPU about 3x faster than
    ``jax.nn.gelu(approximate=False)`` and equal to it to float32 rounding."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))


def _normalise(x: Array, eps: float) -> tuple[Array, Array, Array]:
    """x [..., C] -> (x_hat [..., C], mean [..., 1], 1/std [..., 1]) in float32,
    two-pass variance as PyTorch computes it."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * rstd, mean, rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis: x [..., C], scale and bias [C] -> float32 [..., C].

    Its derivative is written out as a linear map of the tangents (``_layer_norm_jvp``)
    rather than left to autodiff of the statistics, whose backward pass XLA:CPU compiles
    into slow column reductions and full-size broadcasts of ``scale`` (about twice as
    long at stage-0 shapes). Reverse mode transposes that map into PyTorch's backward
    formula; forward mode (``jax.jvp``, ``jax.jacfwd``) uses it as it is.
    """
    x_hat, _, _ = _normalise(x, eps)
    return x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)


@layer_norm.defjvp
def _layer_norm_jvp(eps, primals, tangents):
    x, scale, bias = primals
    dx, d_scale, d_bias = (t.astype(jnp.float32) for t in tangents)
    x_hat, _, rstd = _normalise(x, eps)
    scale = scale.astype(jnp.float32)
    y = x_hat * scale + bias.astype(jnp.float32)
    # d x_hat = rstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)): a symmetric map, so
    # its transpose (the backward pass) has the same form.
    d_x_hat = rstd * (dx - jnp.mean(dx, axis=-1, keepdims=True)
                      - x_hat * jnp.mean(x_hat * dx, axis=-1, keepdims=True))
    return y, d_x_hat * scale + x_hat * d_scale + d_bias


class LayerNorm(nn.Module):
    """LayerNorm over channels, x [..., C] -> [..., C] in ``dtype``; statistics in float32.

    Parameters ``scale`` and ``bias`` [C], named and initialised as ``flax.linen.LayerNorm``
    (so checkpoints and converted weights are the same); see ``layer_norm`` for why it
    has its own backward pass.
    """

    epsilon: float = LAYER_NORM_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def drop_path(x: Array, rate, *, deterministic: bool, rng: Array | None) -> Array:
    """Stochastic depth: drops whole residual branches per example. x: [B, ...].

    ``rate`` may be a traced scalar (blocks under ``nn.scan`` each get their own).
    """
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # A traced rate is a float32 array: without the cast it would promote bfloat16 inputs
    # (and break the carry of nn.scan over blocks).
    return jnp.where(mask, (x / keep).astype(x.dtype), jnp.zeros_like(x))


def _tokens_2d(layer: nn.Module, x: Array) -> Array:
    """Applies ``layer`` to x [..., C] as one [tokens, C] matrix. XLA:CPU runs the
    gradient of a dense layer much faster in 2-D than with several batch axes."""
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _time_major(z: Array, axis: str) -> Array:
    """[B, H, W, K, G] -> vertical [H, K, B*W, G] (sequences run along H) or horizontal
    [W, K, B*H, G]. Explicit transposes: XLA:CPU fuses them better than einsum outputs."""
    b, h, w, k, g = z.shape
    if axis == 'v':
        return jnp.transpose(z, (1, 3, 0, 2, 4)).reshape(h, k, b * w, g)
    return jnp.transpose(z, (2, 3, 0, 1, 4)).reshape(w, k, b * h, g)


def _natural(z: Array, axis: str, b: int, h: int, w: int) -> Array:
    """The inverse layout for hidden states: [T, K, B*other, D] -> [B, H, W, K, D]."""
    k, d = z.shape[1], z.shape[-1]
    if axis == 'v':
        return jnp.transpose(z.reshape(h, k, b, w, d), (2, 0, 3, 1, 4))
    return jnp.transpose(z.reshape(w, k, b, h, d), (2, 3, 0, 1, 4))


def _run_time_major(recurrence: str, gx: Array, weights: dict[str, Array],
                    cell: recurrent.Cell, reverse: Sequence[bool], unroll: int,
                    dtype: Any) -> Array:
    """The time-major recurrences: gx [T, K, N, G] -> hidden states [T, K, N, D]."""
    if recurrence == 'pallas':
        return pallas_recurrence.run_recurrence_pallas(gx, weights, cell, reverse, dtype=dtype)
    return recurrent.run_recurrence(gx, weights, cell, reverse, unroll=unroll, dtype=dtype)


class BiRNN2D(nn.Module):
    """Sequencer's BiLSTM2D token mixer, generalised to every ablation of the paper.

    ``x [B, H, W, C] -> [B, H, W, C]`` (or ``[B, H, W, union width]`` without fc).
    The vertical pass runs along H for every column, the horizontal pass along W for
    every row; on square grids both passes and both directions share one scan.

    Attributes:
      hidden_size: D, the hidden size of each recurrence.
      cell: 'lstm', 'gru' or 'rnn'.
      bidirectional: run each axis in both directions (outputs concatenated).
      union: 'cat' or 'add' the two axes, or use only 'vertical' / 'horizontal'.
      with_fc: fuse with a Linear back to C channels; without it the union's width
        must already equal C.
      fuse_axes: share one scan between the two axes when H == W.
      recurrence: 'natural' reads the gates in place (``run_recurrence_natural``,
        faster), 'scan' lays them out time-major for ``nn.scan`` (the reference path),
        'pallas' runs that time-major layout through fused GPU or TPU kernels
        (``run_recurrence_pallas``; interpreted, slowly, on CPU; on several devices,
        under ``jax.set_mesh``).
      unroll: scan steps unrolled per iteration ('scan' only).
    """

    hidden_size: int
    cell: str = 'lstm'
    bidirectional: bool = True
    union: str = 'cat'
    with_fc: bool = True
    fuse_axes: bool = True
    recurrence: str = 'natural'
    unroll: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _check_choice('union', self.union, UNIONS)
        _check_choice('recurrence', self.recurrence, RECURRENCES)
        recurrent.get_cell(self.cell)
        super().__post_init__()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def union_width(self) -> int:
        axis_width = self.num_directions * self.hidden_size
        return 2 * axis_width if self.union == 'cat' else axis_width

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        if not self.with_fc and self.union_width() != c:
            raise UserError(
                f'BiRNN2D without fc must output its input width: union {self.union!r} of '
                f'{self.num_directions} direction(s) x hidden {self.hidden_size} gives '
                f'{self.union_width()} channels, but the input has {c}. Set with_fc=True '
                'or choose hidden_size accordingly.')
        cell = recurrent.get_cell(self.cell)
        kd = self.num_directions
        reverse = (False, True)[:kd]
        axes = AXES_OF_UNION[self.union]
        weights = [recurrent.RecurrentWeights(self.hidden_size, self.cell, kd,
                                              self.param_dtype, name=f'rnn_{a}')(c)
                   for a in axes]
        gates = recurrent.input_gates(x, weights, self.dtype)   # [B, H, W, K, G]
        # One recurrence for both axes when they have the same length (square grids).
        groups = [axes] if len(axes) == 2 and h == w and self.fuse_axes else [(a,) for a in axes]
        outputs = {}
        for group in groups:
            first = axes.index(group[0])
            g = gates[..., first * kd:(first + len(group)) * kd, :]  # group's K, in order
            wt = recurrent.concat_weights([weights[axes.index(a)] for a in group])
            rev = reverse * len(group)
            if self.recurrence == 'natural':
                time_axes = sum(((TIME_AXIS[a],) * kd for a in group), ())
                hs = recurrent.run_recurrence_natural(g, wt, cell, time_axes, rev,
                                                      dtype=self.dtype)
            else:
                gx = jnp.concatenate([_time_major(g[..., j * kd:(j + 1) * kd, :], a)
                                      for j, a in enumerate(group)], axis=1)
                hs = _run_time_major(self.recurrence, gx, wt, cell, rev, self.unroll,
                                     self.dtype)
            for j, a in enumerate(group):
                outputs[a] = _natural(hs[:, j * kd:(j + 1) * kd], a, b, h, w)
        parts = [outputs[a].reshape(b, h, w, -1) for a in axes]
        y = jnp.concatenate(parts, axis=-1) if self.union == 'cat' else sum(parts)
        y = y.astype(self.dtype)
        if not self.with_fc:
            return y
        fc = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=_xavier_uniform, name='fc')
        return _tokens_2d(fc, y)


class BiRNN1D(nn.Module):
    """The vanilla Sequencer's token mixer: one BiRNN over the flattened patch sequence.

    ``x [B, H, W, C] -> [B, H, W, K*D]`` (rows first, as ``x.view(B, -1, C)`` in torch).
    """

    hidden_size: int
    cell: str = 'lstm'
    bidirectional: bool = True
    recurrence: str = 'natural'
    unroll: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _check_choice('recurrence', self.recurrence, RECURRENCES)
        recurrent.get_cell(self.cell)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        cell = recurrent.get_cell(self.cell)
        kd = 2 if self.bidirectional else 1
        if kd * self.hidden_size != c:
            raise UserError(
                f'BiRNN1D outputs {kd} direction(s) x hidden {self.hidden_size} = '
                f'{kd * self.hidden_size} channels, but its input has {c}; the residual '
                f'needs them equal. Use hidden_size={c // kd}.')
        weights = recurrent.RecurrentWeights(
            self.hidden_size, self.cell, kd, self.param_dtype, name='rnn')(c)
        gates = recurrent.input_gates(x, [weights], self.dtype).reshape(b, h * w, kd, -1)
        reverse = (False, True)[:kd]
        if self.recurrence == 'natural':
            hs = recurrent.run_recurrence_natural(gates, weights, cell, (1,) * kd, reverse,
                                                  dtype=self.dtype)
        else:
            gx = jnp.transpose(gates, (1, 2, 0, 3))  # [L, K, B, G]
            hs = _run_time_major(self.recurrence, gx, weights, cell, reverse, self.unroll,
                                 self.dtype)
        return jnp.transpose(hs, (2, 0, 1, 3)).reshape(b, h, w, -1).astype(self.dtype)


class MLP(nn.Module):
    """Channel MLP: Linear -> GELU (erf) -> Dropout -> Linear -> Dropout. [..., C]."""

    hidden_features: int
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # see _tokens_2d: 2-D matmuls train faster on CPU
        # timm initialises MLP biases with N(0, 1e-6), not zeros.
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_xavier_uniform,
            bias_init=nn.initializers.normal(1e-6), name=name)
        x = dense(self.hidden_features, 'fc1')(x)
        x = gelu(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x = dense(shape[-1], 'fc2')(x)
        return nn.Dropout(self.drop_rate)(x, deterministic=not train).reshape(shape)


class SequencerBlock(nn.Module):
    """x + DropPath(mixer(LN(x))); x + DropPath(MLP(LN(x))). [B, H, W, C] -> same."""

    hidden_size: int
    mlp_ratio: float = 3.0
    token_mixer: str = '2d'
    cell: str = 'lstm'
    bidirectional: bool = True
    union: str = 'cat'
    with_fc: bool = True
    fuse_axes: bool = True
    recurrence: str = 'natural'
    unroll: int = 1
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, drop_path_rate=0.0) -> Array:
        norm = lambda name: LayerNorm(  # noqa: E731
            LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.token_mixer == '2d':
            mixer = BiRNN2D(self.hidden_size, self.cell, self.bidirectional, self.union,
                            self.with_fc, self.fuse_axes, self.recurrence, self.unroll,
                            self.dtype, self.param_dtype, name='rnn_tokens')
        else:
            mixer = BiRNN1D(self.hidden_size, self.cell, self.bidirectional, self.recurrence,
                            self.unroll, self.dtype, self.param_dtype, name='rnn_tokens')
        mlp = MLP(int(self.mlp_ratio * x.shape[-1]), self.drop_rate, self.dtype,
                  self.param_dtype, name='mlp_channels')
        # As flax's Dropout: no rng is asked for where nothing can be dropped.
        dropping = train and not (isinstance(drop_path_rate, (int, float))
                                  and drop_path_rate == 0.0)
        rng = lambda: self.make_rng('dropout') if dropping else None  # noqa: E731
        x = x + drop_path(mixer(norm('norm1')(x)), drop_path_rate, deterministic=not train,
                          rng=rng())
        return x + drop_path(mlp(norm('norm2')(x), train), drop_path_rate,
                             deterministic=not train, rng=rng())


class _ScannedBlock(nn.Module):
    """Adapts SequencerBlock to ``nn.scan``'s (carry, xs) -> (carry, ys) form."""

    block: dict
    train: bool
    drop_path: bool  # False: every rate is 0, passed on as such (no rng needed)

    @nn.compact
    def __call__(self, x: Array, drop_path_rate: Array):
        rate = drop_path_rate if self.drop_path else 0.0
        return SequencerBlock(**self.block, name='block')(x, self.train, rate), None


class Sequencer(nn.Module):
    """A Sequencer network: patch stem, four stages of Sequencer blocks, norm, pool, head.

    ``__call__``: images ``[B, H, W, in_chans]`` (normalised) -> logits
    ``[B, num_classes]``, or pooled features ``[B, C]`` when ``num_classes == 0``.
    ``features``: the same images -> the four stage outputs ``[B, h_i, w_i, C_i]``.
    Any H and W of at least the total stride ``prod(patch_sizes)`` work, as in timm
    (see ``check_input_shape``).
    """

    layers: Sequence[int] = (4, 3, 8, 3)
    patch_sizes: Sequence[int] = (7, 2, 1, 1)
    embed_dims: Sequence[int] = (192, 384, 384, 384)
    hidden_sizes: Sequence[int] = (48, 96, 96, 96)
    mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0)
    num_classes: int = 1000
    in_chans: int = 3
    token_mixer: str = '2d'
    cell: str = 'lstm'
    bidirectional: bool = True
    union: str = 'cat'
    with_fc: bool = True
    pos_embed_grid: Sequence[int] | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: str = 'linear'
    fuse_axes: bool = True
    recurrence: str = 'natural'
    unroll: int = 1
    remat: bool = False
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        lengths = {len(v) for v in (self.layers, self.patch_sizes, self.embed_dims,
                                    self.hidden_sizes, self.mlp_ratios)}
        if len(lengths) != 1:
            raise UserError('layers, patch_sizes, embed_dims, hidden_sizes and mlp_ratios '
                             'must have one entry per stage.')
        _check_choice('token mixer', self.token_mixer, TOKEN_MIXERS)
        _check_choice('union', self.union, UNIONS)
        _check_choice('drop path schedule', self.drop_path_schedule, DROP_PATH_SCHEDULES)
        _check_choice('recurrence', self.recurrence, RECURRENCES)
        recurrent.get_cell(self.cell)
        if self.num_classes < 0:
            raise UserError(f'num_classes must be >= 0, got {self.num_classes}.')
        super().__post_init__()

    @property
    def total_stride(self) -> int:
        return math.prod(self.patch_sizes)

    def drop_path_rates(self) -> list[list[float]]:
        """Per-stage, per-block stochastic depth rates.

        'linear' rises from 0 to ``drop_path_rate`` over all blocks (the official
        repository); 'constant' uses ``drop_path_rate`` everywhere (timm).
        """
        total = sum(self.layers)
        rates, start = [], 0
        for depth in self.layers:
            if self.drop_path_schedule == 'constant':
                rates.append([self.drop_path_rate] * depth)
            else:
                rates.append([self.drop_path_rate * (start + j) / max(total - 1, 1)
                              for j in range(depth)])
            start += depth
        return rates

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """A UserError unless ``shape`` is a batch of images ``[B, H, W, in_chans]`` that
        this model takes: as in timm, any sides whose grid stays at least 1x1 after each
        downsampling (the convolutions are VALID: 160 px gives a 22x22 grid, the last 6
        pixels dropped, then 11x11), i.e. at least the total stride; with a position
        embedding, sides whose stem grid is the embedding's."""
        if len(shape) != 4 or shape[-1] != self.in_chans:
            raise UserError(f'Expected images [B, H, W, {self.in_chans}] (channels last), '
                            f'got shape {tuple(shape)}.')
        h, w = shape[1:3]
        s = self.total_stride
        if h < s or w < s:
            raise UserError(f'Images of {h}x{w} pixels are too small: each downsampling '
                            f'(patch sizes {tuple(self.patch_sizes)}) must leave at least '
                            f'one patch, so the smallest size that works is {s}x{s}.')
        if self.pos_embed_grid is not None:
            p = self.patch_sizes[0]
            grid = tuple(self.pos_embed_grid)
            if (h // p, w // p) != grid:
                raise UserError(
                    f'This model learned a position embedding for a {grid[0]}x{grid[1]} '
                    f'grid, which {h}x{w} images do not give (as in the official code): '
                    f'give {grid[0] * p}x{grid[1] * p} images (sides up to '
                    f'{grid[0] * p + p - 1}x{grid[1] * p + p - 1} crop to it).')

    def _block_kwargs(self, stage: int) -> dict:
        return dict(hidden_size=self.hidden_sizes[stage], mlp_ratio=self.mlp_ratios[stage],
                    token_mixer=self.token_mixer, cell=self.cell,
                    bidirectional=self.bidirectional, union=self.union, with_fc=self.with_fc,
                    fuse_axes=self.fuse_axes, recurrence=self.recurrence, unroll=self.unroll,
                    drop_rate=self.drop_rate,
                    dtype=self.dtype, param_dtype=self.param_dtype)

    def _conv(self, stage: int, name: str) -> nn.Conv:
        p = self.patch_sizes[stage]
        return nn.Conv(self.embed_dims[stage], (p, p), strides=(p, p), padding='VALID',
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _pos_embed(self, x: Array) -> Array:
        pos = self.param('absolute_pos_embed', nn.initializers.truncated_normal(0.02),
                         (1, *self.pos_embed_grid, x.shape[-1]), self.param_dtype)
        return x + pos.astype(self.dtype)

    def _stage(self, x: Array, stage: int, train: bool) -> Array:
        rates = self.drop_path_rates()[stage]
        kwargs = self._block_kwargs(stage)
        if self.scan_blocks:
            body = nn.remat(_ScannedBlock) if self.remat else _ScannedBlock
            scanned = nn.scan(body, variable_axes={'params': 0},
                              split_rngs={'params': True, 'dropout': True},
                              in_axes=0, length=len(rates))
            x, _ = scanned(kwargs, train, any(rates), name=f'stages_{stage}_blocks')(
                x, jnp.asarray(rates, jnp.float32))
            return x
        block_cls = nn.remat(SequencerBlock, static_argnums=(2,)) if self.remat \
            else SequencerBlock
        for j, rate in enumerate(rates):
            x = block_cls(**kwargs, name=f'stages_{stage}_blocks_{j}')(x, train, rate)
        return x

    def features(self, x: Array, train: bool = False) -> list[Array]:
        """Images [B, H, W, in_chans] -> the four stage outputs [B, h_i, w_i, C_i]."""
        return self(x, train, return_features=True)

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        self.check_input_shape(x.shape)
        x = self._conv(0, 'stem')(x.astype(self.dtype))
        if self.pos_embed_grid is not None:
            x = self._pos_embed(x)
        stage_outputs = []
        for stage in range(len(self.layers)):
            if stage > 0:
                x = self._conv(stage, f'stages_{stage}_downsample')(x)
            x = self._stage(x, stage, train)
            stage_outputs.append(x)
        if return_features:
            return stage_outputs
        x = LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='norm')(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.zeros, name='head')(x)


class Sequencer2D(Sequencer):
    """Sequencer with BiRNN2D token mixing (the paper's main model)."""


class Sequencer1D(Sequencer):
    """The vanilla Sequencer: one BiRNN over the flattened patch sequence, no fc."""

    patch_sizes: Sequence[int] = (14, 1, 1, 1)
    embed_dims: Sequence[int] = (384, 384, 384, 384)
    hidden_sizes: Sequence[int] = (192, 192, 192, 192)
    token_mixer: str = '1d'
