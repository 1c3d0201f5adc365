"""Binary-operation (BOPs) cost model of SPARKS.md, and bits per weight."""

from __future__ import annotations

import math


def dense_bops(cin: int, cout: int, out_pixels: int, taps: int = 9) -> int:
    """BOPs of a dense binary conv: one XNOR-popcount bit per weight per output pixel."""
    return cin * cout * taps * out_pixels


def sparks_bops(cin: int, cout: int, out_pixels: int, codewords: int) -> int:
    """BOPs of the two-stage Sparks conv (stage 1 per codeword, stage 2 gather-add).

    ``min`` of the two forms: a Sparks layer can always be run as a dense one.
    """
    two_stage = cin * codewords * 9 * out_pixels + cin * cout * out_pixels // 2
    return min(dense_bops(cin, cout, out_pixels), two_stage)


def sparks_is_cheaper(cin: int, cout: int, out_pixels: int, codewords: int) -> bool:
    """True when the two-stage form costs strictly fewer BOPs than the dense form."""
    return cin * codewords * 9 * out_pixels + cin * cout * out_pixels // 2 < dense_bops(cin, cout, out_pixels)


def bits_per_weight(codewords: int) -> float:
    """Index bits per 3x3 kernel, per weight: ceil(log2 K) / 9 (codebook storage excluded)."""
    if codewords <= 1:
        return 0.0
    return math.ceil(math.log2(codewords)) / 9.0


#: (cin, cout, input side, stride) of ResNet-18's binary 3x3 convs at 224x224 (the benchmarks' shapes).
RESNET18_BINARY_LAYERS = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2),
                          (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1)]
