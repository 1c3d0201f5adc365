"""Dense binary convolution for 128-bit SIMD CPUs (aarch64 NEON), written as explicit vector TIR.

Same operation, parameters and output as :func:`.binary_conv2d.binary_conv2d_compute` (the
readable reference is :func:`sparks_tvm.reference.binary_conv2d_ref`). On NEON the instruction
count is the cost; this kernel is a register-tiled XOR-popcount (BGEMM-style) micro-kernel.

Formulation. Eight input channels are one byte: bit ``j`` of byte ``cb`` is channel
``8 * cb + j`` holding -1. A *step* is one (channel byte, tap) pair. For output channel ``o``
and a vector of 16 output pixels, one step is ``cnt(act ^ dup(w))``: 16 pixels x 8 channels of
mismatches in three instructions (``eor``, ``cnt``, ``add``), the activation vector loaded
once for ``Q`` output channels and the weight byte broadcast once for ``P`` pixel vectors
(a ``P x Q`` tile of byte accumulators in registers). ``cnt`` is at most 8 per byte lane, so
at most 31 steps add up in bytes before they are widened into the uint16 accumulator.

Then ``y = R - 2 * mismatches``, ``R`` the number of real (non-zero, inside the image) taps
of the pixel. Two paths, chosen per call:

- no activation is 0 (always for the ``ge``/``gt`` binarizers; checked at run time for ONNX
  ``Sign``): padding is encoded as +1 (bit 0), which mismatches the weight's -1 taps; those
  are subtracted afterwards, per output channel and border class, from the weights' popcounts
  (``wpop``), and ``R = C * real taps``;
- some activation is 0: a second plane of real bits masks every step
  (``cnt((act ^ dup(w)) & real)``) and ``R`` is its popcount.

Layout. Output pixels are flattened (``p = oh * OW + ow``) and padded to the tile, as in the
Sparks kernels. The binarized, bit-packed input is copied once per column tap ``dx`` (and row
phase at row stride > 1) into planes of pitch ``OW``, so that tap ``(dy, dx)`` of pixel ``p``
is element ``p + (dy // sh) * OW`` of plane ``(dy % sh, dx)``: every step is a whole-vector
load whatever the width, stride or border.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .common import ConvGeometry, int64_shape, nchw_output
from .encoding import num_words
from .neon_padding import PaddedTaps, correct_padding, mask_free_or_masked
from .vector_tir import U8, VECTOR, extern, padded, ramp as _ramp, top_bytes, zero_evidence
from .vector_tir import bc as _bc, chunks as _chunks, load as _load, store as _store, u8 as _u8, vt as _vt

#: Pixels binarized per vector step (8 float32 registers per channel byte at most).
BINARIZE_LANES = 16
#: Steps summed in one byte lane: cnt <= 8, 31 * 8 = 248.
MAX_STEPS = 31
#: Relative cost per pixel of a P x 4 tile, by P (emulated Pi, 64->128 stride 2 at 28x28:
#: P = 1 reloads the weight lanes for half the pixels; 784 pixels as 800 at P = 2 cost 5% less).
STEP_COST = {1: 1.0, 2: 0.8}


@dataclass(frozen=True)
class NeonBinaryPlan:
    """Static choices of one layer's kernel.

    Attributes
    ----------
    vectors : int
        ``P``: 16-pixel vectors per tile (a task's pixels: ``16 * P``).
    o_block : int
        ``Q``: output channels sharing each loaded activation vector.
    o_chunks : int
        Output-channel chunks run as separate parallel tasks (for layers of few pixel tiles).
    """

    vectors: int = 2
    o_block: int = 4
    o_chunks: int = 1


def supports(geom: ConvGeometry) -> bool:
    """Whether the kernel handles ``geom`` (one byte block must hold all the taps of a byte)."""
    return geom.kernel[0] * geom.kernel[1] <= MAX_STEPS


def default_plan(geom: ConvGeometry, cores: int = 1) -> NeonBinaryPlan:
    """The fewest padded pixels weighted by the tile's cost per pixel, and enough tasks for ``cores``."""
    pixels = geom.out_height * geom.out_width
    # 2 x 4 tiles: 34 instructions per 8 vector-steps; 4 x 4 would be 3.5 per step but its 16
    # byte accumulators, 4 activation and weight vectors spill on 32 registers. A 1 x 4 tile
    # is worth 2% fewer pixels only when it saves more than STEP_COST's 20% (28x28 keeps 2).
    vectors = min((2, 1), key=lambda v: padded(pixels, VECTOR * v) * STEP_COST[v])
    q = 4 if geom.out_channels >= 4 else geom.out_channels
    tiles = geom.batch * padded(pixels, VECTOR * vectors) // (VECTOR * vectors)
    blocks = -(-geom.out_channels // q)
    o_chunks = 1
    if cores > 1 and tiles < 2 * cores:
        want = -(-2 * cores // tiles)
        o_chunks = max(d for d in range(1, min(want, blocks) + 1) if blocks % d == 0)
    return NeonBinaryPlan(vectors, q, o_chunks)


def accumulator_dtype(geom: ConvGeometry) -> str:
    """Narrowest accumulator of the mismatch count (at most ``C * KH * KW``)."""
    return "uint16" if geom.in_channels * geom.kernel[0] * geom.kernel[1] <= 65535 else "int32"


class _Layout(PaddedTaps):
    """Derived sizes of one layer."""

    def __init__(self, geom: ConvGeometry, plan: NeonBinaryPlan):
        self.geom, self.plan = geom, plan
        self.n, self.c, self.h, self.w = geom.in_shape
        self.o = geom.out_channels
        self.kh, self.kw = geom.kernel
        self.oh, self.ow = geom.out_height, geom.out_width
        self.sh, self.sw = geom.stride
        self.pt, self.pl, self.pb, self.pr = geom.padding
        self.cb = -(-self.c // 8)
        self.cw = -(-self.c // 32)
        self.hp = self.h + self.pt + self.pb
        self.wp = max(self.w + self.pl + self.pr, self.sw * (self.ow - 1) + self.kw)
        self.tile = VECTOR * plan.vectors
        self.pixels = self.oh * self.ow
        self.pp = padded(self.pixels, self.tile)
        self.tiles = self.pp // self.tile
        # Plane rows read: pixel rows of the padded pixel count plus the taps' row offsets.
        self.prow = -(-self.pp // self.ow) + (self.kh - 1) // self.sh
        self.phases = min(self.sh, self.kh)
        self.acc = accumulator_dtype(geom)
        q = plan.o_block
        self.oblocks = [(b * q, min(self.o, (b + 1) * q)) for b in range(-(-self.o // q))]
        if len(self.oblocks) % plan.o_chunks:
            raise ValueError(f"o_chunks {plan.o_chunks} must divide the {len(self.oblocks)} output blocks")

    def tap_plane(self, dy, dx):
        """(row phase, column tap, pixel offset) of tap (dy, dx) in the shifted planes."""
        return dy % self.sh, dx, (dy // self.sh) * self.ow


def _weight_popcounts(lay, wbits, wpop):
    """``wpop[o, t]``: the weight's -1 channels at tap ``t`` (what a +1 padding tap mismatches).

    The packed words carry 0 in pad channels (:func:`.encoding.pack_binary_weights`).
    """
    nt = len(lay.taps)
    words = T.decl_buffer([lay.o * lay.cw * nt], "uint32", data=wbits.data)
    with T.parallel(0, lay.o) as o:
        total = None
        for cw in range(lay.cw):
            bits = tirx.Cast(_vt("int32", nt), tirx.popcount(_load(words, [], (o * lay.cw + cw) * nt, nt)))
            total = bits if total is None else total + bits
        _store(wpop, [o], 0, nt, total)


def _byte(lay, mode, data, shift, n, cb, y, x, lanes, plane):
    """Bit-packed byte of channels ``8cb .. 8cb + 7`` at input row ``y``, columns ``x ..``."""
    f0 = tirx.const(0.0, "float32")
    acc, zero = None, None
    for j in range(min(8, lay.c)):
        ch = cb * 8 + j
        v = _load(data, [n, tirx.min(ch, lay.c - 1), y], x, lanes)
        if shift is not None:
            v = v + _bc(shift[tirx.min(ch, lay.c - 1)], lanes)
        if plane == "real":
            bit = v != _bc(f0, lanes)
        else:
            bit = v <= _bc(f0, lanes) if mode == "gt" else v < _bc(f0, lanes)
        b = tirx.Cast(_vt("uint8", lanes), bit)
        if lay.c % 8:  # the last byte has fewer channels
            b = b & _bc(tirx.Cast(U8, ch < lay.c), lanes)
        b = b << _bc(_u8(j), lanes)
        acc = b if acc is None else acc | b
        if plane == "neg" and mode == "sign":
            z = tirx.Cast(_vt("uint8", lanes), v == _bc(f0, lanes))
            if lay.c % 8:
                z = z & _bc(tirx.Cast(U8, ch < lay.c), lanes)
            zero = z if zero is None else zero | z
    return acc, zero


def _sign_byte(lay, data, shift, n, cb, y, x, lanes):
    """``_byte`` of ONNX ``Sign``'s -1 plane from the values' top bytes, and their
    :func:`.vector_tir.zero_evidence` minimum (a lane is 0 where some channel may hold a 0).

    Channel ``j``'s sign is bit 7 of its top byte; inserting each channel's top byte shifted
    right by ``7 - j`` under the bits already placed (``sri``, channels 7 down to 0) leaves
    bit ``j`` holding it: one instruction per channel and 16 pixels besides the three shuffles
    that give the top bytes, where a compare, its narrowing and the shift-or cost about ten.
    """
    acc, least = None, None
    count = min(8, lay.c)
    for j in reversed(range(count)):
        ch = cb * 8 + j
        v = _load(data, [n, tirx.min(ch, lay.c - 1), y], x, lanes)
        if shift is not None:
            v = v + _bc(shift[tirx.min(ch, lay.c - 1)], lanes)
        top = T.bind(top_bytes(v, lanes))
        if acc is None:
            acc = top >> _bc(_u8(7 - j), lanes)
        else:
            keep = _bc(_u8((0xFF << (8 - (7 - j))) & 0xFF), lanes)
            acc = (acc & keep) | (top >> _bc(_u8(7 - j), lanes))
        evidence = zero_evidence(top, lanes)
        if lay.c % 8:  # channels past C (their loads repeat channel C - 1) never flag
            evidence = evidence | _bc(tirx.Cast(U8, ch >= lay.c) * _u8(0xFF), lanes)
        least = evidence if least is None else tirx.Min(least, evidence)
    if count < 8 or lay.c % 8:  # the last byte's missing channels hold +1 (bit 0)
        valid = tirx.Cast(U8, (tirx.const(1, "int32") << tirx.min(lay.c - cb * 8, 8)) - 1)
        acc = acc & _bc(valid, lanes)
    return acc, least


def _binarize(lay, mode, data, shift, pad, zflag, n, cb, plane):
    """Pass 1: one channel byte's padded bit plane (and, for ``Sign``, whether it may hold a 0:
    a running minimum of :func:`.vector_tir.zero_evidence`, 0 in a lane where one may)."""
    zl = None
    if zflag is not None:
        zl = T.alloc_buffer([VECTOR], U8, scope="local")
        _store(zl, [], 0, VECTOR, _bc(_u8(0xFF), VECTOR))
    for ylo, yhi in ((0, lay.pt), (lay.pt + lay.h, lay.hp)):
        if yhi > ylo:
            with T.serial(ylo, yhi) as y:
                for x0, lanes in _chunks(0, lay.wp):
                    _store(pad, [n, cb, y], x0, lanes, _bc(_u8(0), lanes))
    with T.serial(0, lay.h) as y:
        for x in list(range(lay.pl)) + list(range(lay.pl + lay.w, lay.wp)):
            T.buffer_store(pad, _u8(0), [n, cb, y + lay.pt, x])
        for x0, lanes in _chunks(0, lay.w, BINARIZE_LANES):
            if mode == "sign" and plane == "neg" and lanes > 1:
                value, least = _sign_byte(lay, data, shift, n, cb, y, x0, lanes)
            else:
                value, zero = _byte(lay, mode, data, shift, n, cb, y, x0, lanes, plane)
                least = None if zero is None else tirx.Cast(_vt(U8, lanes), zero == _bc(_u8(0), lanes))
            _store(pad, [n, cb, y + lay.pt], x0 + lay.pl, lanes, value)
            if zl is not None:
                _store(zl, [], 0, lanes, tirx.Min(_load(zl, [], 0, lanes), least))
    if zl is not None:
        least = zl[0]
        for i in range(1, VECTOR):
            least = tirx.Min(least, zl[i])
        T.buffer_store(zflag, tirx.Cast(U8, least == _u8(0)), [n * lay.cb + cb])


def _shifted_planes(lay, pad, planes, n, cb):
    """Pass 2: plane (row phase, dx) of pitch OW: ``planes[..., r * OW + ow] = pad[r * sh + py, ow * sw + dx]``."""
    for py in range(lay.phases):
        for dx in range(lay.kw):
            with T.serial(0, lay.prow) as r:
                y = r * lay.sh + py
                for x0, lanes in _chunks(0, lay.ow):
                    src = tirx.BufferLoad(pad, [n, cb, tirx.min(y, lay.hp - 1),
                                                _ramp(x0 * lay.sw + dx, lay.sw, lanes)])
                    inside = _bc(tirx.Cast(U8, y < lay.hp) * _u8(0xFF), lanes)
                    _store(planes, [n, cb, py, dx], r * lay.ow + x0, lanes, src & inside)


def _blocks(lay):
    """Byte-accumulator blocks: runs of at most 31 steps ``(word, tap, byte)`` in the packed
    weights' memory order (bytes of one word at one tap are adjacent), over ``words`` words.

    Returns ``[(words, [[(w, t, k), ...], ...]), ...]``: a loop over groups of ``words`` full
    words, each group split into the listed blocks; a last group for the words left over
    (the last one possibly with fewer than four real channel bytes).
    """
    nt = len(lay.taps)
    full_words, tail_bytes = divmod(lay.cb, 4)

    def steps(words, last_bytes):
        out = []
        for w in range(words):
            kk = last_bytes if (w == words - 1 and last_bytes) else 4
            out += [(w, t, k) for t in range(nt) for k in range(kk)]
        return out

    def split(run):
        parts = -(-len(run) // MAX_STEPS)
        size = -(-len(run) // parts)
        return [run[i:i + size] for i in range(0, len(run), size)]

    per = max(1, MAX_STEPS // (4 * nt))  # words per group
    groups = []
    if full_words >= per:
        groups.append((per, full_words // per, split(steps(per, 0))))
    left = full_words % per if full_words >= per else full_words
    if left or tail_bytes:
        groups.append((left + (1 if tail_bytes else 0), 1, split(steps(left + (1 if tail_bytes else 0), tail_bytes))))
    return groups


def _tile(lay, planes, mplanes, wbits, acc, n, p0, o0, q):
    """Mismatch counts of one pixel tile and output-channel block, byte-accumulated in registers.

    Weight bytes are read from the packed words themselves (a little-endian uint32 holds
    channel bytes 0..3): one vector load per row of a block, one lane ``dup`` per step.
    """
    nt, P = len(lay.taps), lay.plan.vectors
    wb8 = T.decl_buffer([lay.o * lay.cw * nt * 4], U8, data=wbits.data)
    bacc = T.alloc_buffer([q * P * VECTOR], U8, scope="local")
    first_group = True

    def block(cw0, run, first):
        rows = {}
        for j in range(q):
            for w in sorted({w for w, _, _ in run}):
                lo = min(t * 4 + k for ww, t, k in run if ww == w)
                hi = max(t * 4 + k for ww, t, k in run if ww == w) + 1
                base = (((o0 + j) * lay.cw + cw0 + w) * nt) * 4
                rows[j, w] = (T.bind(_load(wb8, [], base + lo, hi - lo)), lo, hi - lo)
        for step, (w, t, k) in enumerate(run):
            cb = (cw0 + w) * 4 + k
            py, dx, off = lay.tap_plane(*lay.taps[t])
            a = [_load(planes, [n, cb, py, dx], p0 + off + VECTOR * i, VECTOR) for i in range(P)]
            if mplanes is not None:
                m = [_load(mplanes, [n, cb, py, dx], p0 + off + VECTOR * i, VECTOR) for i in range(P)]
            for j in range(q):
                vec, lo, lanes = rows[j, w]
                lane = t * 4 + k - lo
                # a splat of one lane (``dup v.16b, v.b[i]``); Shuffle wants as many input lanes as out
                copies = [vec] * -(-VECTOR // lanes)
                wv = _bc(vec, VECTOR) if lanes == 1 else tirx.Shuffle(copies, [tirx.IntImm("int32", lane)] * VECTOR)
                for i in range(P):
                    x = a[i] ^ wv
                    if mplanes is not None:
                        x = x & m[i]
                    cnt = tirx.popcount(x)
                    at = (j * P + i) * VECTOR
                    _store(bacc, [], at, VECTOR, cnt if step == 0 else _load(bacc, [], at, VECTOR) + cnt)
        for j in range(q):
            for i in range(P):
                sums = tirx.Cast(f"{lay.acc}x{VECTOR}", _load(bacc, [], (j * P + i) * VECTOR, VECTOR))
                at = p0 + i * VECTOR
                if first is not True:
                    prev = _load(acc, [n, o0 + j], at, VECTOR)
                    if first is not False:  # a runtime first iteration
                        prev = tirx.Select(first, _bc(tirx.const(0, lay.acc), VECTOR), prev)
                    sums = prev + sums
                _store(acc, [n, o0 + j], at, VECTOR, sums)

    cw_start = 0
    for words, count, runs in _blocks(lay):
        if count == 1:
            for r, run in enumerate(runs):
                block(cw_start, run, first_group and r == 0)
        else:
            with T.serial(0, count) as g:
                for r, run in enumerate(runs):
                    block(cw_start + g * words, run, (g == 0) if (first_group and r == 0) else False)
        first_group = False
        cw_start += words * count


def _real_sum(lay, mplanes, rsum, n, p0):
    """``R`` of one pixel tile from the real-bit planes (the masked path)."""
    nt = len(lay.taps)
    for i in range(lay.plan.vectors):
        start = p0 + VECTOR * i
        with T.serial(0, lay.cb) as cb:
            total = None
            for t in range(nt):
                py, dx, off = lay.tap_plane(*lay.taps[t])
                cnt = tirx.popcount(_load(mplanes, [n, cb, py, dx], start + off, VECTOR))
                total = cnt if total is None else total + cnt
            prev = tirx.Select(cb == 0, _bc(tirx.const(0, lay.acc), VECTOR), _load(rsum, [n], start, VECTOR))
            _store(rsum, [n], start, VECTOR, prev + tirx.Cast(f"{lay.acc}x{VECTOR}", total))


def _main_loop(lay, planes, mplanes, wbits, acc, rsum):
    """Pass 3, parallel over (image, pixel tile, output-channel chunk)."""
    chunks, per = lay.plan.o_chunks, len(lay.oblocks) // lay.plan.o_chunks
    with T.parallel(0, lay.n * lay.tiles * chunks) as task:
        n, tl, ch = task // (lay.tiles * chunks), task // chunks % lay.tiles, task % chunks
        p0 = tl * lay.tile
        if mplanes is not None:
            with T.If(ch == 0):
                with T.Then():
                    _real_sum(lay, mplanes, rsum, n, p0)
        sizes = sorted({o1 - o0 for o0, o1 in lay.oblocks})
        for size in sizes:  # a last, smaller block when O is not a multiple of Q
            ids = [b for b, (o0, o1) in enumerate(lay.oblocks) if o1 - o0 == size]
            lo, count = ids[0], len(ids)
            if size == lay.plan.o_block:
                with T.serial(0, per if chunks > 1 else count) as b:
                    ob = (ch * per + b) if chunks > 1 else b
                    with T.If(ob < lo + count):
                        with T.Then():
                            _tile(lay, planes, mplanes, wbits, acc, n, p0, ob * size, size)
            else:
                with T.If(ch == chunks - 1):
                    with T.Then():
                        o0, o1 = lay.oblocks[lo]
                        _tile(lay, planes, mplanes, wbits, acc, n, p0, o0, o1 - o0)


def _masked_path(lay, mode, data, shift, pad, planes, wbits, acc, rsum, pshape):
    """Some activation was 0 (ONNX ``Sign``): real-bit planes mask every step."""
    n_, cb_ = lay.n, lay.cb
    mplanes = T.alloc_buffer(pshape, U8)
    with T.parallel(0, n_ * cb_) as nc:
        _binarize(lay, mode, data, shift, pad, None, nc // cb_, nc % cb_, "real")
        _shifted_planes(lay, pad, mplanes, nc // cb_, nc % cb_)
    _main_loop(lay, planes, mplanes, wbits, acc, rsum)


def _kernel_body(lay, mode, ins, outs, with_shift):
    data, wbits = ins[0], ins[1]
    shift = ins[2] if with_shift else None
    acc, rsum = outs
    n_, cb_ = lay.n, lay.cb
    pshape = [n_, cb_, lay.phases, lay.kw, lay.prow * lay.ow]
    with IRBuilder() as ib:
        with T.seq_scope():
            wpop = T.alloc_buffer([lay.o, len(lay.taps)], "int32")
            pad = T.alloc_buffer([n_, cb_, lay.hp, lay.wp], U8)
            planes = T.alloc_buffer(pshape, U8)
            zflag = T.alloc_buffer([n_ * cb_], U8) if mode == "sign" else None
            _weight_popcounts(lay, wbits, wpop)
            with T.parallel(0, n_ * cb_) as nc:
                _binarize(lay, mode, data, shift, pad, zflag, nc // cb_, nc % cb_, "neg")
                _shifted_planes(lay, pad, planes, nc // cb_, nc % cb_)

            def fast():
                _main_loop(lay, planes, None, wbits, acc, rsum)
                correct_padding(lay, wpop, acc, rsum)

            mask_free_or_masked(zflag, n_ * cb_, fast,
                                lambda: _masked_path(lay, mode, data, shift, pad, planes, wbits, acc, rsum, pshape))
    return ib.get()


def binary_conv2d_neon_compute(geom: ConvGeometry, mode: str, plan: NeonBinaryPlan | None = None,
                               shift: bool = False):
    """Define the NEON dense binary convolution (same parameters and result as the generic one).

    Parameters
    ----------
    geom : ConvGeometry
        A binary convolution with at most 31 taps (:func:`supports`).
    mode : str
        Binarizer rule (``sparks_tvm.reference.BINARIZE_MODES``).
    plan : NeonBinaryPlan, optional
        Tile and blocking (:func:`default_plan` when omitted).
    shift : bool
        Take a per-channel float32 ``shift`` added to the activations before binarization.

    Returns
    -------
    list of te.Tensor
        ``[data, wbits, (shift,) out]``, ``out`` int32 ``(N, O, OH*OW)`` (laid out NCHW by
        :func:`binary_conv2d_neon_primfunc`).
    """
    geom.validate()
    if not supports(geom):
        raise ValueError(f"the NEON binary kernel takes at most {MAX_STEPS} taps, got kernel {geom.kernel}")
    plan = plan or default_plan(geom)
    if plan.vectors < 1 or plan.o_block < 1:
        raise ValueError(f"bad NEON binary plan {plan}")
    lay = _Layout(geom, plan)
    shp = int64_shape
    data = te.placeholder(shp(*geom.in_shape), "float32", name="data")
    wbits = te.placeholder(shp(lay.o, num_words(lay.c), lay.kh, lay.kw), "uint32", name="wbits")
    ins = [data, wbits]
    if shift:
        ins.append(te.placeholder(shp(lay.c), "float32", name="shift"))
    out_shapes = [shp(lay.n, lay.o, lay.pp), shp(lay.n, lay.pp)]
    acc, rsum = extern("binary_neon", ins, out_shapes, [lay.acc] * 2, ["acc", "rsum"],
                       lambda i, o: _kernel_body(lay, mode, i, o, shift))
    out = te.compute(shp(lay.n, lay.o, lay.pixels),
                     lambda n, o, p: tirx.Cast("int32", rsum[n, p]) - 2 * tirx.Cast("int32", acc[n, o, p]),
                     name="out")
    return ins + [out]


def binary_conv2d_neon_primfunc(geom: ConvGeometry, mode: str, plan: NeonBinaryPlan | None = None,
                                shift: bool = False):
    """Unscheduled PrimFunc (NCHW output, epilogue-fusable ``out`` block)."""
    func = te.create_prim_func(binary_conv2d_neon_compute(geom, mode, plan, shift))
    return nchw_output(func, geom.out_width).with_attr({"tir.noalias": True})
