"""PyTorch reference models for parity checks (needs torch and timm).

timm implements Sequencer2D with LSTM cells. The official repository's other
ablations are built here from timm's own parts, as the official code does:
GRU/RNN cells plug into timm's ``RNN2dBase``, and the vanilla Sequencer1D follows
``okojoalg/sequencer/models/vanilla_sequencer.py`` (its state_dict uses the official
key names: ``blocks.{stage}.{j}``, ``head``).
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models import sequencer as timm_sequencer
from torch import nn

import sequencer_jax as sj


def _rnn2d(rnn_cls):
    class RNN2d(timm_sequencer.RNN2dBase):
        def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                     bidirectional=True, union='cat', with_fc=True, device=None, dtype=None):
            super().__init__(input_size, hidden_size, num_layers, bias, bidirectional, union,
                             with_fc, device, dtype)
            make = lambda: rnn_cls(input_size, hidden_size, num_layers, batch_first=True,  # noqa: E731
                                   bias=bias, bidirectional=bidirectional)
            if self.with_vertical:
                self.rnn_v = make()
            if self.with_horizontal:
                self.rnn_h = make()
    return RNN2d


RNN_LAYERS = {'lstm': timm_sequencer.LSTM2d, 'gru': _rnn2d(nn.GRU), 'rnn': _rnn2d(nn.RNN)}
TORCH_RNNS = {'lstm': nn.LSTM, 'gru': nn.GRU, 'rnn': nn.RNN}


class _VanillaBlock(nn.Module):
    def __init__(self, dim, hidden, mlp_ratio, cell, bidirectional):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.rnn_tokens = nn.Module()
        self.rnn_tokens.rnn = TORCH_RNNS[cell](dim, hidden, 1, batch_first=True,
                                               bidirectional=bidirectional)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)

    def forward(self, x):
        b, h, w, c = x.shape
        y, _ = self.rnn_tokens.rnn(self.norm1(x).reshape(b, -1, c))
        x = x + y.reshape(b, h, w, -1)
        return x + self.mlp_channels(self.norm2(x))


class _Down(nn.Module):
    def __init__(self, dim_in, dim_out, patch):
        super().__init__()
        self.down = nn.Conv2d(dim_in, dim_out, patch, patch)

    def forward(self, x):
        return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VanillaSequencer(nn.Module):
    """The official Sequencer1D (``v_sequencer_*``), official key names."""

    def __init__(self, layers, patch_sizes, embed_dims, hidden_sizes, mlp_ratios,
                 num_classes, cell='lstm', bidirectional=True, pos_embed_grid=None, **_):
        super().__init__()
        self.stem = nn.Module()
        self.stem.proj = nn.Conv2d(3, embed_dims[0], patch_sizes[0], patch_sizes[0])
        self.absolute_pos_embed = None
        if pos_embed_grid is not None:
            self.absolute_pos_embed = nn.Parameter(
                0.02 * torch.randn(1, *pos_embed_grid, embed_dims[0]))
        stages = []
        for i, depth in enumerate(layers):
            blocks = [_VanillaBlock(embed_dims[i], hidden_sizes[i], mlp_ratios[i], cell,
                                    bidirectional) for _ in range(depth)]
            if i < len(layers) - 1:
                blocks.append(_Down(embed_dims[i], embed_dims[i + 1], patch_sizes[i + 1]))
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x):
        x = self.stem.proj(x).permute(0, 2, 3, 1)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=(1, 2)))


def build(name: str, num_classes: int = 1000, **overrides) -> nn.Module:
    """The PyTorch reference of a registered variant (eval mode), with random weights.

    Every parameter gets noise on top of its init, so that zero-initialised parts
    (the head) do not hide mistakes.
    """
    args = sj.models.model_args(name)
    args.update(overrides)
    if args.get('token_mixer', sj.create_model(name).token_mixer) == '1d':
        model = VanillaSequencer(num_classes=num_classes, **args)
    else:
        model = timm_sequencer.Sequencer2d(
            num_classes=num_classes, layers=args['layers'], patch_sizes=args['patch_sizes'],
            embed_dims=args['embed_dims'], hidden_sizes=args['hidden_sizes'],
            mlp_ratios=args['mlp_ratios'], rnn_layer=RNN_LAYERS[args.get('cell', 'lstm')],
            bidirectional=args.get('bidirectional', True), union=args.get('union', 'cat'),
            with_fc=args.get('with_fc', True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def logits(model: nn.Module, images_nhwc) -> torch.Tensor:
    """Runs the reference on channels-last numpy images."""
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()
