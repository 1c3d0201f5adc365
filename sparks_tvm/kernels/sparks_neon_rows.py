"""Nibble-packed stage-1 rows of the NEON Sparks kernel (:mod:`.sparks_conv2d_neon`).

A chunk's row of ``u`` values (0..9 per pixel) is stored in half the bytes: byte j holds
pixel j in its low nibble and pixel ``j + chunk / 2`` in its high nibble. Stage 2 then loads
half the bytes per gathered row, adds each byte to a byte total and its high nibble (``usra``)
to a second sum, and recovers the low nibbles' sum from the two (:func:`unpack_sums`).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .vector_tir import U8, VECTOR
from .vector_tir import bc as _bc, store as _store, u8 as _u8


def halves(v, lanes):
    """Lanes ``[0, lanes / 2)`` and ``[lanes / 2, lanes)`` of a vector (register halves: free)."""
    h = lanes // 2
    return (tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(h)]),
            tirx.Shuffle([v], [tirx.IntImm("int32", h + i) for i in range(h)]))


def pack_tap(lay, tv):
    """The ninth tap's match ``tv`` (0/1 per pixel of a chunk) as a stage-1 row adds it."""
    L = lay.plan.chunk
    if not lay.packed:
        return T.bind(tv)
    tv = T.bind(tv)
    lo, hi = halves(tv, L)
    return T.bind(lo | (hi << _bc(_u8(4), L // 2)))


def store_u(lay, s1, addr, cnt, tv):
    """Store one chunk's ``u = cnt + tv`` row (``tv`` from :func:`pack_tap`).

    Packed rows put pixel ``j + chunk / 2`` in the high nibble of pixel j's byte: u <= 9
    fits, the byte sum of cnt (<= 8) and the packed tap cannot carry, and stage 2 then loads
    half the bytes per output channel (:func:`.sparks_conv2d_neon._stage2`).
    """
    L = lay.plan.chunk
    if not lay.packed:
        _store(s1, [], addr, L, cnt + tv)
        return
    lo, hi = halves(cnt, L)
    _store(s1, [], addr, L // 2, insert_high(lo, hi, L // 2, lay.aarch64) + tv)


def insert_high(lo, hi, lanes, aarch64):
    """``lo | hi << 4`` for nibbles ``lo``: one ``sli`` per 16 bytes on aarch64.

    LLVM knows a byte popcount is below 16, drops the mask its ``sli`` pattern needs and
    emits a shift and an add instead; the intrinsic keeps it one instruction. Elsewhere (the
    host tests run this kernel) the portable expression.
    """
    if not aarch64:
        return lo | (hi << _bc(_u8(4), lanes))
    parts = []
    for q in range(0, lanes, VECTOR):
        piece = [tirx.IntImm("int32", q + i) for i in range(VECTOR)]
        parts.append(tirx.call_llvm_pure_intrin(f"{U8}x{VECTOR}", "llvm.aarch64.neon.vsli", tirx.Shuffle([lo], piece),
                                                tirx.Shuffle([hi], piece), tirx.const(4, "int32")))
    if len(parts) == 1:
        return parts[0]
    return tirx.Shuffle(parts, [tirx.IntImm("int32", i) for i in range(lanes)])


def unpack_sums(lay, total, high):
    """Per-pixel sums of a block from packed rows, in pixel order.

    ``total`` is the byte sum of the rows (mod 256: each byte adds ``lo + 16 * hi``) and
    ``high`` the sum of their high nibbles (``>> 4``, exact: at most 28 * 9), so the low
    nibbles sum to ``total - 16 * high`` mod 256, itself at most 252, hence exact.
    """
    tile, chunk, h = lay.plan.tile, lay.plan.chunk, lay.rowb
    low = total - (high << _bc(_u8(4), h))
    # Row byte sc * chunk / 2 + j holds pixels sc * chunk + j (low) and + chunk / 2 (high).
    order = []
    for sc in range(tile // chunk):
        order += [sc * chunk // 2 + j for j in range(chunk // 2)]
        order += [h + sc * chunk // 2 + j for j in range(chunk // 2)]
    return tirx.Shuffle([low, high], [tirx.IntImm("int32", i) for i in order])
