"""Float32 convolution for aarch64 NEON (the float parts: stem, shortcuts), as explicit vector TIR.

Same operation and packed weights as :func:`.float_conv2d.float_conv2d_compute` with
``V = 8`` lanes (``pack_float_weights(w, 8)``); the readable reference is any float conv
(the tests use torch). The generic kernel broadcasts each input value from memory into its
multiply-adds (two instructions per FMA at best); here a tile of 12 output columns (three
4-lane vectors) x 8 output channels keeps 24 accumulators in registers, and each weight is a
lane of a loaded vector used by ``fmla v.4s, x.4s, w.s[i]`` (one instruction per FMA, 24 per
tap for 4 loads: three input vectors and one weight pair).

The input is copied once into a zero-padded plane, then, unless the conv is 1x1 at column
stride 1, into one shifted plane per kernel column (``planes[n, c, y, dx, x] = pad[n, c, y,
sw * x + dx]``; at column stride 2 two kernel columns come from one ``ld2``): every input
vector of a tap is then one load at a 16-byte multiple from its row, with no address
arithmetic and no lane shuffles in the tile. Tiles compute whole vectors (columns past the
output width read padding and are not stored); kernels of up to 9 taps unroll a channel's
taps in one loop body. Kernels of more taps (the 7x7 stem) take :func:`_row_tile`: output
columns as lanes of one contiguous input row segment per (channel, kernel row), which serves
all of the row's taps (1.13 instructions per ``fmla`` against 1.19, no shifted planes). 1x1 convs at stride 1 are one GEMM over the
flattened pixels (two channels per loop iteration). Rows whose width is not a multiple of 4
with at most 9 taps (14x14, 7x7 layers) take :func:`_column_tile` instead: output columns
as lanes of the inputs (``fmla v.4s, w.4s, x.s[i]``), 8 columns x 8 channels, no padding
lanes computed. The result is written
NCHW-flat through the epilogue-fusable ``out`` block, like the other NEON kernels.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .common import ConvGeometry, int64_shape, nchw_output
from .vector_tir import chunks as _chunks, extern

#: Output channels per weight vector pair (two float32 registers).
LANES = 8
#: Output columns per register tile (three 4-lane vectors: 24 accumulators with 8 channels).
COLUMNS = 12
F32 = "float32"
#: Kernels of at most this many taps unroll a channel's taps in one loop body; larger ones
#: (the 7x7 stem) loop over kernel rows, a body LLVM still keeps in registers.
UNROLLED_TAPS = 9
#: Output columns per tile of :func:`_column_tile` (16 accumulators).
COLUMN_TILE = 8


def supports(geom: ConvGeometry) -> bool:
    """Column strides 1 and 2 (others keep the generic kernel)."""
    return geom.stride[1] in (1, 2)


def _lane(vec, i, width=4):
    """Lane ``i`` of a 4-lane vector, splat to ``width`` lanes (the ``v.s[i]`` operand of ``fmla``)."""
    return tirx.Shuffle([vec], [tirx.IntImm("int32", i)] * width)


def _tile(geom, planes, wpack, conv, n, ob, oh, ow0, cols):
    """One register tile: ``cols`` output columns (in 4-lane vectors) x 8 output channels of row ``oh``.

    ``planes[n, c, y, dx, x]`` is padded input ``(y, sw * x + dx)``, so every tap's inputs of
    4 adjacent output columns are one vector load at a multiple of 16 bytes from its row
    (``ldr q`` / ``ldp q`` with an immediate offset: no address arithmetic per load).
    """
    kh, kw = geom.kernel
    sh, sw = geom.stride
    nv = -(-cols // 4)
    acc = T.alloc_buffer([LANES * nv * 4], F32, scope="local")

    def part(l, j):
        return tirx.Ramp((l * nv + j) * 4, 1, 4)

    for l in range(LANES):
        for j in range(nv):
            T.buffer_store(acc, tirx.Broadcast(tirx.const(0.0, F32), 4), [part(l, j)])
    # Per (channel, kernel row), each accumulator is one expression over the row's taps: a
    # loop body small enough for LLVM to keep the 24 accumulators in registers (a fully
    # unrolled channel spills). A 1x1 conv takes two channels per iteration (loop overhead).
    step = 2 if kh * kw == 1 else 1

    def taps(c0, count, dys):
        sums = [[tirx.BufferLoad(acc, [part(l, j)]) for j in range(nv)] for l in range(LANES)]
        for dy in dys:
            y = oh * sh + dy
            for dc in range(count):
                c = c0 + dc
                for dx in range(kw):
                    xs = [T.bind(tirx.BufferLoad(planes, [n, c, y, dx, tirx.Ramp(ow0 + 4 * j, 1, 4)]))
                          for j in range(nv)]
                    w = [T.bind(tirx.BufferLoad(wpack, [ob, c, dy, dx, tirx.Ramp(4 * h, 1, 4)])) for h in range(2)]
                    for l in range(LANES):
                        wl = _lane(w[l // 4], l % 4)
                        for j in range(nv):
                            sums[l][j] = sums[l][j] + xs[j] * wl
        for l in range(LANES):
            for j in range(nv):
                T.buffer_store(acc, sums[l][j], [part(l, j)])

    def channels(c0, count):
        if kh * kw <= UNROLLED_TAPS:
            taps(c0, count, range(kh))
        else:
            with T.serial(0, kh) as dy:
                taps(c0, count, [dy])

    if geom.in_channels >= step:
        with T.serial(0, geom.in_channels // step) as cc:
            channels(cc * step, step)
    if geom.in_channels % step:
        channels(geom.in_channels - 1, 1)
    for l in range(LANES):
        with T.If(ob * LANES + l < geom.out_channels):
            with T.Then():
                for j in range(nv):
                    lanes = min(4, cols - 4 * j)
                    value = tirx.BufferLoad(acc, [part(l, j)])
                    at = oh * geom.out_width + ow0 + 4 * j
                    if lanes < 4:
                        value = tirx.Shuffle([value], [tirx.IntImm("int32", i) for i in range(lanes)]) if lanes > 1 \
                            else tirx.BufferLoad(acc, [(l * nv + j) * 4])
                    T.buffer_store(conv, value, [n, ob * LANES + l, tirx.Ramp(at, 1, lanes) if lanes > 1 else at])


def _column_lane(vec, i, lanes, width=4):
    """Lane ``i`` of a ``lanes``-lane vector, splat to ``width`` lanes (``x.s[i]`` operand)."""
    if lanes == 1:
        return tirx.Broadcast(vec, width)
    return tirx.Shuffle([vec] * -(-width // lanes), [tirx.IntImm("int32", i)] * width)


def _column_inputs(pad, n, c, y, col0, cols, sw, taps):
    """The input values of ``cols`` output columns at ``taps`` (1, or 2 adjacent at stride 2):
    per tap, 4-lane vectors (columns 4j .. 4j + 3). At stride 2 the two taps are the even
    and odd lanes of the same contiguous loads (``ld2``)."""
    out = [[] for _ in range(taps)]
    for s in range(0, cols, 4):
        lanes = min(4, cols - s)
        for t in range(taps):
            if lanes == 1:
                out[t].append(pad[n, c, y, col0 + s * sw + t])
            elif sw == 1:
                out[t].append(tirx.BufferLoad(pad, [n, c, y, tirx.Ramp(col0 + s + t, 1, lanes)]))
        if lanes > 1 and sw == 2:
            pair = T.bind(tirx.BufferLoad(pad, [n, c, y, tirx.Ramp(col0 + 2 * s, 1, 2 * lanes)]))
            for t in range(taps):
                out[t].append(tirx.Shuffle([pair], [tirx.IntImm("int32", 2 * i + t) for i in range(lanes)]))
    return out


def _shuffle(a, b, lanes):
    """Lanes of the 8-lane concatenation ``a ++ b`` (``trn``/``zip`` operands of two 4-lane vectors)."""
    return tirx.Shuffle([a, b], [tirx.IntImm("int32", i) for i in lanes])


def _transpose4(vectors):
    """A 4x4 transpose as ``trn1/trn2`` of 4-lane pairs then ``zip`` of 2-lane halves
    (8 instructions; LLVM's lowering of one wide shuffle takes about twice as many)."""
    a, b, c, d = vectors
    t0, t1 = T.bind(_shuffle(a, b, (0, 4, 2, 6))), T.bind(_shuffle(a, b, (1, 5, 3, 7)))
    t2, t3 = T.bind(_shuffle(c, d, (0, 4, 2, 6))), T.bind(_shuffle(c, d, (1, 5, 3, 7)))
    return [_shuffle(t0, t2, (0, 1, 4, 5)), _shuffle(t1, t3, (0, 1, 4, 5)),
            _shuffle(t0, t2, (2, 3, 6, 7)), _shuffle(t1, t3, (2, 3, 6, 7))]


def _store_column_tile(geom, conv, n, ob, oh, ow0, cols, parts):
    """Write the tile (``parts[i][h]``: column i, channels 4h..4h+3) as NCHW rows.

    Each 4 columns x 4 channels block is transposed in registers (a short last block
    repeats its last column; those lanes are not stored), then a channel's row is one store.
    """
    groups = -(-cols // 4)
    rows = [[None] * groups for _ in range(LANES)]
    for h in range(2):
        for g in range(groups):
            block = [parts[min(4 * g + j, cols - 1)][h] for j in range(4)]
            for r, vec in enumerate(_transpose4(block)):
                rows[4 * h + r][g] = T.bind(vec)
    for o in range(LANES):
        if cols == 1:
            row = tirx.Shuffle([rows[o][0]], [tirx.IntImm("int32", 0)])
        elif cols <= 4:
            row = tirx.Shuffle([rows[o][0]], [tirx.IntImm("int32", i) for i in range(cols)])
        else:
            row = tirx.Shuffle(rows[o], [tirx.IntImm("int32", i) for i in range(cols)])
        with T.If(ob * LANES + o < geom.out_channels):
            with T.Then():
                index = tirx.Ramp(oh * geom.out_width + ow0, 1, cols) if cols > 1 else oh * geom.out_width + ow0
                T.buffer_store(conv, row, [n, ob * LANES + o, index])


def _column_tile(geom, pad, wpack, conv, n, ob, oh, ow0, cols):
    """A tile of ``cols`` (<= 8) output columns as *lanes of the inputs* x 8 output channels.

    Each output column is a lane of a loaded input vector (``fmla v.4s, w.4s, x.s[i]``), so a
    tile of any width computes no padding lanes: the kernel of rows whose width is not a
    multiple of 4 (14 or 7 columns would compute 16 or 8 as pixel vectors), for up to
    :data:`UNROLLED_TAPS` taps (16 accumulators, a channel's taps unrolled).
    """
    kh, kw = geom.kernel
    sh, sw = geom.stride
    acc = T.alloc_buffer([cols * LANES], F32, scope="local")
    for i in range(cols):
        for h in range(2):
            T.buffer_store(acc, tirx.Broadcast(tirx.const(0.0, F32), 4), [tirx.Ramp(i * LANES + 4 * h, 1, 4)])
    # Per input channel, each accumulator is one expression over the kernel's taps: loaded
    # and stored once per channel, not once per tap (the buffer is not a register).
    with T.serial(0, geom.in_channels) as c:
        sums = [[tirx.BufferLoad(acc, [tirx.Ramp(i * LANES + 4 * h, 1, 4)]) for h in range(2)] for i in range(cols)]
        for dy in range(kh):
            step = 2 if sw == 2 else 1
            for dx0 in range(0, kw, step):
                taps = min(step, kw - dx0)
                per_tap = _column_inputs(pad, n, c, oh * sh + dy, ow0 * sw + dx0, cols, sw, taps)
                for t in range(taps):
                    dx = dx0 + t
                    w = [T.bind(tirx.BufferLoad(wpack, [ob, c, dy, dx, tirx.Ramp(4 * h, 1, 4)])) for h in range(2)]
                    for i in range(cols):
                        x = _column_lane(per_tap[t][i // 4], i % 4, min(4, cols - 4 * (i // 4)))
                        for h in range(2):
                            sums[i][h] = sums[i][h] + w[h] * x
        for i in range(cols):
            for h in range(2):
                T.buffer_store(acc, sums[i][h], [tirx.Ramp(i * LANES + 4 * h, 1, 4)])
    parts = [[tirx.BufferLoad(acc, [tirx.Ramp(i * LANES + 4 * h, 1, 4)]) for h in range(2)] for i in range(cols)]
    _store_column_tile(geom, conv, n, ob, oh, ow0, cols, parts)


def _row_span(cols, sw, kw):
    """Input values one kernel row of a :func:`_row_tile` reads, in whole 4-lane vectors."""
    return -(-((cols - 1) * sw + kw) // 4) * 4


def _row_tile(geom, pad, wpack, conv, n, ob, oh, ow0, cols):
    """A column-lane tile (``cols`` <= 8 output columns x 8 output channels) for large kernels.

    Per (input channel, kernel row) the tile's whole input row segment is loaded once, as
    contiguous vectors, and tap ``dx`` of column ``i`` is lane ``sw * i + dx`` of it (``fmla
    v.4s, w.4s, x.s[j]``): the 7x7 stem's 21 inputs of a row serve its 7 taps x 8 columns
    from 6 loads, where pixel vectors load every tap's inputs (and need shifted planes). The
    loop runs over (channel, kernel row) with the row's taps unrolled, small enough a body
    for LLVM to keep the 16 accumulators in registers.
    """
    kh, kw = geom.kernel
    sh, sw = geom.stride
    acc = T.alloc_buffer([cols * LANES], F32, scope="local")

    def part(i, h):
        return tirx.Ramp(i * LANES + 4 * h, 1, 4)

    for i in range(cols):
        for h in range(2):
            T.buffer_store(acc, tirx.Broadcast(tirx.const(0.0, F32), 4), [part(i, h)])
    # One loop iteration per (channel, kernel row): unrolling more rows per body changes
    # nothing (LLVM pairs the same loads), a 10- or 12-column tile spills.
    with T.serial(0, geom.in_channels) as c:
        with T.serial(0, kh) as dy:
            sums = [[tirx.BufferLoad(acc, [part(i, h)]) for h in range(2)] for i in range(cols)]
            row = [T.bind(tirx.BufferLoad(pad, [n, c, oh * sh + dy, tirx.Ramp(ow0 * sw + 4 * v, 1, 4)]))
                   for v in range(_row_span(cols, sw, kw) // 4)]
            for dx in range(kw):
                w = [T.bind(tirx.BufferLoad(wpack, [ob, c, dy, dx, tirx.Ramp(4 * h, 1, 4)])) for h in range(2)]
                for i in range(cols):
                    at = sw * i + dx
                    x = _lane(row[at // 4], at % 4)
                    for h in range(2):
                        sums[i][h] = sums[i][h] + w[h] * x
            for i in range(cols):
                for h in range(2):
                    T.buffer_store(acc, sums[i][h], [part(i, h)])
    parts = [[tirx.BufferLoad(acc, [part(i, h)]) for h in range(2)] for i in range(cols)]
    _store_column_tile(geom, conv, n, ob, oh, ow0, cols, parts)


def _store_row(buf, index, lo, hi, value_of):
    for x0, lanes in _chunks(lo, hi):
        ramp = tirx.Ramp(x0, 1, lanes) if lanes > 1 else x0
        T.buffer_store(buf, value_of(x0, lanes), [*index, ramp])


def _pad_plane(pad, data, n, c, h, w, pt, pl, hp, wp):
    """One channel's zero-padded copy (rows of whole vectors: no per-element bounds)."""
    zero = lambda x0, lanes: tirx.Broadcast(tirx.const(0.0, F32), lanes) if lanes > 1 else tirx.const(0.0, F32)  # noqa: E731
    for ylo, yhi in ((0, min(pt, hp)), (min(pt + h, hp), hp)):
        if yhi > ylo:
            with T.serial(ylo, yhi) as y:
                _store_row(pad, [n, c, y], 0, wp, zero)
    rows = min(h, hp - pt)
    with T.serial(0, rows) as y:
        _store_row(pad, [n, c, y + pt], 0, min(pl, wp), zero)
        _store_row(pad, [n, c, y + pt], min(pl + w, wp), wp, zero)
        inner = min(w, wp - pl)

        def copy(x0, lanes):
            col = x0 - pl
            return tirx.BufferLoad(data, [n, c, y, tirx.Ramp(col, 1, lanes) if lanes > 1 else col])

        _store_row(pad, [n, c, y + pt], pl, pl + inner, copy)


def _flat(geom: ConvGeometry) -> bool:
    """A 1x1 conv at stride 1 without padding: one GEMM over the flattened pixels."""
    return tuple(geom.kernel) == (1, 1) and tuple(geom.stride) == (1, 1) and not any(geom.padding)


def _body(geom, ins, outs):
    data, wpack = ins
    (conv,) = outs
    flat = _flat(geom)
    if flat:
        # Rows of whole 12-column tiles instead of short image rows (14 or 7 columns would
        # compute 16 or 8): the image as one row of H * W pixels.
        n_, c_, h, w = geom.in_shape
        geom = ConvGeometry(n_, c_, 1, h * w, geom.out_channels, (1, 1), (1, 1), (0, 0, 0, 0))
    n_, c_, h, w = geom.in_shape
    kh, kw = geom.kernel
    sw = geom.stride[1]
    pt, pl = geom.padding[0], geom.padding[1]
    hp = geom.stride[0] * (geom.out_height - 1) + kh
    # Plane columns: every tile computes whole 4-lane vectors (lanes past OW read padding).
    wq = -(-geom.out_width // 4) * 4
    direct = kw == 1 and sw == 1  # the padded input is the only plane
    # Rows whose width is not a multiple of 4 would compute padding lanes as pixel vectors.
    by_column = not flat and kh * kw <= UNROLLED_TAPS and geom.out_width % 4 != 0
    # Large kernels (the stem) read whole input row segments per kernel row.
    by_row = kh * kw > UNROLLED_TAPS
    wp = wq if direct else sw * wq + kw
    if by_row:
        last = (geom.out_width - 1) // COLUMN_TILE * COLUMN_TILE
        wp = max(wp, sw * last + _row_span(min(COLUMN_TILE, geom.out_width - last), sw, kw))
    blocks = -(-geom.out_channels // LANES)
    with IRBuilder() as ib:
        with T.seq_scope():
            if flat:
                data = T.decl_buffer([n_, c_, 1, w], F32, data=data.data)
            pad = T.alloc_buffer([n_, c_, hp, wp], F32)
            with T.parallel(0, n_ * c_) as nc:
                _pad_plane(pad, data, nc // c_, nc % c_, h, w, pt, pl, hp, wp)
            if direct or by_column or by_row:
                planes = T.decl_buffer([n_, c_, hp, 1, wp], F32, data=pad.data)
            else:
                planes = T.alloc_buffer([n_, c_, hp, kw, wq], F32)
                with T.parallel(0, n_ * c_) as nc:
                    _shifted_planes(pad, planes, nc // c_, nc % c_, hp, kw, sw, wq)
            tiles = [(s, min(COLUMNS, geom.out_width - s)) for s in range(0, geom.out_width, COLUMNS)]
            full = geom.out_width // COLUMNS if len(tiles) > 4 else 0
            with T.parallel(0, n_ * blocks * geom.out_height) as task:
                n = task // (blocks * geom.out_height)
                ob = task // geom.out_height % blocks
                oh = task % geom.out_height
                if by_row:
                    whole = geom.out_width // COLUMN_TILE
                    if whole:
                        with T.serial(0, whole) as t:
                            _row_tile(geom, pad, wpack, conv, n, ob, oh, t * COLUMN_TILE, COLUMN_TILE)
                    if geom.out_width % COLUMN_TILE:
                        ow0 = whole * COLUMN_TILE
                        _row_tile(geom, pad, wpack, conv, n, ob, oh, ow0, geom.out_width - ow0)
                elif by_column:
                    for ow0 in range(0, geom.out_width, COLUMN_TILE):
                        _column_tile(geom, pad, wpack, conv, n, ob, oh, ow0, min(COLUMN_TILE, geom.out_width - ow0))
                else:
                    if full:  # a loop over the tiles (unrolled, a long row is a long function)
                        with T.serial(0, full) as t:
                            _tile(geom, planes, wpack, conv, n, ob, oh, t * COLUMNS, COLUMNS)
                    for ow0, cols in tiles[full:]:
                        _tile(geom, planes, wpack, conv, n, ob, oh, ow0, cols)
    return ib.get()


def _shifted_planes(pad, planes, n, c, hp, kw, sw, wq):
    """``planes[n, c, y, dx, x] = pad[n, c, y, sw * x + dx]``: one shifted (at column stride 2,
    de-interleaved: ``ld2``) copy of each padded row per kernel column."""
    with T.serial(0, hp) as y:
        if sw == 1:
            for dx in range(kw):
                for x0, lanes in _chunks(0, wq, 4):
                    value = tirx.BufferLoad(pad, [n, c, y, tirx.Ramp(x0 + dx, 1, lanes)])
                    T.buffer_store(planes, value, [n, c, y, dx, tirx.Ramp(x0, 1, lanes)])
            return
        # Kernel columns dx and dx + 1 are the even and odd lanes of the same load (``ld2``).
        for dx in range(0, kw, 2):
            for x0, lanes in _chunks(0, wq, 4):
                pair = T.bind(tirx.BufferLoad(pad, [n, c, y, tirx.Ramp(2 * x0 + dx, 1, 2 * lanes)]))
                for parity in range(min(2, kw - dx)):
                    value = tirx.Shuffle([pair], [tirx.IntImm("int32", 2 * i + parity) for i in range(lanes)])
                    T.buffer_store(planes, value, [n, c, y, dx + parity, tirx.Ramp(x0, 1, lanes)])


def float_conv2d_neon_primfunc(geom: ConvGeometry):
    """Unscheduled PrimFunc: ``[data, wpack, out]`` (out NCHW, epilogue-fusable ``out`` block)."""
    geom.validate()
    if not supports(geom):
        raise ValueError(f"the NEON float conv takes column strides 1 and 2, got {geom.stride}")
    shp = int64_shape
    blocks = -(-geom.out_channels // LANES)
    data = te.placeholder(shp(*geom.in_shape), F32, name="data")
    wpack = te.placeholder(shp(blocks, geom.in_channels, *geom.kernel, LANES), F32, name="wpack")
    pixels = geom.out_height * geom.out_width
    (conv,) = extern("float_neon", [data, wpack], [shp(geom.batch, geom.out_channels, pixels)], [F32], ["conv"],
                     lambda i, o: _body(geom, i, o))
    out = te.compute(conv.shape, lambda n, o, p: conv[n, o, p], name="out")
    func = te.create_prim_func([data, wpack, out])
    return nchw_output(func, geom.out_width).with_attr({"tir.noalias": True})
