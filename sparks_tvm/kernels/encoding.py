"""The bit encoding of the binary kernels, in one place.

- The binarizer rules (``BINARIZE_MODES``: what each recognised binarizer does with an
  activation of exactly 0) and the 2-bit activation code every kernel reads (``neg``: the tap
  holds -1; ``nonzero``: it holds a real +-1, inside the image and non-zero for ONNX ``Sign``).
- Codewords as 9-bit words (``codes_to_bits``: bit t set where tap t is -1).
- Codeword indices packed at ``index_bits(K)`` bits (``pack_indices`` / ``unpack_indices``),
  and the forcing of an index into ``[0, K)`` (``codeword_index``).
- Dense binary weights packed 32 input channels to a word (``pack_binary_weights``).
- The Sparks accumulator's width, chosen once (``accumulator_dtype``).

The numpy references (:mod:`.reference`) and the TE computes import these; nothing here
imports the rest of the project.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx

#: How each recognised binarizer maps an activation of exactly 0.
#: ``sign``: ONNX ``Sign`` (0 -> 0, the activation contributes nothing);
#: ``ge``: ``x >= 0 ? +1 : -1`` (QONNX BipolarQuant, Larq: 0 -> +1);
#: ``gt``: ``x > 0 ? +1 : -1`` (0 -> -1).
BINARIZE_MODES = ("sign", "ge", "gt")


def activation_bits(x: tirx.PrimExpr, mode: str):
    """Return ``(neg, nonzero)`` as uint32 0/1 expressions for one activation.

    ``neg`` marks a -1, ``nonzero`` marks a tap that holds a real +-1 value.  Only ONNX
    ``Sign`` produces zeros; the ``x >= 0`` / ``x > 0`` forms never do.
    """
    zero = tirx.const(0, "float32")  # activations are float32 (checked by the lowering)
    if mode == "sign":
        return x < zero, x != zero
    if mode == "ge":
        return x < zero, tirx.const(True, "bool")
    if mode == "gt":
        return x <= zero, tirx.const(True, "bool")
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {BINARIZE_MODES}")


def activation_code(data, mode: str, n, c, y, x, shift=None) -> tirx.PrimExpr:
    """2-bit uint8 code of activation ``data[n, c, y, x]``, 0 outside the image (zero padding).

    Bit 0: the tap holds -1; bit 1: the tap holds a real +-1 (inside the image, and non-zero
    for ONNX ``Sign``). ``y``, ``x`` may be out of range: the load is clamped, the code masked.
    With ``shift`` (a per-channel float32 tensor), the value binarized is
    ``data[n, c, y, x] + shift[c]``: the same float add the graph would do, so the same bits.
    """
    h, w = int(data.shape[2]), int(data.shape[3])
    inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
    val = data[n, c, tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(x, w - 1), 0)]
    if shift is not None:
        val = val + shift[c]
    neg, nz = activation_bits(val, mode)
    code = tirx.Cast("uint8", as_u32(neg) | (as_u32(nz) << 1))
    return tirx.if_then_else(inside, code, tirx.const(0, "uint8"))


def as_u32(cond: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast("uint32", cond)


def codes_to_bits(codebook: np.ndarray) -> np.ndarray:
    """Pack (K, 3, 3) codewords in {-1, +1} to 9-bit words; bit t = 1 where tap t is -1."""
    flat = codebook.reshape(codebook.shape[0], -1)
    weights = 1 << np.arange(flat.shape[1], dtype=np.int64)
    return ((flat < 0).astype(np.int64) * weights).sum(axis=1).astype(np.int32)


def index_bits(num_codewords: int) -> int:
    """Bits stored per codeword index: tau = ceil(log2 K) rounded up to 1, 2, 4 or 8.

    Indices are the layer's weights: at K=16 a kernel costs 4 bits (plus the shared
    codebook) against 9 for a dense binary kernel. Field widths stay powers of two so a
    field never straddles a byte and unpacking is a shift and a mask.
    """
    tau = max(1, (num_codewords - 1).bit_length())
    for bits in (1, 2, 4, 8):
        if tau <= bits:
            return bits
    return 16


def idx_dtype(num_codewords: int) -> str:
    """Storage type of the packed codeword indices."""
    return "uint16" if index_bits(num_codewords) == 16 else "uint8"


def packed_index_shape(out_channels: int, in_channels: int, num_codewords: int) -> tuple:
    """``(O, ceil(C * bits / 8))`` bytes for :func:`pack_indices` (``(O, C)`` uint16 past K=256)."""
    bits = index_bits(num_codewords)
    if bits == 16:
        return (out_channels, in_channels)
    per = 8 // bits
    return (out_channels, -(-in_channels // per))


def pack_indices(idx, num_codewords: int):
    """Pack (O, C) codeword indices ``bits`` per field, low bits first, into the kernel's format."""
    idx = np.asarray(idx)
    bits = index_bits(num_codewords)
    if idx.ndim != 2 or (idx.size and (idx.min() < 0 or idx.max() >= num_codewords)):
        raise ValueError(f"indices must be (O, C) in [0, {num_codewords}), got shape {idx.shape}")
    if bits == 16:
        return idx.astype(np.uint16)
    per = 8 // bits
    o, c = idx.shape
    padded = np.zeros((o, -(-c // per) * per), np.uint16)
    padded[:, :c] = idx
    fields = padded.reshape(o, -1, per) << (np.arange(per, dtype=np.uint16) * bits)
    return fields.sum(axis=2).astype(np.uint8)


def unpack_indices(packed, num_codewords: int, in_channels: int):
    """Inverse of :func:`pack_indices` (for tests and reports)."""
    bits = index_bits(num_codewords)
    if bits == 16:
        return np.asarray(packed).astype(np.int64)
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint16) * bits
    fields = (np.asarray(packed, np.uint16)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :in_channels].astype(np.int64)


def codeword_index(idx_value: tirx.PrimExpr, num_codewords: int) -> tirx.PrimExpr:
    """Codeword index of a kernel, forced into ``[0, K)`` by ``floormod``.

    The forcing is what lets a schedule compute stage 1 per block of input channels: the
    gathered row then provably lies in that block (a clamp on an unsigned index gets
    simplified to a bare ``min``, whose lower bound the region analysis cannot see). It also
    keeps a tuning runner, which fills ``idx`` with random values, from reading out of
    bounds. For K a power of two (the Sparks case, K = 2^tau) it is a single AND.
    """
    return tirx.floormod(tirx.Cast("int32", idx_value), num_codewords)


def accumulator_dtype(in_channels: int) -> str:
    """Narrowest accumulator of biased responses (0..18 each) that cannot overflow: sum <= 18 * C."""
    return "uint16" if 18 * in_channels <= 65535 else "int32"


WORD_BITS = 32


def num_words(channels: int) -> int:
    return (channels + WORD_BITS - 1) // WORD_BITS


def pack_binary_weights(signs: np.ndarray) -> np.ndarray:
    """Pack (O, C, KH, KW) weights in {-1, +1} to uint32 words (O, CW, KH, KW), bit = -1."""
    o, c, kh, kw = signs.shape
    cw = num_words(c)
    neg = np.zeros((o, cw * WORD_BITS, kh, kw), np.uint64)
    neg[:, :c] = signs < 0
    neg = neg.reshape(o, cw, WORD_BITS, kh, kw)
    weights = (np.uint64(1) << np.arange(WORD_BITS, dtype=np.uint64)).reshape(1, 1, WORD_BITS, 1, 1)
    return (neg * weights).sum(axis=2).astype(np.uint32)
