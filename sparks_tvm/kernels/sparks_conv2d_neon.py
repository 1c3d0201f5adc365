"""The Sparks convolution for 128-bit SIMD CPUs (aarch64 NEON), written as explicit vector TIR.

Same operation, parameters and output as :func:`.sparks_conv2d.sparks_conv2d_compute` (the
readable reference is :func:`sparks_tvm.reference.sparks_conv2d_ref`), with the loop nest fixed
by hand instead of left to a schedule: on NEON the instruction count is the cost, and a TE
formulation plus schedule leaves LLVM too much to guess (masked borders, per-codeword plane
selection, accumulators through memory).

Formulation. For a patch with ``neg`` (taps holding -1) and ``real`` (taps holding a real +-1)
bits and a codeword whose ``-1`` taps are ``code``, let ``u`` be the number of real taps on
which patch and codeword agree (0..9). The response is ``S = 2 * u - popcount(real)``, so

    y[o, p] = sum_c S[c, idx[o, c], p] = 2 * sum_c u[c, idx[o, c], p] - R[p],
    R[p] = sum_c popcount(real[c, p])

and the codeword-dependent part is ``u`` alone: 0..9, so 28 input channels sum in one byte.
Taps 0..7 of a patch are one byte (``n8``, ``m8``), so ``u`` is one byte-lane ``cnt`` plus the
ninth tap's match, which depends on the codeword only through its bit 8: one of two
precomputed planes (``t9[0]``, ``t9[1]``). Stage 1 runs over the codewords sorted by that bit
(two loops), so the plane stays in registers across a loop.

Two paths, chosen per call, as in the dense NEON kernel:

- mask-free (no activation is 0: always for the ``ge``/``gt`` binarizers, checked at run
  time for ONNX ``Sign``): padding reads as +1 and every tap is real, so
  ``u = cnt(n8 ^ agree) + (tap 8 agrees)``, three instructions per codeword and 16 pixels.
  The padding is corrected afterwards (:mod:`.neon_padding`) from ``pop[o, t]``, the
  channels whose codeword is +1 at tap ``t``. Those come from the kernel itself: ten *probe
  lanes* past the last pixel of the last tile get fixed patches (all +1, then each tap alone
  -1) in place of the bounded garbage they would hold, and stage 2 sums them with the pixels
  at no extra gather (:func:`_probe_popcounts`);
- mixed (some activation is 0): the channels that held a 0 mask every match with a second
  plane of real taps, ``u = cnt((n8 ^ agree) & m8) + (tap 8 agrees and is real)``, and add
  its popcount to ``R``; every other channel stays mask-free (a branch per channel and
  chunk), so one zero in a tensor costs one channel's masking, not the whole layer's.

Passes (one call):

1. per call: gather steps ``step[o, c]`` (bytes from the row of ``(c, idx[o, c])`` in a
   stage-1 block to that of ``(c + 1, idx[o, c + 1])``) and the codewords' ``~code & 0xFF``
   bytes and bit-8 order;
2. per input channel: binarize into a padded 0/1 plane of -1 taps (for ``Sign`` also a flag,
   whether it may hold a 0, from the top bytes the sign bits come from: a tiny nonzero value
   may be flagged too, which only sends its channel down the exact masked path), then
   horizontal tap triples (3 bits per output column and padded row; at column stride 2 from
   ``ld2``); the mixed path builds the real-tap plane and its triples of the flagged channels;
3. per pixel chunk: patch planes ``n8`` (and ``m8``) and the ninth tap from three triple rows;
4. per (image, pixel tile, output-channel chunk), a parallel task: for each block of at most
   28 channels, stage 1 writes ``u`` rows of the tile into a task-local block (K rows per
   channel, contiguous pixels), then for each output channel the block's rows are gathered
   (each the previous one plus its step: on aarch64 one post-indexed ``ld1`` per row) and
   summed in byte registers, then widened into the uint16 (int32 past C = 7281) accumulator;
5. ``R`` of every pixel (mask-free channels) and their padded taps out of the accumulator;
6. ``out = 2 * acc - R`` as a TE block named ``out``: the epilogue Relax fuses after the conv
   is inlined into it, then scheduled (``schedules.arm``).

Flattened pixels. As in the generic kernel, output pixels are flattened (``p = oh * OW + ow``)
and padded to a multiple of the tile; at row stride 1 the triple rows are flat too (pixel
``p``'s patch row ``dy`` is triple ``p + dy * OW``), so passes 3-4 run in whole vectors
whatever the width. Pixels past ``OH * OW`` hold bounded garbage (each ``u`` <= 9 lane-wise
whatever bytes the planes hold there) and are never stored; ten of them are the probe lanes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .common import ConvGeometry, int64_shape, nchw_output
from .neon_llvm import imported, table_lanes, table_lookup
from .neon_padding import PaddedTaps, correct_padding, mask_free_or_masked
from .sparks_neon_planes import binarize_rows, patch_rows, triples
from .sparks_neon_rows import first_rows, pack_tap, stage2, store_rows
from .sparks_conv2d import index_bits, idx_dtype, packed_index_shape
from .vector_tir import U8, VECTOR, extern, padded, whole_chunks
from .vector_tir import vt as _vt
from .vector_tir import bc as _bc, load as _load, store as _store, u8 as _u8

#: Channels summed in one byte: u <= 9 per channel, 28 * 9 = 252.
MAX_BLOCK = 28
#: Pixel tiles the default plan chooses from.
TILES = (16, 32, 64, 128)
#: Pixels per stage-1 pass at most (their planes stay in registers across the codewords).
CHUNK = 128
#: Stage-1 rows of a pixel tile kept for stage 2 at once at most (well inside the Pi 4's 1 MB L2).
STAGE1_BYTES = 256 * 1024
#: Probe lanes past the last pixel (mask-free path): all +1, then tap t alone -1, t = 0..8.
VIRTUAL = 10


def accumulator_dtype(in_channels: int) -> str:
    """Narrowest accumulator of ``sum_c u`` (u <= 9) that cannot overflow."""
    return "uint16" if 9 * in_channels <= 65535 else "int32"


@dataclass(frozen=True)
class NeonSparksPlan:
    """Static choices of one layer's kernel.

    Attributes
    ----------
    tile : int
        Pixels per task and per gathered row (a multiple of 16).
    chunk : int
        Pixels per stage-1 pass (divides ``tile``): its planes stay in registers across the
        codeword loop.
    block : int
        Input channels per stage-1 block (<= 28: one byte sum).
    o_chunks : int
        Output-channel chunks per pixel tile, run as separate parallel tasks (divides O).
    """

    tile: int
    chunk: int
    block: int
    o_chunks: int = 1


def default_plan(geom: ConvGeometry, num_codewords: int, cores: int = 1) -> NeonSparksPlan:
    """Tile with the least padding waste and the fewest per-row overheads; balanced channel blocks.

    A gathered row of T pixels costs about ``1.5 + T / 32 + T / 16`` instructions (offset,
    address, paired loads, adds), so longer rows are cheaper per pixel, while padded pixels
    past ``OH * OW`` are wasted work: the tile minimizes the row cost times the padded pixel
    count. Tiles and chunks are powers of two (16..128): LLVM legalizes other vector lengths
    (48, 96 lanes) into much longer code.
    """
    pixels = geom.out_height * geom.out_width
    tile = min(TILES, key=lambda t: (padded_pixels(pixels, t, min(t, CHUNK)) * (1.5 + t / 32 + t / 16) / t, -t))
    chunk = min(tile, CHUNK)
    bits = index_bits(num_codewords)
    per = 8 // bits if bits < 8 else 1  # a block starts on a packed index byte
    nblk = -(-geom.in_channels // MAX_BLOCK)
    block = min(MAX_BLOCK // per * per, -(-(-(-geom.in_channels // nblk)) // per) * per)
    tiles = geom.batch * padded_pixels(pixels, tile, chunk) // tile
    o_chunks = 1
    if cores > 1 and tiles < 2 * cores:
        want = -(-2 * cores // tiles)
        o_chunks = max(d for d in range(1, min(want, geom.out_channels) + 1) if geom.out_channels % d == 0)
    return NeonSparksPlan(tile, chunk, block, o_chunks)


def virtual_base(pixels: int, pp: int, chunk: int):
    """First of the :data:`VIRTUAL` probe lanes: past the pixels, inside one stage-1 chunk."""
    for v in range(pixels, pp - VIRTUAL + 1):
        if v // chunk == (v + VIRTUAL - 1) // chunk:
            return v
    return None


def padded_pixels(pixels: int, tile: int, chunk: int) -> int:
    """Pixels per image in whole tiles, with room for the probe lanes."""
    pp = padded(pixels + VIRTUAL, tile)
    return pp if virtual_base(pixels, pp, chunk) is not None else pp + tile


class _Layout(PaddedTaps):
    """Derived sizes of one layer (kept apart from the builder functions for readability)."""

    def __init__(self, geom: ConvGeometry, num_codewords: int, plan: NeonSparksPlan, aarch64: bool = False):
        self.geom, self.k, self.plan, self.aarch64 = geom, num_codewords, plan, aarch64
        self.n, self.c, self.h, self.w = geom.in_shape
        self.o = geom.out_channels
        self.kh, self.kw = 3, 3
        self.oh, self.ow = geom.out_height, geom.out_width
        self.sh, self.sw = geom.stride
        self.pt, self.pl, self.pb, self.pr = geom.padding
        self.pixels = self.oh * self.ow
        self.pp = padded_pixels(self.pixels, plan.tile, plan.chunk)
        self.tiles = self.pp // plan.tile
        # Probe lanes (mask-free path): in the last tile's chunk ``vchunk``, lanes ``vlane ..``.
        vbase = virtual_base(self.pixels, self.pp, plan.chunk) - (self.tiles - 1) * plan.tile
        self.vchunk, self.vlane = divmod(vbase, plan.chunk)
        self.vbase = (self.tiles - 1) * plan.tile + vbase
        self.last_used = vbase + VIRTUAL  # lanes of the last tile ever read (pixels, probes)
        self.flat = self.sh == 1
        hp = self.h + self.pt + self.pb
        # Flat triple rows are read up to pixel PP - 1 + 2 * OW: rows past the image are padding.
        self.rows = max(hp, -(-self.pp // self.ow) + 2) if self.flat else hp
        self.binrows = self.rows if self.flat else hp
        cols = max(self.w + self.pl + self.pr, self.sw * (self.ow - 1) + 3)
        self.cols = cols + cols % 2  # even: rows start on a 16-bit boundary (stride-2 triples)
        # Triples of rows narrower than 8 output columns are written 8 at a time: a spare
        # plane row for their reads, a spare vector after each channel's flat triples.
        self.narrow = 4 <= self.ow < 8
        self.spare_row = int(self.sw == 2 or self.narrow)
        self.tstride = self.rows * self.ow + (VECTOR if self.narrow else 0)  # flat triples per channel
        nblk = -(-self.c // plan.block)
        self.blocks = [(b * plan.block, min(self.c, (b + 1) * plan.block)) for b in range(nblk)]
        self.acc = accumulator_dtype(self.c)
        # Nibble rows: byte j of a chunk's row holds ``u`` of pixels j and j + chunk / 2.
        self.packed = plan.chunk >= 2 * VECTOR
        self.rowb = plan.tile // 2 if self.packed else plan.tile  # bytes per stage-1 row
        self.bits = index_bits(num_codewords)
        self.per = 8 // self.bits if self.bits < 8 else 1  # index fields per packed byte
        if plan.block % self.per:
            raise ValueError(f"channel block {plan.block} must be a multiple of {self.per} (indices per byte)")


def _prepare_codewords(lay, codes, idx, step, agree, rank, count0):
    """Pass 1: gather steps, codeword bytes, codewords ordered by bit 8 (``count0`` with 0)."""
    k_, bits, per = lay.k, lay.bits, lay.per
    # Codewords sorted by bit 8 (those with it clear first, ``count0[0]`` of them): slot j
    # holds the codeword's ``~code & 0xFF`` byte, and stage 1 writes it as a channel's row j
    # (in order: its stores walk the rows); ``rank[k]`` is codeword k's slot.
    T.buffer_store(count0, tirx.const(0, "int32"), [0])
    for bit in (0, 1):
        if bit == 1:
            T.buffer_store(count0, count0[0], [1])
        slot = 0 if bit == 0 else 1
        with T.serial(0, k_) as k:
            with T.If(((codes[k] >> 8) & 1) == bit):
                with T.Then():
                    T.buffer_store(agree, tirx.Cast(U8, codes[k]) ^ _u8(0xFF), [count0[slot]])
                    T.buffer_store(rank, tirx.Cast(rank.dtype, count0[slot]), [k])
                    T.buffer_store(count0, count0[slot] + 1, [slot])
    # step[o, f, q], channel c = q * per + f: bytes from the row of (c, idx[o, c]) in a
    # stage-1 block to that of the next channel of the same field, c + per: (per * K +
    # rank[idx[o, c + per]] - rank[idx[o, c]]) rows (1 .. (per + 1) K - 1: uint16 lanes). Stage 2 walks
    # a block's channels field by field (consecutive steps are adjacent: their loads pair).
    # Whole vectors over each output's row of bytes, the last overlapping; a row's last step
    # leads out of every block and is not stored.
    u16, nq = "uint16", -(-lay.c // per)

    def const(value, lanes, dtype=u16):
        return _bc(tirx.const(value, dtype), lanes)

    def field(packed, f, lanes):
        kk = packed if bits >= 8 else (packed >> _bc(_u8(f * bits), lanes)) & _bc(_u8((1 << bits) - 1), lanes)
        # floormod keeps any stored value (a tuning runner's random bytes) in [0, K).
        kk = tirx.floormod(kk, _bc(tirx.const(k_, idx.dtype), lanes))
        return tirx.Cast(_vt(u16, lanes), table_lookup(rank, k_, kk, lanes, lay.aarch64))

    if nq > 1:
        with T.parallel(0, lay.o) as o:
            for s, lanes in whole_chunks(0, nq - 1):
                here, after = _load(idx, [o], s, lanes), _load(idx, [o], s + 1, lanes)
                for f in range(per):
                    rows_ = const(per * k_, lanes) + field(after, f, lanes) - field(here, f, lanes)
                    _store(step, [o, f], s, lanes,
                           tirx.Cast(_vt("int32", lanes), rows_) * const(lay.rowb, lanes, "int32"))
def _block_stage1_mixed(lay, tneg, treal, zflag, agree, count0, s1, s1_base, rsum, rpre, n, p0, c0, c1,
                        probes):
    """Stage 1 of one channel block and pixel tile when some channel of the call held a 0.

    Each channel takes the mask-free formula unless it held a 0 (``zflag``); those channels
    mask every match with their real taps, ``u = cnt((n8 ^ agree) & m8) + (tap 8 agrees and
    is real)``, and add their real taps to ``R`` (``rsum``, zeroed before the call). Their
    probe lanes are masked out: ``u = 0`` there, so they add nothing to the padding counts
    the probes give, which then count the mask-free channels only.
    """
    tile, chunk, k_ = lay.plan.tile, lay.plan.chunk, lay.k
    L = chunk
    three, six, two, one = _bc(_u8(3), L), _bc(_u8(6), L), _bc(_u8(2), L), _bc(_u8(1), L)
    with T.serial(c0, c1) as c:
        masked_channel = zflag[n * lay.c + c] != _u8(0)
        for sc in range(tile // chunk):
            start = p0 + sc * chunk
            base = s1_base + (c - c0) * k_ * lay.rowb + sc * (chunk // 2 if lay.packed else chunk)
            t = patch_rows(lay, tneg, n, c, start, L)
            with_probes = probes is not None and sc == lay.vchunk
            with T.If(masked_channel):
                with T.Then():
                    q = patch_rows(lay, treal, n, c, start, L)
                    nv = T.bind(t[0] | (t[1] << three) | (t[2] << six))
                    mv = q[0] | (q[1] << three) | (q[2] << six)
                    q9 = q[2]
                    if with_probes:
                        keep = _load(probes[0], [], 0, L)
                        mv, q9 = mv & keep, q9 & keep
                    mv, q9 = T.bind(mv), T.bind(q9)
                    real = tirx.Cast(f"{lay.acc}x{L}", tirx.popcount(mv) + (q9 >> two))
                    _store(rsum, rpre, start, L, _load(rsum, rpre, start, L) + real)
                    # Tap 8 agrees with a codeword whose bit 8 is b when real and (neg == b).
                    tap9 = ((q9 & ~t[2]) >> two, (q9 & t[2]) >> two)
                    split = T.bind(count0[0])  # a register: the row stores could alias count0
                    for b, (lo, hi) in enumerate(((0, split), (split, k_))):
                        store_rows(lay, s1, base, lo, hi, lambda j: tirx.popcount((nv ^ _bc(agree[j], L)) & mv),
                                   pack_tap(lay, tap9[b]))
                with T.Else():
                    _fast_chunk(lay, t, agree, count0, s1, base, probes if with_probes else None)


def _fast_chunk(lay, t, agree, count0, s1, base, probes):
    """The mask-free ``u`` rows of one channel and pixel chunk (``probes``: the probe chunk)."""
    L, k_ = lay.plan.chunk, lay.k
    three, six, two, one = _bc(_u8(3), L), _bc(_u8(6), L), _bc(_u8(2), L), _bc(_u8(1), L)
    nv = t[0] | (t[1] << three) | (t[2] << six)
    n9 = t[2] >> two
    if probes is not None:
        keep, p8, p9 = (_load(b, [], 0, L) for b in probes)
        nv, n9 = (nv & keep) | p8, (n9 & keep) | p9
    nv, n9 = T.bind(nv), T.bind(n9)
    # Tap 8 agrees with a codeword whose bit 8 (its -1) is b when neg == b.
    split = T.bind(count0[0])  # a register: the row stores could alias count0
    for b, (lo, hi) in enumerate(((0, split), (split, k_))):
        store_rows(lay, s1, base, lo, hi, lambda j: tirx.popcount(nv ^ _bc(agree[j], L)),
                   pack_tap(lay, n9 ^ one if b == 0 else n9))


def _block_stage1_fast(lay, tneg, agree, count0, s1, s1_base, n, p0, c0, c1, probes):
    """Stage 1 of one channel block and pixel tile, mask-free path (no activation is 0).

    Padding reads as +1 and every tap is real, so ``u = cnt(n8 ^ agree) + (tap 8 agrees)``.
    With ``probes`` (the last tile), chunk ``vchunk`` carries the probe lanes' fixed patches
    in place of pixels past the image: their sums give the padding correction.
    """
    tile, chunk, k_ = lay.plan.tile, lay.plan.chunk, lay.k
    with T.serial(c0, c1) as c:
        for sc in range(tile // chunk):
            t = patch_rows(lay, tneg, n, c, p0 + sc * chunk, chunk)
            base = s1_base + (c - c0) * k_ * lay.rowb + sc * (chunk // 2 if lay.packed else chunk)
            _fast_chunk(lay, t, agree, count0, s1, base, probes if sc == lay.vchunk else None)


def _probe_patterns(lay, probes):
    """The probe lanes of chunk ``vchunk``: lane ``vlane`` all +1, lane ``vlane + 1 + t`` tap t -1."""
    keep, p8, p9 = probes
    L = lay.plan.chunk
    _store(keep, [], 0, L, _bc(_u8(0xFF), L))
    _store(p8, [], 0, L, _bc(_u8(0), L))
    _store(p9, [], 0, L, _bc(_u8(0), L))
    for i in range(VIRTUAL):
        T.buffer_store(keep, _u8(0), [lay.vlane + i])
    for t in range(8):
        T.buffer_store(p8, _u8(1 << t), [lay.vlane + 1 + t])
    T.buffer_store(p9, _u8(1), [lay.vlane + 9])


def _probe_popcounts(lay, acc, pop, channels=None):
    """``pop[o, t]``: channels whose codeword is +1 at tap t (what a +1 padding tap matches).

    A probe differing from the all-+1 probe in tap t alone changes each channel's ``u`` by
    ``1 - 2 [codeword +1 at t]``, so its sum differs by ``C - 2 pop[o, t]``. With
    ``channels`` (``channels(n)``: the mask-free channels of image n, the others add 0 to every
    probe) ``pop[n, o, t]`` counts those of each image.
    """
    images = 1 if channels is None else lay.n
    with T.parallel(0, images * lay.o) as no:
        n, o = no // lay.o, no % lay.o
        base = tirx.Cast("int32", acc[n, o, lay.vbase])
        for t in range(9):
            diff = tirx.Cast("int32", acc[n, o, lay.vbase + 1 + t]) - base
            if channels is None:
                T.buffer_store(pop, (lay.c - diff) // 2, [o, t])
            else:
                T.buffer_store(pop, (channels(n) - diff) // 2, [n, o, t])


def _tasks_by_tile(lay, stage1, gather, acc):
    """Pass 4, one parallel task per (image, pixel tile): stage 1, then stage 2.

    ``stage1(s1, s1_base, n, p0, block, c0, c1, rsum_at, last)`` writes a block's rows. When
    every block's rows fit :data:`STAGE1_BYTES`, stage 1 of all blocks comes first and stage 2
    keeps each output's sum in registers across them; otherwise block by block.
    """
    plan, k_ = lay.plan, lay.k
    rows_b = plan.block * k_ * lay.rowb
    whole = len(lay.blocks) * rows_b <= STAGE1_BYTES
    with T.parallel(0, lay.n * lay.tiles) as task:
        n, p0 = task // lay.tiles, task % lay.tiles * plan.tile
        last = task % lay.tiles == lay.tiles - 1
        s1 = [T.alloc_buffer([rows_b], U8) for _ in (lay.blocks if whole else lay.blocks[:1])]
        for i, (c0, c1) in enumerate(lay.blocks):
            stage1(s1[i if whole else 0], 0, n, p0, i, c0, c1, [n], last)
            if not whole:
                stage2(lay, [(s1[0], 0, c0, c1)], gather, acc, n, 0, lay.o, p0, i == 0, last)
        if whole:
            stage2(lay, [(s1[i], 0, c0, c1) for i, (c0, c1) in enumerate(lay.blocks)], gather, acc, n, 0, lay.o, p0,
                   True, last)


def _tasks_by_output_chunk(lay, stage1, gather, acc, rsum, masked):
    """Pass 4 for layers of few pixel tiles (7x7): parallel over output-channel chunks.

    Stage 1 of every block first (parallel over blocks, into one buffer for the whole call),
    then stage 2 per (tile, output-channel chunk): no task recomputes another's stage 1.
    """
    plan, k_, n_ = lay.plan, lay.k, lay.n
    nb, rows_b = len(lay.blocks), plan.block * k_ * lay.rowb
    # One buffer per channel block: a row's address is then a register plus the gather
    # offset, and its loads pair (a block's constant base would not fit ``ldp``'s offset).
    s1 = [T.alloc_buffer([n_ * lay.tiles * rows_b], U8) for _ in range(nb)]
    rpart = T.alloc_buffer([n_, nb, lay.pp], lay.acc) if masked else None
    if masked:  # stage 1 adds the real taps of the channels that held a 0
        with T.serial(0, n_ * nb) as nb_:
            with T.serial(0, lay.pp // VECTOR) as q:
                _store(rpart, [nb_ // nb, nb_ % nb], q * VECTOR, VECTOR, _bc(tirx.const(0, lay.acc), VECTOR))
    with T.parallel(0, n_ * lay.tiles * nb) as task:
        n, t, b = task // (lay.tiles * nb), task // nb % lay.tiles, task % nb
        for i, (c0, c1) in enumerate(lay.blocks):
            with T.If(b == i):
                with T.Then():
                    stage1(s1[i], task // nb * rows_b, n, t * plan.tile, i, c0, c1, [n, i], t == lay.tiles - 1,
                           rpart)
    chunk_o = lay.o // plan.o_chunks
    with T.parallel(0, n_ * lay.tiles * plan.o_chunks) as task:
        n, t, oc = task // (lay.tiles * plan.o_chunks), task // plan.o_chunks % lay.tiles, task % plan.o_chunks
        blocks = [(s1[i], (n * lay.tiles + t) * rows_b, c0, c1) for i, (c0, c1) in enumerate(lay.blocks)]
        stage2(lay, blocks, gather, acc, n, oc * chunk_o, chunk_o, t * plan.tile, True, t == lay.tiles - 1)
    if masked:
        with T.parallel(0, n_) as n:
            with T.serial(0, lay.pp // VECTOR) as q:
                total = _load(rpart, [n, 0], q * VECTOR, VECTOR)
                for i in range(1, nb):
                    total = total + _load(rpart, [n, i], q * VECTOR, VECTOR)
                _store(rsum, [n], q * VECTOR, VECTOR, total)


def _pass4(lay, stage1, gather, acc, rsum, masked):
    if lay.plan.o_chunks == 1:
        _tasks_by_tile(lay, lambda *a: stage1(*a, rsum), gather, acc)
    else:
        _tasks_by_output_chunk(lay, stage1, gather, acc, rsum, masked)


def _kernel_body(lay, mode, ins, outs, with_shift):
    data, codes, idx = ins[0], ins[1], ins[2]
    shift = ins[3] if with_shift else None
    acc, rsum = outs
    n_, c_, k_, plan = lay.n, lay.c, lay.k, lay.plan
    tshape = [n_, c_, lay.tstride] if lay.flat else [n_, c_, 3, lay.pp]
    # A spare row at column stride 2 (the last row's ``ld2`` of the next pair reads past it)
    # and for narrow rows (:attr:`_Layout.narrow`).
    pshape = [n_, c_, lay.binrows + lay.spare_row, lay.cols]
    with IRBuilder() as ib, (imported() if lay.aarch64 else nullcontext()):
        with T.seq_scope():
            step = T.alloc_buffer([lay.o, lay.per, -(-c_ // lay.per)], "int32")
            agree = T.alloc_buffer([k_], U8)
            rank = T.alloc_buffer([table_lanes(k_)], "uint8" if k_ <= 256 else "uint16")
            starts = T.alloc_buffer([lay.o, len(lay.blocks) * lay.per], "int32") if lay.n * lay.tiles > 1 else None
            gather = (step, idx, rank, starts)
            count0 = T.alloc_buffer([2], "int32")
            neg = T.alloc_buffer(pshape, U8)
            tneg = T.alloc_buffer(tshape, U8)
            zflag = T.alloc_buffer([n_ * c_], U8) if mode == "sign" else None
            real = T.alloc_buffer(pshape, U8) if mode == "sign" else None
            _prepare_codewords(lay, codes, idx, step, agree, rank, count0)
            if starts is not None:
                first_rows(lay, idx, rank, starts)
            with T.parallel(0, n_ * c_) as nc:
                binarize_rows(lay, mode, data, shift, {"neg": neg}, zflag, nc // c_, nc % c_)
                triples(lay, [(neg, tneg)], nc // c_, nc % c_)

            def fast():
                probes = [T.alloc_buffer([plan.chunk], U8) for _ in range(3)]
                pop = T.alloc_buffer([lay.o, 9], "int32")
                _probe_patterns(lay, probes)

                def stage1(s1, base, n, p0, i, c0, c1, rpre, last, rsum_buf):
                    with T.If(last):
                        with T.Then():
                            _block_stage1_fast(lay, tneg, agree, count0, s1, base, n, p0, c0, c1, probes)
                        with T.Else():
                            _block_stage1_fast(lay, tneg, agree, count0, s1, base, n, p0, c0, c1, None)

                _pass4(lay, stage1, gather, acc, rsum, masked=False)
                _probe_popcounts(lay, acc, pop)
                correct_padding(lay, pop, acc, rsum)

            def mixed():
                # Some channel held a 0: those channels take the masked formula, the rest
                # stay mask-free (their padding corrected as in fast(), per image).
                treal = T.alloc_buffer(tshape, U8)
                with T.parallel(0, n_ * c_) as nc:
                    with T.If(zflag[nc] != _u8(0)):
                        with T.Then():
                            binarize_rows(lay, mode, data, shift, {"real": real}, None, nc // c_, nc % c_)
                            triples(lay, [(real, treal)], nc // c_, nc % c_)
                probes = [T.alloc_buffer([plan.chunk], U8) for _ in range(3)]
                pop = T.alloc_buffer([n_, lay.o, 9], "int32")
                free = T.alloc_buffer([n_], "int32")
                _probe_patterns(lay, probes)
                with T.serial(0, n_) as n:
                    T.buffer_store(free, tirx.const(c_, "int32"), [n])
                    with T.serial(0, c_) as c:
                        T.buffer_store(free, free[n] - tirx.Cast("int32", zflag[n * c_ + c]), [n])
                    if plan.o_chunks == 1:  # whole vectors (a pp-lane vector overflows its lane count)
                        with T.serial(0, lay.pp // VECTOR) as q:
                            _store(rsum, [n], q * VECTOR, VECTOR, _bc(tirx.const(0, lay.acc), VECTOR))

                def stage1(s1, base, n, p0, i, c0, c1, rpre, last, rsum_buf):
                    with T.If(last):
                        with T.Then():
                            _block_stage1_mixed(lay, tneg, treal, zflag, agree, count0, s1, base, rsum_buf,
                                                rpre, n, p0, c0, c1, probes)
                        with T.Else():
                            _block_stage1_mixed(lay, tneg, treal, zflag, agree, count0, s1, base, rsum_buf,
                                                rpre, n, p0, c0, c1, None)

                _pass4(lay, stage1, gather, acc, rsum, masked=True)
                _probe_popcounts(lay, acc, pop, lambda n: free[n])
                correct_padding(lay, pop, acc, rsum, lambda n: free[n])

            mask_free_or_masked(zflag, n_ * c_, fast, mixed)
    return ib.get()


def sparks_conv2d_neon_compute(geom: ConvGeometry, num_codewords: int, mode: str, plan: NeonSparksPlan | None = None,
                               shift: bool = False, aarch64: bool = False):
    """Define the NEON Sparks convolution (same parameters and result as the generic kernel).

    Parameters
    ----------
    geom : ConvGeometry
        A 3x3 binary convolution.
    num_codewords : int
        K.
    mode : str
        Binarizer rule (``sparks_tvm.reference.BINARIZE_MODES``).
    plan : NeonSparksPlan, optional
        Tile and blocking (:func:`default_plan` when omitted).
    shift : bool
        Take a per-channel float32 ``shift`` added to the activations before binarization.
    aarch64 : bool
        Use AArch64 intrinsics where LLVM misses the instruction (``sli``); False keeps the
        kernel buildable for any LLVM target.

    Returns
    -------
    list of te.Tensor
        ``[data, codes, idx, (shift,) out]``, ``out`` int32 ``(N, O, OH*OW)`` (laid out NCHW by
        :func:`sparks_conv2d_neon_primfunc`).
    """
    geom.validate()
    if tuple(geom.kernel) != (3, 3):
        raise ValueError(f"the Sparks op needs 3x3 kernels, got {geom.kernel}")
    plan = plan or default_plan(geom, num_codewords)
    if plan.tile % VECTOR or plan.tile % plan.chunk or plan.chunk % VECTOR:
        raise ValueError(f"tile and chunk must be multiples of {VECTOR}, chunk dividing tile: {plan}")
    if not 1 <= plan.block <= MAX_BLOCK or geom.out_channels % plan.o_chunks:
        raise ValueError(f"channel block must be in [1, {MAX_BLOCK}] and o_chunks divide O: {plan}")
    lay = _Layout(geom, num_codewords, plan, aarch64)
    shp = int64_shape
    data = te.placeholder(shp(*geom.in_shape), "float32", name="data")
    codes = te.placeholder(shp(num_codewords), "int32", name="codes")
    idx = te.placeholder(shp(*packed_index_shape(lay.o, lay.c, num_codewords)), idx_dtype(num_codewords), name="idx")
    ins = [data, codes, idx]
    if shift:
        ins.append(te.placeholder(shp(lay.c), "float32", name="shift"))
    out_shapes = [shp(lay.n, lay.o, lay.pp), shp(lay.n, lay.pp)]
    acc, rsum = extern("sparks_neon", ins, out_shapes, [lay.acc] * 2, ["acc", "rsum"],
                       lambda i, o: _kernel_body(lay, mode, i, o, shift))
    out = te.compute(shp(lay.n, lay.o, lay.pixels),
                     lambda n, o, p: 2 * tirx.Cast("int32", acc[n, o, p]) - tirx.Cast("int32", rsum[n, p]),
                     name="out")
    return ins + [out]


def sparks_conv2d_neon_primfunc(geom: ConvGeometry, num_codewords: int, mode: str,
                                plan: NeonSparksPlan | None = None, shift: bool = False, aarch64: bool = False):
    """Unscheduled PrimFunc (NCHW output, epilogue-fusable ``out`` block)."""
    func = te.create_prim_func(sparks_conv2d_neon_compute(geom, num_codewords, mode, plan, shift, aarch64))
    return nchw_output(func, geom.out_width).with_attr({"tir.noalias": True})
