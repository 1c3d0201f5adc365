"""Nibble-packed stage-1 rows of the NEON Sparks kernel (:mod:`.sparks_conv2d_neon`), and
stage 2, which gathers and sums them.

A chunk's row of ``u`` values (0..9 per pixel) is stored in half the bytes: byte j holds
pixel j in its low nibble and pixel ``j + chunk / 2`` in its high nibble. Stage 2 then loads
half the bytes per gathered row, adds each byte to a byte total and its high nibble (``usra``)
to a second sum, and recovers the low nibbles' sum from the two (:func:`unpack_sums`).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .neon_llvm import LD1_BYTES, advance, ld1, st1
from .vector_tir import U8, VECTOR
from .vector_tir import bc as _bc, load as _load, store as _store, u8 as _u8


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


def store_rows(lay, s1, base, lo, hi, cnt_of, tv):
    """Store one channel chunk's rows ``j = lo .. hi - 1``: ``u = cnt_of(j) + tv`` at row j
    (``tv`` from :func:`pack_tap`).

    Packed rows put pixel ``j + chunk / 2`` in the high nibble of pixel j's byte: u <= 9
    fits, the byte sum of cnt (<= 8) and the packed tap cannot carry, and stage 2 then loads
    half the bytes per output channel (:func:`stage2`). On aarch64 a packed row of 32 or 64
    bytes is one ``st1`` through a 64-bit pointer, which LLVM post-increments.
    """
    L, h = lay.plan.chunk, lay.rowb
    if not lay.packed:
        with T.serial(lo, hi) as j:
            _store(s1, [], base + j * h, L, cnt_of(j) + tv)
        return

    def value(j):
        low, high = halves(cnt_of(j), L)
        return insert_high(low, high, L // 2, lay.aarch64) + tv

    if lay.aarch64 and L // 2 in LD1_BYTES:
        first = T.bind(tirx.address_of(tirx.BufferLoad(s1, [base + lo * h])))
        with T.serial(0, hi - lo) as j:
            st1(advance(first, j * h), value(lo + j), L // 2)
    else:
        with T.serial(lo, hi) as j:
            _store(s1, [], base + j * h, L // 2, value(j))


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


def first_row(lay, idx, rank, o, c, c0):
    """Row of ``(c, idx[o, c])`` within the stage-1 block that starts at channel ``c0``
    (codeword k is row ``rank[k]`` of its channel)."""
    value = tirx.Cast("int32", idx[o, c // lay.per])
    if lay.bits < 8:
        value = (value >> (c % lay.per * lay.bits)) & ((1 << lay.bits) - 1)
    return (c - c0) * lay.k + tirx.Cast("int32", rank[tirx.floormod(value, lay.k)])


def first_rows(lay, idx, rank, starts):
    """``starts[o, b * per + f]``: byte offset of output o's first row of field f in block b
    (where stage 2 starts walking it), once per call: worth it when several pixel tiles
    start there (a layer of one tile computes them in stage 2)."""
    per = lay.per
    with T.parallel(0, lay.o) as o:
        for b, (c0, c1) in enumerate(lay.blocks):
            for f in range(min(per, c1 - c0)):
                T.buffer_store(starts, first_row(lay, idx, rank, o, c0 + f, c0) * lay.rowb, [o, b * per + f])


class RowWalker:
    """Stage 2's walk over one output channel's gathered rows in a block.

    Each row is the previous one plus its step (:func:`.sparks_conv2d_neon._prepare_codewords`).
    On aarch64, rows of 32 or 64 bytes are read through a pointer with ``ld1`` and the step
    folds into it (post-indexed by a register): one instruction per row, where a row offset
    costs an address add and two ``ldp``. Elsewhere, byte offsets and plain loads.

    Parameters
    ----------
    lay : _Layout
        The layer.
    s1 : Buffer
        The stage-1 block.
    at : PrimExpr
        Element of ``s1`` where the first row starts.
    nbytes : int
        Bytes read per row (its first ones).
    """

    def __init__(self, lay, s1, at, nbytes):
        self.s1, self.h = s1, nbytes
        self.pointer = lay.aarch64 and nbytes in LD1_BYTES
        self.at = T.bind(tirx.address_of(tirx.BufferLoad(s1, [at])) if self.pointer else at)

    def row(self):
        """The current row, bound once (its bytes feed two sums)."""
        return T.bind(ld1(self.at, self.h) if self.pointer else _load(self.s1, [], self.at, self.h))

    def advance(self, step):
        """Move to the next row, ``step`` bytes on."""
        self.at = T.bind(advance(self.at, step) if self.pointer else self.at + step)


def block_sums(lay, s1, s1_base, gather, o, c0, c1, live=None):
    """One output channel's sum of its gathered rows of one channel block, in pixel order.

    The sum stays in byte registers (``u <= 9``, at most 28 channels); packed rows add each
    loaded byte once to the total and once, shifted, to the high-nibble sum (``usra``). The
    rows are walked field by field, each the previous one plus its step
    (``gather = (step, idx, rank, starts)``: :func:`first_rows`, :class:`RowWalker`). With
    ``live`` (a tile whose used pixels all sit in the low nibbles), only the first ``live``
    bytes of each row are read and their low nibbles' sums returned.
    """
    step, idx, rank, starts = gather
    b = c0 // lay.plan.block
    h, per = live or lay.rowb, lay.per
    total = high = None
    for f in range(min(per, c1 - c0)):
        walk = None
        for c in range(c0 + f, c1, per):
            if walk is None:
                at = first_row(lay, idx, rank, o, c, c0) * lay.rowb if starts is None else starts[o, b * per + f]
                walk = RowWalker(lay, s1, s1_base + at, h)
            else:
                walk.advance(step[o, f, (c - per) // per])
            row = walk.row()
            total = row if total is None else T.bind(total + row)
            if lay.packed:
                top = row >> _bc(_u8(4), h)
                high = top if high is None else T.bind(high + top)
    if not lay.packed:
        return total
    return total - (high << _bc(_u8(4), h)) if live else unpack_sums(lay, total, high)


def tail_bytes(lay):
    """Bytes of each row stage 2 reads in the last tile of an image, or None to read all.

    Past the image's pixels and probe lanes, a tile's lanes are never stored: when those
    of the last tile all sit in the low nibbles of a packed row (pixel j < chunk / 2), its
    rows' first bytes suffice (at 28x28, 26 of 128 pixels: 32 of 64 bytes, no high sums).
    """
    used = lay.last_used
    if not lay.packed or lay.plan.tile != lay.plan.chunk:
        return None
    for nbytes in (16, 32):
        if used <= nbytes < lay.rowb:
            return nbytes
    return None


def stage2(lay, blocks, gather, acc, n, o_lo, o_count, p0, first, last):
    """Stage 2 of channel blocks ``[(s1, s1_base, c0, c1), ...]``: per output channel, the
    blocks' byte sums widened and added in registers, then into the accumulator once.

    ``last``: whether the tile is its image's last, which reads only :func:`tail_bytes`
    bytes of each row when the layer allows it.
    """
    live = tail_bytes(lay)
    if live is None:
        _stage2_tile(lay, blocks, gather, acc, n, o_lo, o_count, p0, first, None)
        return
    with T.If(last):
        with T.Then():
            _stage2_tile(lay, blocks, gather, acc, n, o_lo, o_count, p0, first, live)
        with T.Else():
            _stage2_tile(lay, blocks, gather, acc, n, o_lo, o_count, p0, first, None)


def _stage2_tile(lay, blocks, gather, acc, n, o_lo, o_count, p0, first, live):
    tile = live or lay.plan.tile
    with T.serial(0, o_count) as ol:
        o = o_lo + ol
        wide = None
        for s1, s1_base, c0, c1 in blocks:
            part = tirx.Cast(f"{lay.acc}x{tile}", block_sums(lay, s1, s1_base, gather, o, c0, c1, live))
            wide = part if wide is None else T.bind(wide + part)
        if not first:
            wide = _load(acc, [n, o], p0, tile) + wide
        _store(acc, [n, o], p0, tile, wide)
