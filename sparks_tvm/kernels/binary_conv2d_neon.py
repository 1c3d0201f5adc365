"""Dense binary convolution for 128-bit SIMD CPUs (aarch64 NEON), written as explicit vector TIR.

Same operation, parameters and output as :func:`.binary_conv2d.binary_conv2d_compute` (the
readable reference is :func:`sparks_tvm.reference.binary_conv2d_ref`), except the weights,
which :func:`pack_weights` lays out in the order the kernel reads them. On NEON the
instruction count is the cost; this kernel is a register-tiled XOR-popcount (BGEMM-style)
micro-kernel with output channels in the vector lanes.

Formulation. Eight input channels are one byte: bit ``j`` of byte ``cb`` is channel
``8 * cb + j`` holding -1. A *step* is one (channel-byte pair, tap): sixteen channels, two
bytes. A weight register holds eight output channels' two bytes at that step; the two
activation bytes of one output pixel are broadcast to all eight 16-bit lanes (``ld1r``,
post-indexed from tap to tap). Then ``eor``, ``cnt`` and ``uadalp`` (pairwise add of the two
bytes' counts into the 16-bit accumulator) count 8 channels x 16 mismatches in three
instructions. A tile of ``P`` pixels and ``Q`` weight registers (``8 Q`` output channels)
keeps ``P * Q`` accumulators in registers for all the steps: per step ``P`` broadcasts, one
``ld1`` of the ``Q`` weight registers and ``3 P Q`` instructions of counting, no widening,
and no pixel padding to a vector (pixels are not lanes). The accumulators are transposed
(``zip``) into pixel order once per tile.

Then ``y = R - 2 * mismatches``, ``R`` the number of real (non-zero, inside the image) taps
of the pixel. Two paths, chosen per call:

- no activation is 0 (always for the ``ge``/``gt`` binarizers; checked at run time for ONNX
  ``Sign``): padding is encoded as +1 (bit 0), which mismatches the weight's -1 taps; those
  are subtracted afterwards, per output channel and border class, from the weights' popcounts
  (``wpop``), and ``R = C * real taps``;
- some activation is 0: a second plane of real bits masks every step
  (``cnt((act ^ w) & real)``) and ``R`` is its popcount.

Layout. The binarized input is bit-packed once into ``(N, pairs, HP, WP, 2)`` bytes (the two
bytes of a pair interleaved, ``st2``), padded with zero bits: tap ``(dy, dx)`` of output
pixel ``(y, x)`` is the 16-bit word at row ``y * sh + dy``, column ``x * sw + dx``, whatever
the stride or border.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from . import binary_neon_asm as rowasm
from .binary_neon_pack import binarize as _binarize
from .common import ConvGeometry, int64_shape, nchw_output
from .neon_llvm import advance, count_step, imported, ld1, ld1r16
from .neon_padding import PaddedTaps, correct_padding, mask_free_or_masked
from .vector_tir import U8, extern
from .vector_tir import bc as _bc, chunks as _chunks, load as _load, store as _store

#: Output channels per weight register (16-bit lanes).
O_LANES = 8
#: Largest mismatch count of a pixel the 16-bit accumulators hold (``C * KH * KW``).
MAX_COUNT = 65535
U16 = "uint16"


@dataclass(frozen=True)
class NeonBinaryPlan:
    """Static choices of one layer's kernel.

    Attributes
    ----------
    pixels : int
        ``P``: output pixels per tile (each one broadcast per step).
    o_regs : int
        ``Q``: weight registers per output-channel block (``8 Q`` output channels).
    o_chunks : int
        Output-channel chunks run as separate parallel tasks (for layers of few pixel tiles).
    """

    pixels: int = 4
    o_regs: int = 4
    o_chunks: int = 1


#: Most taps of a kernel the NEON kernel takes (5x5; wider ones take the host core's kernel).
MAX_TAPS = 25


def supports(geom: ConvGeometry) -> bool:
    """Whether the kernel handles ``geom``: at most :data:`MAX_TAPS` taps, and mismatch
    counts that fit the 16-bit accumulators."""
    taps = geom.kernel[0] * geom.kernel[1]
    return taps <= MAX_TAPS and geom.in_channels * taps <= MAX_COUNT


def output_chunks(tiles: int, blocks: int, cores: int) -> int:
    """Output-channel chunks per pixel tile: enough tasks for ``cores``, dividing ``blocks``."""
    if cores <= 1 or tiles >= 2 * cores:
        return 1
    want = -(-2 * cores // tiles)
    return max(d for d in range(1, min(want, blocks) + 1) if blocks % d == 0)


def _tile_cost(geom: ConvGeometry, p: int, q: int) -> float:
    """Modelled instructions per output pixel and 8 output channels of a ``p x 8q`` tile:
    a tap row's words broadcast once, one weight load per tap, three per accumulator step;
    the padding pixels of each row's last tile count as work."""
    kw, sw = geom.kernel[1], geom.stride[1]
    words = (p - 1) * sw + kw
    per_row = words + kw * -(-q // 4) + 3 * p * q * kw
    ow = geom.out_width
    return per_row / (p * q) * (-(-ow // p) * p) / ow


#: Tiles the default plan chooses from: (pixels, registers), each within 32 NEON registers
#: (``p q`` accumulators, ``q`` weights, a tap row's words).
TILES = ((4, 4), (7, 2), (6, 2), (5, 3), (3, 4), (2, 4), (1, 4))


def default_plan(geom: ConvGeometry, cores: int = 1) -> NeonBinaryPlan:
    """The cheapest tile by :func:`_tile_cost` (4 pixels x 32 output channels where the row
    width is a multiple of 4: 16 accumulators), fewer registers for fewer channels."""
    oregs = -(-geom.out_channels // O_LANES)
    sw, kw = geom.stride[1], geom.kernel[1]
    shapes = [(p, min(q, oregs)) for p, q in TILES if p <= max(geom.out_width, 1)]
    shapes = [t for t in shapes if rowasm.fits(*t, sw, kw)] or [(1, min(4, oregs))]
    p, q = min(shapes, key=lambda t: _tile_cost(geom, *t))
    tiles = geom.batch * geom.out_height * -(-geom.out_width // p)
    blocks = -(-oregs // q)
    return NeonBinaryPlan(p, q, output_chunks(tiles, blocks, cores))


def accumulator_dtype(geom: ConvGeometry) -> str:
    """Narrowest accumulator of the mismatch count (at most ``C * KH * KW``)."""
    return U16 if geom.in_channels * geom.kernel[0] * geom.kernel[1] <= MAX_COUNT else "int32"


class _Layout(PaddedTaps):
    """Derived sizes of one layer."""

    def __init__(self, geom: ConvGeometry, plan: NeonBinaryPlan, aarch64: bool = False):
        self.geom, self.plan, self.aarch64 = geom, plan, aarch64
        self.n, self.c, self.h, self.w = geom.in_shape
        self.o = geom.out_channels
        self.kh, self.kw = geom.kernel
        self.oh, self.ow = geom.out_height, geom.out_width
        self.sh, self.sw = geom.stride
        self.pt, self.pl, self.pb, self.pr = geom.padding
        self.cb = -(-self.c // 8)
        self.pairs = -(-self.cb // 2)
        self.hp = max(self.h + self.pt + self.pb, self.sh * (self.oh - 1) + self.kh)
        self.tile = plan.pixels
        self.row_tiles = -(-self.ow // self.tile)
        self.last_lanes = self.ow - (self.row_tiles - 1) * self.tile
        # Columns read: those of the row's last tile's spare pixels too.
        self.wp = max(self.w + self.pl + self.pr, self.sw * (self.row_tiles * self.tile - 1) + self.kw)
        self.row = 2 * self.wp  # bytes per padded input row of one pair
        self.plane = self.hp * self.row
        self.pixels = self.oh * self.ow
        self.pp = self.pixels
        self.acc = U16
        self.oregs = -(-self.o // O_LANES)
        self.o8 = self.oregs * O_LANES
        q = plan.o_regs
        self.blocks = [(b * q, min(self.oregs, (b + 1) * q)) for b in range(-(-self.oregs // q))]
        if len(self.blocks) % plan.o_chunks:
            raise ValueError(f"o_chunks {plan.o_chunks} must divide the {len(self.blocks)} output blocks")
        # Bytes of one full block's weights: pairs x taps x Q registers of 16.
        self.wblock = self.pairs * len(self.taps) * q * 16
        self.wbytes = sum(self.pairs * len(self.taps) * (r1 - r0) * 16 for r0, r1 in self.blocks)

    def tap_order(self):
        """Natural tap indices (``dy * KW + dx``) in the order the weights are packed and read."""
        cols = rowasm.column_order(self.sw, self.kw)
        return [dy * self.kw + dx for dy in range(self.kh) for dx in cols]


def pack_weights(geom: ConvGeometry, signs, plan: NeonBinaryPlan | None = None) -> np.ndarray:
    """The kernel's weight bytes from ``signs`` (O, C, KH, KW) of +-1, in reading order.

    Block ``b`` (output-channel registers ``[b Q, b Q + Q)``) is ``[pair][tap][register][8
    output channels][2 bytes]``, taps in ``tap_order`` (by kernel row, then column residue
    class at column stride > 1), bit ``j`` of byte ``k`` of a pair ``p`` set where channel
    ``16 p + 8 k + j`` is -1; channels past C and output channels past O hold 0 bits.
    """
    plan = plan or default_plan(geom)
    lay = _Layout(geom, plan)
    signs = np.asarray(signs)
    want = (lay.o, lay.c, lay.kh, lay.kw)
    if signs.shape != want:
        raise ValueError(f"binary weights of shape {signs.shape} for a conv that needs {want}")
    neg = np.zeros((lay.o8, lay.pairs * 16, lay.kh * lay.kw), np.uint8)
    neg[:lay.o, :lay.c] = (signs < 0).reshape(lay.o, lay.c, -1)
    weights = (1 << np.arange(8, dtype=np.uint16)).astype(np.uint8)
    packed = np.einsum("ocjt,j->oct", neg.reshape(lay.o8, lay.pairs * 2, 8, -1), weights).astype(np.uint8)
    packed = packed[:, :, lay.tap_order()]
    parts = []
    for r0, r1 in lay.blocks:
        b = packed[r0 * O_LANES:r1 * O_LANES].reshape(r1 - r0, O_LANES, lay.pairs, 2, -1)
        parts.append(b.transpose(2, 4, 0, 1, 3).reshape(-1))
    return np.ascontiguousarray(np.concatenate(parts))


def _uaddlp(x):
    """Sums of adjacent byte pairs of a uint8x16 as uint16x8 (what ``uaddlp`` computes)."""
    w = tirx.reinterpret(f"{U16}x8", x)
    return (w & _bc(tirx.const(0xFF, U16), 8)) + (w >> _bc(tirx.const(8, U16), 8))


def _weight_popcounts(lay, wpack, wpop):
    """``wpop[o, t]``: the weight's -1 channels at tap ``t`` (what a +1 padding tap mismatches)."""
    nt, q = len(lay.taps), lay.plan.o_regs
    tot = T.alloc_buffer([O_LANES], U16, scope="local")
    with T.parallel(0, lay.oregs) as reg:
        b, r = reg // q, reg % q
        regs = tirx.min(lay.oregs - b * q, q)
        for pos, t in enumerate(lay.tap_order()):
            _store(tot, [], 0, O_LANES, _bc(tirx.const(0, U16), O_LANES))
            with T.serial(0, lay.pairs) as p:
                at = b * lay.wblock + ((p * nt + pos) * regs + r) * 16
                cnt = _uaddlp(tirx.popcount(_load(wpack, [], at, 16)))
                _store(tot, [], 0, O_LANES, _load(tot, [], 0, O_LANES) + cnt)
            for j in range(O_LANES):
                with T.If(reg * O_LANES + j < lay.o):
                    with T.Then():
                        T.buffer_store(wpop, tirx.Cast("int32", tot[j]), [reg * O_LANES + j, t])


class _Walker:
    """Reads of one buffer along a chain of byte offsets.

    On aarch64 through a pointer that each step advances by a register (``step``, read at run
    time so that LLVM cannot fold the chain into offsets from one base: ``ld1r`` has no offset
    form, and a folded chain costs an address add per load); the update folds into the load
    (post-indexed). Elsewhere, plain offsets.
    """

    def __init__(self, lay, buf, start, step):
        self.buf, self.pointer, self.step = buf, lay.aarch64, step
        self.at = T.bind(tirx.address_of(tirx.BufferLoad(buf, [start]))) if self.pointer else start

    def advance(self):
        self.at = T.bind(advance(self.at, self.step)) if self.pointer else self.at + self.step

    def broadcast_word(self, words):
        """The 16-bit word here in all eight lanes, as 16 bytes (``words``: a uint16 view)."""
        if self.pointer:
            v = ld1r16(self.at)
        else:
            v = _bc(tirx.BufferLoad(words, [tirx.floordiv(self.at, 2)]), 8)
        return T.bind(tirx.reinterpret(f"{U8}x16", v))

    def registers(self, count):
        """``count`` consecutive 16-byte registers here (``ld1`` of up to four on aarch64)."""
        if not self.pointer:
            return [T.bind(_load(self.buf, [], self.at + 16 * r, 16)) for r in range(count)]
        regs = []
        while len(regs) < count:
            take = max(k for k in (1, 2, 4) if k <= count - len(regs))
            at = self.at if not regs else T.bind(advance(self.at, 16 * len(regs)))
            if take == 1:
                regs.append(T.bind(_load(T.decl_buffer([16], U8, data=at), [], 0, 16)))
            else:
                v = T.bind(ld1(at, 16 * take))
                regs += [tirx.Shuffle([v], [tirx.IntImm("int32", 16 * r + i) for i in range(16)]) for r in range(take)]
        return regs


def _idx(seq):
    return [tirx.IntImm("int32", i) for i in seq]


def _store_tile(lay, accl, regs, acc, n, p0, o0, lanes):
    """The tile's sums (``accl``: pixel-major, 8 output channels per register) into
    ``acc[n, o, p]``, ``lanes`` pixels (the last tile of a row may hold fewer)."""
    slot = lambda i, r: (i * regs + r) * O_LANES  # noqa: E731
    for r in range(regs):
        if lanes == 4:  # two rounds of zips: channel pairs of 4 pixels
            vecs = [_load(accl, [], slot(i, r), O_LANES) for i in range(4)]
            lo = [tirx.Shuffle([vecs[a], vecs[a + 1]], _idx(x for i in range(h, h + 4) for x in (i, i + 8)))
                  for a in (0, 2) for h in (0, 4)]
            for half in (0, 1):
                for k in (0, 1):
                    both = tirx.Shuffle([lo[half], lo[2 + half]],
                                        _idx(x for j in range(2 * k, 2 * k + 2) for x in (2 * j, 2 * j + 1, 2 * j + 8, 2 * j + 9)))
                    for m in (0, 1):
                        o = o0 + r * O_LANES + 4 * half + 2 * k + m
                        _store(acc, [n, o], p0, 4, tirx.Shuffle([both], _idx(range(4 * m, 4 * m + 4))))
            continue
        for j in range(O_LANES):  # other widths: a strided read of the buffer, lane by lane
            step = regs * O_LANES
            value = tirx.BufferLoad(accl, [tirx.Ramp(slot(0, r) + j, step, lanes) if lanes > 1 else slot(0, r) + j])
            _store(acc, [n, o0 + r * O_LANES + j], p0, lanes, value)


def _pair_steps(lay, bufs, wpack, steps, n, q, y, x0, b, regs, sums):
    """Add one channel-byte pair's steps (all taps) to ``sums`` (None: zero), as SSA values.

    Each tap row's words are broadcast once and serve every pixel and column tap that reads
    them (pixel ``i``, column tap ``dx``: word ``i * sw + dx``).
    """
    abuf, awords, mbuf, mwords = bufs
    nt, P = len(lay.taps), lay.tile
    nw = (P - 1) * lay.sw + lay.kw
    wt = _Walker(lay, wpack, b * lay.wblock + q * (nt * regs * 16), steps[regs])
    base = (n * lay.pairs + q) * lay.plane + y * lay.sh * lay.row + x0 * lay.sw * 2

    def row_words(buf, words, at):
        walk, out = _Walker(lay, buf, at, steps[0]), []
        for k in range(nw):
            out.append(walk.broadcast_word(words))
            if k + 1 < nw:
                walk.advance()
        return out

    sums = [list(s) for s in sums] if sums is not None else [[None] * regs for _ in range(P)]
    for dy in range(lay.kh):
        a = row_words(abuf, awords, base + dy * lay.row)
        m = row_words(mbuf, mwords, base + dy * lay.row) if mbuf is not None else None
        for j, dx in enumerate(rowasm.column_order(lay.sw, lay.kw)):  # the weights' order
            w = wt.registers(regs)
            if dy * lay.kw + j + 1 < nt:
                wt.advance()
            for i in range(P):
                k = i * lay.sw + dx
                for r in range(regs):
                    if lay.aarch64:
                        prev = _bc(tirx.const(0, U16), O_LANES) if sums[i][r] is None else sums[i][r]
                        sums[i][r] = T.bind(count_step(prev, w[r], a[k], None if m is None else m[k]))
                        continue
                    x = w[r] ^ a[k]
                    if m is not None:
                        x = x & m[k]
                    c = _uaddlp(tirx.popcount(x))
                    sums[i][r] = T.bind(c if sums[i][r] is None else sums[i][r] + c)
    return sums


def _asm_pair(lay, abuf, wpack, accl, n, q, y, x0, b, regs):
    """One channel-byte pair's steps on aarch64's fast path: one ``asm`` block per tap row."""
    nt, P = len(lay.taps), lay.tile
    groups = len(rowasm.class_words(P, lay.sw, lay.kw))
    base = (n * lay.pairs + q) * lay.plane + y * lay.sh * lay.row + x0 * lay.sw * 2
    wbase = b * lay.wblock + q * (nt * regs * 16)
    for dy in range(lay.kh):
        at = base + dy * lay.row
        words = [tirx.address_of(tirx.BufferLoad(abuf, [at + 2 * g])) for g in range(groups)]
        wat = tirx.address_of(tirx.BufferLoad(wpack, [wbase + dy * lay.kw * regs * 16]))
        acc0 = tirx.address_of(tirx.BufferLoad(accl, [0]))
        T.evaluate(rowasm.row_step(P, regs, lay.sw, lay.kw, acc0, words, wat, 2 * lay.sw))


def _tile(lay, bufs, wpack, acc, steps, n, y, x0, b, regs, lanes):
    """Mismatch counts of one pixel tile (``P`` pixels of one output row from column ``x0``)
    and output-channel block ``b``: accumulated over all channel pairs, then stored
    (``lanes`` of the pixels: fewer at the end of a row).

    The sums pass between pairs through a small stack buffer (registers, once LLVM promotes
    it). On aarch64's mask-free path each tap row is one ``asm`` block
    (:mod:`.binary_neon_asm`); elsewhere, and on the masked path, vector TIR.
    """
    P = lay.tile
    accl = T.alloc_buffer([P * regs * O_LANES], U16)
    slot = lambda i, r: (i * regs + r) * O_LANES  # noqa: E731
    for k in range(P * regs):
        _store(accl, [], k * O_LANES, O_LANES, _bc(tirx.const(0, U16), O_LANES))
    with T.serial(0, lay.pairs) as q:
        if lay.aarch64 and bufs[2] is None and rowasm.fits(P, regs, lay.sw, lay.kw):
            _asm_pair(lay, bufs[0], wpack, accl, n, q, y, x0, b, regs)
        else:
            old = [[T.bind(_load(accl, [], slot(i, r), O_LANES)) for r in range(regs)] for i in range(P)]
            new = _pair_steps(lay, bufs, wpack, steps, n, q, y, x0, b, regs, old)
            for i in range(P):
                for r in range(regs):
                    _store(accl, [], slot(i, r), O_LANES, new[i][r])
    _store_tile(lay, accl, regs, acc, n, y * lay.ow + x0, b * lay.plan.o_regs * O_LANES, lanes)


def _main_loop(lay, bufs, wpack, acc, konst):
    """Pass 2, parallel over (image, output row, pixel tile of the row, output-channel chunk)."""
    chunks, per = lay.plan.o_chunks, len(lay.blocks) // lay.plan.o_chunks
    q, tpr = lay.plan.o_regs, lay.row_tiles
    with T.parallel(0, lay.n * lay.oh * tpr * chunks) as task:
        ch = task % chunks
        xt = task // chunks % tpr
        y = task // (chunks * tpr) % lay.oh
        n = task // (chunks * tpr * lay.oh)
        # the pointer steps of ``_Walker``: the word step (key 0), the weight step by register
        # count; on aarch64 read at run time (``konst``)
        keys = sorted({0, q, lay.blocks[-1][1] - lay.blocks[-1][0]})
        steps = {k: T.bind(konst[k]) if lay.aarch64 else (16 * k or 2) for k in keys}

        def row_tile(lanes):
            full = [b for b, (r0, r1) in enumerate(lay.blocks) if r1 - r0 == q]
            if full:
                with T.serial(0, per if chunks > 1 else len(full)) as i:
                    b = (ch * per + i) if chunks > 1 else i
                    with T.If(b < len(full)):
                        with T.Then():
                            _tile(lay, bufs, wpack, acc, steps, n, y, xt * lay.tile, b, q, lanes)
            if len(full) < len(lay.blocks):  # a last block of fewer registers
                r0, r1 = lay.blocks[-1]
                with T.If(ch == chunks - 1):
                    with T.Then():
                        _tile(lay, bufs, wpack, acc, steps, n, y, xt * lay.tile, len(lay.blocks) - 1, r1 - r0, lanes)

        if lay.last_lanes == lay.tile:
            row_tile(lay.tile)
        else:
            with T.If(xt == tpr - 1):
                with T.Then():
                    row_tile(lay.last_lanes)
                with T.Else():
                    row_tile(lay.tile)


def _real_sum(lay, mwords, rsum):
    """``R`` of every pixel from the real-bit plane (the masked path)."""
    nt = len(lay.taps)
    tot = T.alloc_buffer([O_LANES], U16, scope="local")
    with T.parallel(0, lay.n * lay.oh) as ny:
        n, y = ny // lay.oh, ny % lay.oh
        for x0, lanes in _chunks(0, lay.ow, O_LANES):
            _store(tot, [], 0, lanes, _bc(tirx.const(0, U16), lanes))
            with T.serial(0, lay.pairs) as q:
                total = None
                for dy, dx in lay.taps:
                    start = ((n * lay.pairs + q) * lay.hp + y * lay.sh + dy) * lay.wp + x0 * lay.sw + dx
                    v = tirx.BufferLoad(mwords, [tirx.Ramp(start, lay.sw, lanes) if lanes > 1 else start])
                    cnt = tirx.popcount(v)
                    total = cnt if total is None else total + cnt
                _store(tot, [], 0, lanes, _load(tot, [], 0, lanes) + total)
            _store(rsum, [n], y * lay.ow + x0, lanes, _load(tot, [], 0, lanes))


def _words(buf, lay):
    return T.decl_buffer([lay.n * lay.pairs * lay.plane // 2], U16, data=buf.data)


def _asm_helpers(lay) -> str:
    """LLVM IR of the ``asm`` row blocks the layer's tiles use."""
    q, last = lay.plan.o_regs, lay.blocks[-1][1] - lay.blocks[-1][0]
    return "".join(rowasm.row_step_ir(lay.tile, r, lay.sw, lay.kw) for r in sorted({q, last})
                   if rowasm.fits(lay.tile, r, lay.sw, lay.kw))


def _kernel_body(lay, mode, ins, outs, with_shift):
    data, wpack = ins[0], ins[1]
    shift = ins[2] if with_shift else None
    acc, rsum = outs
    n_, pairs = lay.n, lay.pairs
    with IRBuilder() as ib, (imported(_asm_helpers(lay)) if lay.aarch64 else nullcontext()):
        with T.seq_scope():
            wpop = T.alloc_buffer([lay.o, len(lay.taps)], "int32")
            abuf = T.alloc_buffer([n_, pairs, lay.hp, lay.row], U8)
            zflag = T.alloc_buffer([n_ * pairs], U8) if mode == "sign" else None
            _weight_popcounts(lay, wpack, wpop)
            konst = None
            if lay.aarch64:  # the walkers' pointer steps, as run-time values
                regs = {lay.plan.o_regs, lay.blocks[-1][1] - lay.blocks[-1][0]}
                konst = T.alloc_buffer([max(regs) + 1], "int32")
                T.buffer_store(konst, tirx.const(2, "int32"), [0])
                for r in regs:
                    T.buffer_store(konst, tirx.const(16 * r, "int32"), [r])
            with T.parallel(0, n_ * pairs) as nq:
                _binarize(lay, mode, data, shift, abuf, zflag, nq // pairs, nq % pairs, "neg")
            flat = T.decl_buffer([n_ * pairs * lay.plane], U8, data=abuf.data)

            def fast():
                _main_loop(lay, (flat, _words(abuf, lay), None, None), wpack, acc, konst)
                correct_padding(lay, wpop, acc, rsum)

            def masked():
                mbuf = T.alloc_buffer([n_, pairs, lay.hp, lay.row], U8)
                with T.parallel(0, n_ * pairs) as nq:
                    _binarize(lay, mode, data, shift, mbuf, None, nq // pairs, nq % pairs, "real")
                mflat = T.decl_buffer([n_ * pairs * lay.plane], U8, data=mbuf.data)
                _real_sum(lay, _words(mbuf, lay), rsum)
                _main_loop(lay, (flat, _words(abuf, lay), mflat, _words(mbuf, lay)), wpack, acc, konst)

            mask_free_or_masked(zflag, n_ * pairs, fast, masked)
    return ib.get()


def binary_conv2d_neon_compute(geom: ConvGeometry, mode: str, plan: NeonBinaryPlan | None = None,
                               shift: bool = False, aarch64: bool = False):
    """Define the NEON dense binary convolution (same parameters and result as the generic one).

    Parameters
    ----------
    geom : ConvGeometry
        A binary convolution whose counts fit 16 bits (:func:`supports`).
    mode : str
        Binarizer rule (``sparks_tvm.reference.BINARIZE_MODES``).
    plan : NeonBinaryPlan, optional
        Tile and blocking (:func:`default_plan` when omitted); the weights must be packed
        for the same plan (:func:`pack_weights`).
    shift : bool
        Take a per-channel float32 ``shift`` added to the activations before binarization.
    aarch64 : bool
        Use AArch64's own instructions (``ld1r``, ``uadalp``, post-indexed loads); else
        portable vector TIR (any LLVM target: how the host tests run it).

    Returns
    -------
    list of te.Tensor
        ``[data, wpack, (shift,) out]``, ``out`` int32 ``(N, O, OH*OW)`` (laid out NCHW by
        :func:`binary_conv2d_neon_primfunc`).
    """
    geom.validate()
    if not supports(geom):
        raise ValueError(f"the NEON binary kernel takes at most {MAX_TAPS} taps and {MAX_COUNT} mismatches "
                         f"per pixel: kernel {geom.kernel}, C*KH*KW = {geom.in_channels * geom.kernel[0] * geom.kernel[1]}")
    plan = plan or default_plan(geom)
    if plan.pixels < 1 or plan.o_regs < 1:
        raise ValueError(f"bad NEON binary plan {plan}")
    lay = _Layout(geom, plan, aarch64)
    shp = int64_shape
    data = te.placeholder(shp(*geom.in_shape), "float32", name="data")
    wpack = te.placeholder(shp(lay.wbytes), U8, name="wpack")
    ins = [data, wpack]
    if shift:
        ins.append(te.placeholder(shp(lay.c), "float32", name="shift"))
    out_shapes = [shp(lay.n, lay.o8, lay.pp), shp(lay.n, lay.pp)]
    acc, rsum = extern("binary_neon", ins, out_shapes, [U16] * 2, ["acc", "rsum"],
                       lambda i, o: _kernel_body(lay, mode, i, o, shift))
    out = te.compute(shp(lay.n, lay.o, lay.pixels),
                     lambda n, o, p: tirx.Cast("int32", rsum[n, p]) - 2 * tirx.Cast("int32", acc[n, o, p]),
                     name="out")
    return ins + [out]


def binary_conv2d_neon_primfunc(geom: ConvGeometry, mode: str, plan: NeonBinaryPlan | None = None,
                                shift: bool = False, aarch64: bool = False):
    """Unscheduled PrimFunc (NCHW output, epilogue-fusable ``out`` block)."""
    func = te.create_prim_func(binary_conv2d_neon_compute(geom, mode, plan, shift, aarch64))
    return nchw_output(func, geom.out_width).with_attr({"tir.noalias": True})
