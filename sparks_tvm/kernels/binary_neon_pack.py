"""Pass 1 of the NEON dense binary kernel: binarize and bit-pack the input, two channel bytes
interleaved (:mod:`.binary_conv2d_neon`'s layout ``(N, pairs, HP, 2 WP)``), zero-padded.

Bit ``j`` of channel byte ``cb`` is channel ``8 cb + j`` holding -1 (the ``neg`` plane) or
a non-zero value (the ``real`` plane, for the masked path).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .vector_tir import U8, VECTOR, top_bytes, zero_evidence
from .vector_tir import bc as _bc, chunks as _chunks, load as _load, store as _store, u8 as _u8, vt as _vt

#: Pixels binarized per vector step (8 float32 registers per channel byte at most).
BINARIZE_LANES = 16


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
        valid = tirx.Cast(U8, (tirx.const(1, "int32") << tirx.max(tirx.min(lay.c - cb * 8, 8), 0)) - 1)
        acc = acc & _bc(valid, lanes)
    return acc, least



def _interleave(lo, hi, lanes):
    """``lo[0], hi[0], lo[1], hi[1], ...`` (one ``st2`` when stored)."""
    return tirx.Shuffle([lo, hi], [tirx.IntImm("int32", i + lanes * k) for i in range(lanes) for k in (0, 1)])


def binarize(lay, mode, data, shift, buf, zflag, n, q, plane):
    """Pass 1: one channel-byte pair's padded bit plane (and, for ``Sign``, whether it may
    hold a 0: a running minimum of :func:`.vector_tir.zero_evidence`, 0 where one may)."""
    zl = None
    if zflag is not None:
        zl = T.alloc_buffer([VECTOR], U8, scope="local")
        _store(zl, [], 0, VECTOR, _bc(_u8(0xFF), VECTOR))
    for ylo, yhi in ((0, lay.pt), (lay.pt + lay.h, lay.hp)):
        if yhi > ylo:
            with T.serial(ylo, yhi) as y:
                for x0, lanes in _chunks(0, lay.row):
                    _store(buf, [n, q, y], x0, lanes, _bc(_u8(0), lanes))
    cbs = [cb for cb in (2 * q, 2 * q + 1)]
    with T.serial(0, lay.h) as y:
        for x in list(range(lay.pl)) + list(range(lay.pl + lay.w, lay.wp)):
            _store(buf, [n, q, y + lay.pt], 2 * x, 2, _bc(_u8(0), 2))
        for x0, lanes in _chunks(0, lay.w, BINARIZE_LANES):
            values = []
            for k, cb in enumerate(cbs):
                if mode == "sign" and plane == "neg" and lanes > 1:
                    value, least = _sign_byte(lay, data, shift, n, cb, y, x0, lanes)
                else:
                    value, zero = _byte(lay, mode, data, shift, n, cb, y, x0, lanes, plane)
                    least = None if zero is None else tirx.Cast(_vt(U8, lanes), zero == _bc(_u8(0), lanes))
                if lay.cb % 2:  # an odd channel-byte count: the last pair's second byte is padding
                    live = tirx.Cast(U8, cb < lay.cb) * _u8(0xFF)
                    value = value & _bc(live, lanes)
                    if least is not None:
                        least = least | _bc(_u8(0xFF) - live, lanes)
                values.append(value)
                if zl is not None:
                    _store(zl, [], 0, lanes, tirx.Min(_load(zl, [], 0, lanes), least))
            at = 2 * (x0 + lay.pl)
            if lanes > 1:
                _store(buf, [n, q, y + lay.pt], at, 2 * lanes, _interleave(*values, lanes))
            else:
                for k in (0, 1):
                    T.buffer_store(buf, values[k], [n, q, y + lay.pt, at + k])
    if zl is not None:
        least = zl[0]
        for i in range(1, VECTOR):
            least = tirx.Min(least, zl[i])
        T.buffer_store(zflag, tirx.Cast(U8, least == _u8(0)), [n * lay.pairs + q])
