"""The check half of the pass: decomposing weights into alpha, codebook and indices."""

import numpy as np

from relay_passes.binary_weights import BinaryWeights, NotBinary, analyze_binary_weights
from sparks_tvm.models import random_codebook


def make_weight(rng, o=12, c=10, k=6, flip=None):
    codebook = random_codebook(rng, k)
    idx = rng.integers(0, k, size=(o, c))
    idx[:k, 0] = np.arange(k)
    alpha = rng.choice([0.25, 0.5, 0.75], size=o).astype(np.float32)
    sign = np.ones(o, np.float32) if flip is None else flip
    return (codebook[idx] * (alpha * sign).reshape(-1, 1, 1, 1)).astype(np.float32), k


def test_decomposition_reconstructs_weights(rng):
    w, k = make_weight(rng)
    bw = analyze_binary_weights(w)
    assert isinstance(bw, BinaryWeights) and bw.num_codewords == k
    assert np.array_equal(bw.alpha.reshape(-1, 1, 1, 1) * bw.codebook[bw.idx].astype(np.float32), w)


def test_negative_channel_scale_does_not_double_k(rng):
    """A BatchNorm with negative gamma folded in flips whole channels: still K codewords."""
    flip = np.where(np.arange(12) % 3 == 0, -1.0, 1.0).astype(np.float32)
    w, k = make_weight(rng, flip=flip)
    bw = analyze_binary_weights(w)
    assert bw.num_codewords == k
    assert np.array_equal(bw.alpha.reshape(-1, 1, 1, 1) * bw.codebook[bw.idx].astype(np.float32), w)


def test_non_binary_names_the_channel(rng):
    w, _ = make_weight(rng)
    w[7, 3, 1, 2] *= 1.01
    res = analyze_binary_weights(w)
    assert isinstance(res, NotBinary) and res.channel == 7
    assert "output channel 7" in res.reason and "2 distinct magnitudes" in res.reason


def test_zero_weight_is_not_binary(rng):
    w, _ = make_weight(rng)
    w[2, 0, 0, 0] = 0.0
    res = analyze_binary_weights(w)
    assert isinstance(res, NotBinary) and res.channel == 2


def test_non_3x3_binary_has_no_codebook(rng):
    w = np.where(rng.random((4, 3, 5, 5)) < 0.5, -0.5, 0.5).astype(np.float32)
    bw = analyze_binary_weights(w)
    assert isinstance(bw, BinaryWeights) and bw.codebook is None
    assert np.array_equal(bw.alpha.reshape(-1, 1, 1, 1) * bw.signs, w)
