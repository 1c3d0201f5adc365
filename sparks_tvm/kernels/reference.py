"""Readable numpy references for every binary kernel sparks_tvm compiles.

These are deliberately naive: they spell out the definitions in SPARKS.md so that the
optimized TIR kernels can be checked against them bit for bit.  Integer results are
returned *before* any float epilogue (alpha, bias, BatchNorm).
"""

from __future__ import annotations

import numpy as np

from .encoding import BINARIZE_MODES, codes_to_bits  # noqa: F401 - re-exported

def binarize(x: np.ndarray, mode: str) -> np.ndarray:
    """Binarize activations to int8 values in {-1, 0, +1} following ``mode``."""
    if mode == "sign":
        return np.sign(x).astype(np.int8)
    if mode == "ge":
        return np.where(x >= 0, 1, -1).astype(np.int8)
    if mode == "gt":
        return np.where(x > 0, 1, -1).astype(np.int8)
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {BINARIZE_MODES}")


def _pad(a: np.ndarray, padding) -> np.ndarray:
    top, left, bottom, right = padding
    # Zero padding after binarization: a padded tap contributes 0, not -1 or +1.
    return np.pad(a, ((0, 0), (0, 0), (top, bottom), (left, right)))


def out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    """Output extent of a convolution along one axis."""
    return (size + pad_lo + pad_hi - k) // stride + 1


def binary_conv2d_ref(a: np.ndarray, w: np.ndarray, stride=(1, 1), padding=(0, 0, 0, 0)) -> np.ndarray:
    """Dense binary convolution on already-binarized integers.

    Parameters
    ----------
    a : ndarray, int8, shape (N, C, H, W)
        Activations in {-1, 0, +1}.
    w : ndarray, int8, shape (O, C, KH, KW)
        Weights in {-1, +1}.
    stride : tuple of int
    padding : tuple of int
        (top, left, bottom, right), zeros.

    Returns
    -------
    ndarray, int32, shape (N, O, OH, OW)
    """
    n, c, h, wd = a.shape
    o, c2, kh, kw = w.shape
    assert c == c2, (a.shape, w.shape)
    sh, sw = stride
    ap = _pad(a.astype(np.int32), padding)
    oh = out_size(h, kh, sh, padding[0], padding[2])
    ow = out_size(wd, kw, sw, padding[1], padding[3])
    out = np.zeros((n, o, oh, ow), np.int32)
    wi = w.astype(np.int32)
    for dy in range(kh):
        for dx in range(kw):
            patch = ap[:, :, dy : dy + sh * (oh - 1) + 1 : sh, dx : dx + sw * (ow - 1) + 1 : sw]
            out += np.einsum("nchw,oc->nohw", patch, wi[:, :, dy, dx])
    return out


def sparks_conv2d_ref(
    a: np.ndarray, codebook: np.ndarray, idx: np.ndarray, stride=(1, 1), padding=(1, 1, 1, 1)
) -> np.ndarray:
    """The two-stage Sparks convolution, literally as SPARKS.md defines it.

    Stage 1 convolves every input channel with each of the K codewords; stage 2 gathers,
    for output channel o, the response of input channel i to codeword ``idx[o, i]``.

    Parameters
    ----------
    a : ndarray, int8, shape (N, C, H, W)
        Binarized activations in {-1, 0, +1}.
    codebook : ndarray, int8, shape (K, 3, 3)
        The K codewords, entries in {-1, +1}.
    idx : ndarray, int, shape (O, C)
        Codeword index of every kernel.

    Returns
    -------
    ndarray, int32, shape (N, O, OH, OW)
    """
    k = codebook.shape[0]
    n, c, h, wd = a.shape
    # stage 1: S[n, i, k] = a[n, i] (*) code_k, each input channel on its own.
    a_ck = a.reshape(n * c, 1, h, wd)
    s = binary_conv2d_ref(a_ck, codebook.reshape(k, 1, 3, 3), stride, padding)
    s = s.reshape(n, c, k, *s.shape[2:])
    # stage 2: y[n, o] = sum_i S[n, i, idx[o, i]]
    o = idx.shape[0]
    out = np.zeros((n, o) + s.shape[3:], np.int32)
    for oc in range(o):
        out[:, oc] = s[:, np.arange(c), idx[oc]].sum(axis=1)
    return out
