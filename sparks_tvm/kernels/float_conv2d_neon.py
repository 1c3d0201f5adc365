"""Float32 convolution for aarch64 NEON (the float parts: stem, shortcuts), as explicit vector TIR.

Same operation and packed weights as :func:`.float_conv2d.float_conv2d_compute` with
``V = 8`` lanes (``pack_float_weights(w, 8)``); the readable reference is any float conv
(the tests use torch). The generic kernel broadcasts each input value from memory into its
multiply-adds (two instructions per FMA at best); here a tile of 8 output columns x 8 output
channels keeps 16 accumulators in registers, and each input value is a lane of a loaded
vector used by ``fmla v.4s, w.4s, x.s[i]`` (one instruction per FMA): at column stride 2
the inputs of 8 columns are the even lanes of one contiguous load (``ld2``), which also
holds the next tap's inputs in its odd lanes.

The input is copied once into a zero-padded plane (one extra column, so a tile's last
contiguous load stays in its row), so the tiles need no border code. The result is written
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
#: Output columns per register tile.
COLUMNS = 8
F32 = "float32"


def supports(geom: ConvGeometry) -> bool:
    """Column strides 1 and 2 (others keep the generic kernel)."""
    return geom.stride[1] in (1, 2)


def _lane(vec, i, lanes, width=4):
    """Lane ``i`` of a ``lanes``-lane vector, splat to ``width`` lanes (``x.s[i]`` operand)."""
    if lanes == 1:
        return tirx.Broadcast(vec, width)
    return tirx.Shuffle([vec] * -(-width // lanes), [tirx.IntImm("int32", i)] * width)


def _inputs(pad, n, c, y, col0, cols, sw, taps):
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


def _store_tile(geom, conv, n, ob, oh, ow0, cols, parts):
    """Write the tile (``parts[i][h]``: column i, channels 4h..4h+3) as NCHW rows."""
    flat = [parts[i][h] for i in range(cols) for h in range(2)]
    for o in range(LANES):
        if cols > 1:
            row = tirx.Shuffle(flat, [tirx.IntImm("int32", i * LANES + o) for i in range(cols)])
        else:
            row = tirx.Shuffle([flat[o // 4]], [tirx.IntImm("int32", o % 4)])
        with T.If(ob * LANES + o < geom.out_channels):
            with T.Then():
                index = tirx.Ramp(oh * geom.out_width + ow0, 1, cols) if cols > 1 else oh * geom.out_width + ow0
                T.buffer_store(conv, row, [n, ob * LANES + o, index])


def _tile(geom, pad, wpack, conv, n, ob, oh, ow0, cols):
    """One register tile: ``cols`` output columns x 8 output channels of row ``oh``."""
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
                per_tap = _inputs(pad, n, c, oh * sh + dy, ow0 * sw + dx0, cols, sw, taps)
                for t in range(taps):
                    dx = dx0 + t
                    w = [T.bind(tirx.BufferLoad(wpack, [ob, c, dy, dx, tirx.Ramp(4 * h, 1, 4)])) for h in range(2)]
                    for i in range(cols):
                        x = _lane(per_tap[t][i // 4], i % 4, min(4, cols - 4 * (i // 4)))
                        for h in range(2):
                            sums[i][h] = sums[i][h] + w[h] * x
        for i in range(cols):
            for h in range(2):
                T.buffer_store(acc, sums[i][h], [tirx.Ramp(i * LANES + 4 * h, 1, 4)])
    parts = [[tirx.BufferLoad(acc, [tirx.Ramp(i * LANES + 4 * h, 1, 4)]) for h in range(2)] for i in range(cols)]
    _store_tile(geom, conv, n, ob, oh, ow0, cols, parts)
    return None


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


def _body(geom, ins, outs):
    data, wpack = ins
    (conv,) = outs
    n_, c_, h, w = geom.in_shape
    pt, pl = geom.padding[0], geom.padding[1]
    hp = geom.stride[0] * (geom.out_height - 1) + geom.kernel[0]
    wp = geom.stride[1] * (geom.out_width - 1) + geom.kernel[1] + 1
    blocks = -(-geom.out_channels // LANES)
    with IRBuilder() as ib:
        with T.seq_scope():
            pad = T.alloc_buffer([n_, c_, hp, wp], F32)
            with T.parallel(0, n_ * c_) as nc:
                _pad_plane(pad, data, nc // c_, nc % c_, h, w, pt, pl, hp, wp)
            tiles = [(s, min(COLUMNS, geom.out_width - s)) for s in range(0, geom.out_width, COLUMNS)]
            with T.parallel(0, n_ * blocks * geom.out_height) as task:
                n = task // (blocks * geom.out_height)
                ob = task // geom.out_height % blocks
                oh = task % geom.out_height
                for ow0, cols in tiles:
                    _tile(geom, pad, wpack, conv, n, ob, oh, ow0, cols)
    return ib.get()


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
