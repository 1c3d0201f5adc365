"""The 512 binary 3x3 codewords and helpers to name and draw them.

Codeword ``c`` (an integer in [0, 512)) is the 3x3 kernel whose tap t (row-major) is -1 when
bit t of ``c`` is set and +1 otherwise, the same bit convention as the compiler's codebooks
(``relay_passes.binary_weights``) and ``sparks_tvm.models.random_codebook``.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CODEWORDS = 512
TAPS = 9


def all_codewords() -> torch.Tensor:
    """(512, 9) float32 tensor of +-1 entries; row c is codeword c."""
    bits = (torch.arange(NUM_CODEWORDS).unsqueeze(1) >> torch.arange(TAPS)) & 1
    return (1 - 2 * bits).to(torch.float32)


def kernel_codes(kernels) -> np.ndarray:
    """Integer codes of +-1 kernels (any shape ending in 3x3 or 9); sign(0) counts as +1."""
    k = np.asarray(kernels).reshape(-1, TAPS)
    return ((k < 0).astype(np.int64) << np.arange(TAPS)).sum(axis=1)


def code_strings(codes) -> list[str]:
    """Human-readable kernels: 9 characters, '+' / '-' per tap, row-major."""
    return ["".join("-" if (int(c) >> t) & 1 else "+" for t in range(TAPS)) for c in codes]


def random_codes(k: int, generator: torch.Generator | None = None) -> np.ndarray:
    """K distinct codewords drawn uniformly without replacement (SNN-style random codebook)."""
    return torch.randperm(NUM_CODEWORDS, generator=generator)[:k].numpy().astype(np.int64)
