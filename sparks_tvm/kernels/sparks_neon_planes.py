"""Pass 2 of the NEON Sparks kernel (:mod:`.sparks_conv2d_neon`): binarized planes, tap triples.

Per input channel: the padded 0/1 plane of its -1 taps (for ONNX ``Sign`` also whether it
held a 0; the mixed path then builds the real-tap plane of such channels), then the
horizontal tap triples stage 1 builds its patch planes from (:func:`patch_rows`). ``lay`` is the kernel's layout object.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .vector_tir import U8, VECTOR, sign_bits, top_bytes, whole_chunks, zero_evidence
from .vector_tir import bc as _bc, load as _load, store as _store, u8 as _u8, vt as _vt


def binarize_rows(lay, mode, data, shift, planes, zflag, n, c):
    """Pass 2a: one channel's padded 0/1 planes (zero padding after binarization).

    ``planes`` maps ``"neg"`` (the -1 taps) and/or ``"real"`` (the non-zero ones, for ONNX
    ``Sign``) to their buffers; with ``zflag`` also whether the channel may hold a 0 (from the
    top bytes the sign bits come from, :func:`.vector_tir.zero_evidence`: two instructions
    per 16 values; the real plane is then built only for the channels flagged).
    """
    zero = _u8(0)
    for ylo, yhi in ((0, lay.pt), (lay.pt + lay.h, lay.binrows)):
        if yhi > ylo:
            with T.serial(ylo, yhi) as y:
                with T.vectorized(0, lay.cols) as x:
                    for plane in planes.values():
                        T.buffer_store(plane, zero, [n, c, y, x])
    side = list(range(lay.pl)) + list(range(lay.pl + lay.w, lay.cols))
    f0 = tirx.const(0.0, "float32")
    zl = None
    if zflag is not None:
        # A running minimum of :func:`zero_evidence`: a lane reaches 0 where a value may be 0.
        zl = T.alloc_buffer([VECTOR], U8, scope="local")
        _store(zl, [], 0, VECTOR, _bc(_u8(0xFF), VECTOR))
    def binarize(v, lanes, store):
        """Binarize ``lanes`` values ``v``: ``store(which, bytes)`` per plane, zero evidence."""
        if shift is not None:
            v = v + _bc(shift[c], lanes)
        v = T.bind(v)
        fz = _bc(f0, lanes)
        top = T.bind(top_bytes(v, lanes)) if mode == "sign" and lanes > 1 else None
        for which in planes:
            if which == "real":
                byte = tirx.Cast(_vt(U8, lanes), v != fz)
            elif top is not None:
                byte = sign_bits(v, lanes, top)  # differs from v < 0 only at -0.0: a zero, masked
            else:
                byte = tirx.Cast(_vt(U8, lanes), v <= fz if mode == "gt" else v < fz)
            store(which, byte)
        if zl is not None:
            evidence = zero_evidence(top, lanes) if top is not None else tirx.Cast(_vt(U8, lanes), v != fz)
            _store(zl, [], 0, lanes, tirx.Min(_load(zl, [], 0, lanes), evidence))

    def zero_sides(y):
        for x in side:
            for plane in planes.values():
                T.buffer_store(plane, zero, [n, c, y + lay.pt, x])

    hw = lay.h * lay.w
    if lay.w < VECTOR <= hw:
        # Narrow rows (7, 14 columns): binarize the channel's contiguous values in whole
        # 16-lane vectors into a flat byte row, then copy it row by row into the padded plane
        # (rows of fewer than 16 floats legalize into lane-by-lane moves).
        src = T.decl_buffer([_size(data)], "float32", data=data.data)
        flat = {which: T.alloc_buffer([hw], U8) for which in planes}
        base = (n * lay.c + c) * hw
        for x0, lanes in whole_chunks(0, hw):
            binarize(_load(src, [], base + x0, lanes), lanes,
                     lambda which, byte: _store(flat[which], [], x0, lanes, byte))
        with T.serial(0, lay.h) as y:
            zero_sides(y)
            for x0, lanes in whole_chunks(0, lay.w):
                for which, plane in planes.items():
                    _store(plane, [n, c, y + lay.pt], x0 + lay.pl, lanes, _load(flat[which], [], y * lay.w + x0, lanes))
    else:
        with T.serial(0, lay.h) as y:
            zero_sides(y)
            for x0, lanes in whole_chunks(0, lay.w):  # stores repeat at most a value
                binarize(_load(data, [n, c, y], x0, lanes), lanes,
                         lambda which, byte: _store(planes[which], [n, c, y + lay.pt], x0 + lay.pl, lanes, byte))
    if zl is not None:
        least = zl[0]
        for i in range(1, VECTOR):
            least = tirx.Min(least, zl[i])
        T.buffer_store(zflag, tirx.Cast(U8, least == _u8(0)), [n * lay.c + c])


def triples(lay, pairs, n, c):
    """Pass 2b: horizontal tap triples, laid out so that each patch row is a flat pixel vector.

    Bits 0..2 of a triple are taps dx = 0..2 of one output column in one padded input row.
    Row stride 1: ``t[y * OW + w]`` for every padded row y, and patch row dy of pixel p is
    triple ``p + dy * OW``. Row stride > 1: ``t[dy, p]`` holds patch row dy of pixel p
    directly (each input row written once per patch row it serves).
    """
    sw, ow = lay.sw, lay.ow

    def row(plane, tplane, y, dst):
        """The triples of input row ``y`` for every output column, stored from ``dst``."""
        if sw == 2 and ow >= 8:
            # Columns 2w, 2w + 1 and 2w + 2 are the even and odd lanes of one contiguous load
            # and the even lanes of the next (``ld2``): no lane-by-lane strided loads. Whole
            # 16- or 8-lane vectors, the last one overlapping the one before (other lane
            # counts legalize into lane-by-lane moves).
            step = VECTOR if ow >= VECTOR else 8
            starts = list(range(0, ow - step + 1, step))
            if ow % step:
                starts.append(ow - step)
            for w0, lanes in [(w, step) for w in starts]:
                def lanes_of(start, parity):
                    pair = _load(plane, [n, c, y], start, 2 * lanes)
                    return tirx.Shuffle([pair], [tirx.IntImm("int32", 2 * i + parity) for i in range(lanes)])
                even, odd = lanes_of(2 * w0, 0), lanes_of(2 * w0, 1)
                # Column 2w + 2: the even lanes one further (``ext`` with the next pair's).
                later = lanes_of(2 * w0 + 2 * lanes, 0)
                next_even = tirx.Shuffle([even, later], [tirx.IntImm("int32", i + 1) for i in range(lanes)])
                value = even | (odd << _bc(_u8(1), lanes)) | (next_even << _bc(_u8(2), lanes))
                _store(tplane, [], dst + w0, lanes, value)
            return
        if sw == 2:  # fewer than 8 columns: column pairs (2w, 2w + 1) as 16-bit lanes
            words = T.decl_buffer([_size(plane) // 2], "uint16", data=plane.data)
            one = tirx.const(1, "uint16")
            # Non-flat rows: 8 lanes, whole vectors (7 legalize lane by lane). The lanes past
            # OW read the row's spare words and the next row, and their triples land where
            # the next output row's (or the zeroed pixels past OH * OW) are written after.
            with T.vectorized(0, 8 if not lay.flat and lay.narrow else ow) as w:
                at = ((n * lay.c + c) * plane.shape[2] + y) * (lay.cols // 2) + w
                lo, hi = words[at], words[at + 1]
                word = (lo & one) | ((lo >> tirx.const(8, "uint16")) << one) | ((hi & one) << tirx.const(2, "uint16"))
                T.buffer_store(tplane, tirx.Cast(U8, word), [dst + w])
            return
        if sw == 1:  # contiguous loads, whole vectors (the last overlapping: same values)
            # Narrow rows: one 8-lane vector, its lanes past OW overwritten by the next row's
            # triples (or in the spare vector / past the pixels).
            for w0, lanes in [(0, 8)] if lay.narrow else whole_chunks(0, ow):
                value = (_load(plane, [n, c, y], w0, lanes) | (_load(plane, [n, c, y], w0 + 1, lanes) << _bc(_u8(1), lanes))
                         | (_load(plane, [n, c, y], w0 + 2, lanes) << _bc(_u8(2), lanes)))
                _store(tplane, [], dst + w0, lanes, value)
            return
        # Larger column strides stay scalar.
        with T.serial(0, ow) as w:
            value = (plane[n, c, y, w * sw] | (plane[n, c, y, w * sw + 1] << _u8(1))
                     | (plane[n, c, y, w * sw + 2] << _u8(2)))
            T.buffer_store(tplane, value, [dst + w])

    flats = [(plane, T.decl_buffer([_size(tplane)], U8, data=tplane.data))
             for plane, tplane in pairs]
    if lay.flat:
        with T.serial(0, lay.rows) as y:
            for plane, flat in flats:
                row(plane, flat, y, (n * lay.c + c) * lay.tstride + y * ow)
        return
    with T.serial(0, lay.oh) as r:
        for dy in range(3):
            for plane, flat in flats:
                row(plane, flat, r * lay.sh + dy, ((n * lay.c + c) * 3 + dy) * lay.pp + r * ow)
    if lay.pp > lay.pixels:  # pixels past OH * OW: defined values, never stored
        for dy in range(3):
            with T.vectorized(0, lay.pp - lay.pixels) as p:
                for _, tplane in pairs:
                    T.buffer_store(tplane, _u8(0), [n, c, dy, lay.pixels + p])


def _size(buf):
    total = 1
    for d in buf.shape:
        total *= int(d)
    return total


def patch_rows(lay, buf, n, c, start, lanes):
    """The three triple vectors (patch rows dy = 0, 1, 2) of pixels ``start .. start + lanes``."""
    if lay.flat:
        return [_load(buf, [n, c], start + dy * lay.ow, lanes) for dy in range(3)]
    return [_load(buf, [n, c, dy], start, lanes) for dy in range(3)]
