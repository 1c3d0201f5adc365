"""Check: is a convolution weight tensor binary, and how many codewords does it use?

A binary conv weight has, per output channel o, every entry equal to +-a_o for one
magnitude a_o > 0 (a scale folded in, possibly with a BatchNorm). Its 3x3 kernels are then
codewords up to that channel's sign: a negative BatchNorm factor flips every kernel of its
channel, so ``c`` and ``-c`` are one codeword with ``alpha_o`` negated, and must not be
counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Relative spread tolerated between the magnitudes of one channel: none. Folding a scale
#: (or a BatchNorm) in float32 multiplies equal magnitudes by the same factor, so a binary
#: weight has bit-identical magnitudes. A weight even one ulp off is not replaced by alpha:
#: the difference would reach the next binarizer and could flip its sign (found by the
#: bit-flip fuzz test), so it is reported instead (strict) or compiled in float (lenient).
MAGNITUDE_RTOL = 0.0


@dataclass
class BinaryWeights:
    """A weight tensor decomposed as ``alpha[o] * signs[o, i, :, :]``.

    Attributes
    ----------
    alpha : ndarray, float32, (O,)
        Signed per-output-channel scale.
    signs : ndarray, int8, (O, C, KH, KW)
        +-1 entries (already multiplied by the channel's sign choice).
    codebook : ndarray, int8, (K, KH, KW) or None
        Distinct kernels in first-use order (3x3 kernels only).
    idx : ndarray, int32, (O, C) or None
        ``signs[o, i] == codebook[idx[o, i]]``.
    """

    alpha: np.ndarray
    signs: np.ndarray
    codebook: np.ndarray | None = None
    idx: np.ndarray | None = None

    @property
    def num_codewords(self) -> int | None:
        return None if self.codebook is None else int(self.codebook.shape[0])


@dataclass
class NotBinary:
    """Why a weight tensor is not binary, in words a user can act on."""

    reason: str
    channel: int | None = None
    details: dict = field(default_factory=dict)


def _unique_kernels(kernels: np.ndarray):
    """Distinct rows of an (M, 9) int8 array in first-use order, and each row's index."""
    codes = ((kernels < 0).astype(np.int64) << np.arange(kernels.shape[1])).sum(axis=1)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    order = np.argsort(first)  # first-use order keeps codebooks stable and readable
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return kernels[first[order]], rank[inverse]


def _choose_channel_signs(signs: np.ndarray) -> np.ndarray:
    """Pick s_o in {+1, -1} per channel to minimise the number of distinct kernels.

    Greedy, channels with most distinct kernels first, then one refinement sweep: the
    exact problem is a set-cover variant, but flipped channels produced by folding a
    BatchNorm are recovered exactly because their kernels are negations of shared ones.
    """
    o = signs.shape[0]
    flat = signs.reshape(o, signs.shape[1], -1)
    weights = 1 << np.arange(flat.shape[2], dtype=np.int64)
    pos = [set(((k < 0).astype(np.int64) * weights).sum(axis=1).tolist()) for k in flat]
    full = int(weights.sum())
    neg = [{full ^ c for c in s} for s in pos]
    choice = np.ones(o, np.int64)
    order = sorted(range(o), key=lambda i: -len(pos[i]))
    used: dict[int, int] = {}

    def add(s, d):
        for c in s:
            used[c] = used.get(c, 0) + d

    for i in order:
        gain_pos = len(pos[i] - used.keys())
        gain_neg = len(neg[i] - used.keys())
        choice[i] = 1 if gain_pos <= gain_neg else -1
        add(pos[i] if choice[i] > 0 else neg[i], 1)
    for i in order:
        cur = pos[i] if choice[i] > 0 else neg[i]
        add(cur, -1)
        live = {c for c, n in used.items() if n > 0}
        choice[i] = 1 if len(pos[i] - live) <= len(neg[i] - live) else -1
        add(pos[i] if choice[i] > 0 else neg[i], 1)
    return choice


def analyze_binary_weights(weight: np.ndarray) -> BinaryWeights | NotBinary:
    """Decompose an OIHW weight tensor, or explain why it is not binary.

    Parameters
    ----------
    weight : ndarray, (O, C, KH, KW)

    Returns
    -------
    BinaryWeights or NotBinary
    """
    if weight.ndim != 4:
        return NotBinary(f"weight has rank {weight.ndim}, expected 4 (OIHW)")
    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        bad = int(np.argwhere(~np.isfinite(w))[0][0])
        return NotBinary(f"output channel {bad} has non-finite weights", channel=bad)
    o = w.shape[0]
    mag = np.abs(w).reshape(o, -1)
    alpha = mag.mean(axis=1)
    for ch in range(o):
        if alpha[ch] == 0 or mag[ch].min() == 0:
            return NotBinary(f"output channel {ch} has zero weights (binary weights are +-alpha)", channel=ch)
        spread = (mag[ch].max() - mag[ch].min()) / alpha[ch]
        if spread > MAGNITUDE_RTOL:
            distinct = np.unique(mag[ch].astype(np.float32))
            shown = ", ".join(f"{v:.9g}" for v in distinct[:4]) + (", ..." if distinct.size > 4 else "")
            return NotBinary(
                f"output channel {ch} is not +-alpha: its weights take {distinct.size} distinct "
                f"magnitudes ({shown})",
                channel=ch,
                details={"magnitudes": distinct[:16].tolist()},
            )
    signs = np.where(w < 0, -1, 1).astype(np.int8)
    result = BinaryWeights(alpha=alpha.astype(np.float32), signs=signs)
    if w.shape[2:] == (3, 3):
        s = _choose_channel_signs(signs)
        signs = (signs * s.reshape(-1, 1, 1, 1)).astype(np.int8)
        codebook, idx = _unique_kernels(signs.reshape(-1, 9))
        result = BinaryWeights(
            alpha=(alpha * s).astype(np.float32),
            signs=signs,
            codebook=codebook.reshape(-1, 3, 3).astype(np.int8),
            idx=idx.reshape(o, -1).astype(np.int32),
        )
    return result


def fold_input_scale(weight: np.ndarray, scale: np.ndarray) -> np.ndarray | NotBinary:
    """Move a constant activation scale into the weights: ``conv(s * b, W) = conv(b, W * s)``.

    Valid when ``s`` is one value or one value per input channel (broadcast against NCHW).
    The result is binary only if every ``|s_i|`` is equal (a sign per input channel is fine:
    it flips kernels, as a folded BatchNorm does per output channel).

    Parameters
    ----------
    weight : ndarray, (O, C, KH, KW)
    scale : ndarray, broadcastable to (N, C, H, W)

    Returns
    -------
    ndarray (the folded float32 weight) or NotBinary (why the scaled input is not binary).
    """
    s = np.asarray(scale, dtype=np.float32)
    c = weight.shape[1]
    if s.ndim > 4:
        return NotBinary(f"activation scale has rank {s.ndim} > 4")
    shape = (1,) * (4 - s.ndim) + s.shape
    if shape[0] != 1 or shape[2] != 1 or shape[3] != 1 or shape[1] not in (1, c):
        return NotBinary(f"activation scale of shape {tuple(s.shape)} varies over batch or space; only a "
                         f"per-tensor or per-input-channel scale can move into the weights")
    per_channel = np.broadcast_to(s.reshape(-1), (c,)) if shape[1] == 1 else s.reshape(c)
    if not np.all(np.isfinite(per_channel)):
        return NotBinary("activation scale is not finite")
    mags = np.unique(np.abs(per_channel))
    if mags[0] == 0:
        return NotBinary("activation scale is 0 for some input channel")
    if mags.size > 1:
        return NotBinary(f"activation scale differs between input channels ({mags.size} magnitudes, "
                         f"{mags[0]:.6g}..{mags[-1]:.6g}): the scaled activations are not binary")
    return (np.asarray(weight, np.float32) * per_channel.reshape(1, c, 1, 1)).astype(np.float32)
