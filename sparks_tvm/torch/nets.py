"""Small Bi-Real / ReActNet-style networks with a choice of conv: float, BNN, SNN, Sparks.

One architecture for every row of the training table, so the rows differ only in how the
block convs are binarized (SPARKS.md: only the 3x3 convs inside residual blocks are binary;
the stem, the 1x1 downsample shortcuts and the classifier stay full precision). Each block is
Bi-Real's single-conv residual block with ReActNet's learnable shifts:

    out = BN(conv(sign(x + b0))) + shortcut(x);  out = PReLU(out + b1) + b2

The conv is followed directly by its BatchNorm, so torch's TorchScript exporter folds the BN
into the constant binarized weight (each channel stays +-alpha_o * gamma_o / sigma_o).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparksError
from .layers import BinaryActivation, DenseBinaryConv2d, FixedCodebookConv2d, RandomCodebookConv2d, SparksConv2d

#: The conv kinds of the training table ("topk": fixed codewords set from a dense BNN).
KINDS = ("float", "dense", "snn", "topk", "sparks")


class LearnableBias(nn.Module):
    """A per-channel shift (ReActNet's RSign/RPReLU ``b``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


def make_conv(kind: str, cin: int, cout: int, stride: int, codewords: int | None, seed: int,
              selection: str = "slack") -> nn.Module:
    """The block conv of one table row (3x3, padding 1)."""
    if kind == "float":
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    if kind == "dense":
        return DenseBinaryConv2d(cin, cout, 3, stride=stride, padding=1)
    if kind == "snn":
        return RandomCodebookConv2d(cin, cout, codewords, stride=stride, padding=1, seed=seed)
    if kind == "topk":
        return FixedCodebookConv2d(cin, cout, codewords, stride=stride, padding=1)
    if kind == "sparks":
        return SparksConv2d(cin, cout, codewords, stride=stride, padding=1, selection=selection, seed=seed)
    raise SparksError(f"unknown conv kind {kind!r}; expected one of {', '.join(KINDS)}")


class BiRealBlock(nn.Module):
    """One residual block around one 3x3 conv (binary unless ``kind == 'float'``)."""

    def __init__(self, kind, cin, cout, stride, codewords=None, seed=0, selection="slack"):
        super().__init__()
        self.move0 = LearnableBias(cin)
        # The float baseline keeps the same block without the sign (PReLU stays non-linear).
        self.act = nn.Identity() if kind == "float" else BinaryActivation()
        self.conv = make_conv(kind, cin, cout, stride, codewords, seed, selection)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
        self.move1 = LearnableBias(cout)
        self.prelu = nn.PReLU(cout, init=0.25)
        self.move2 = LearnableBias(cout)

    def forward(self, x):
        out = self.bn(self.conv(self.act(self.move0(x))))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.move2(self.prelu(self.move1(out)))


class BiRealNet(nn.Module):
    """Float stem, stages of binary residual blocks, float classifier.

    Parameters
    ----------
    kind : {"float", "dense", "snn", "topk", "sparks"}
    widths : tuple of int
        Channels per stage; every stage after the first starts with a stride-2 block.
    blocks : tuple of int
        Blocks (binary convs) per stage.
    codewords : int
        K for ``snn``, ``topk`` and ``sparks``.
    in_channels, num_classes : int
    stem_stride : int
        Stride of the float 3x3 stem (2 halves the cost on 28x28 digits).
    seed : int
        Seeds the parameter initialisation, the SNN random codebooks and the Sparks initial
        selection logits (layer j uses ``seed * 1000 + j``).
    selection : {"slack", "full"}
        Sparks permutation form.
    """

    def __init__(self, kind="sparks", widths=(32, 64), blocks=(2, 2), codewords=16, in_channels=1,
                 num_classes=10, stem_stride=2, seed=0, selection="slack"):
        super().__init__()
        if kind not in KINDS:
            raise SparksError(f"unknown conv kind {kind!r}; expected one of {', '.join(KINDS)}")
        if len(widths) != len(blocks) or not widths:
            raise SparksError(f"widths {widths} and blocks {blocks} must be non-empty and of equal length")
        torch.manual_seed(seed)  # the float parameters' initialisation
        self.kind, self.codewords = kind, (codewords if kind in ("snn", "topk", "sparks") else None)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
        )
        layers, cin, j = [], widths[0], 0
        for stage, (width, nblk) in enumerate(zip(widths, blocks)):
            for b in range(nblk):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BiRealBlock(kind, cin, width, stride, codewords, seed * 1000 + j, selection))
                cin, j = width, j + 1
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))
