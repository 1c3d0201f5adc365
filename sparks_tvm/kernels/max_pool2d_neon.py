"""Max pooling for 128-bit SIMD CPUs (aarch64 NEON), written as explicit vector TIR.

Same result as ``relax.nn.max_pool2d`` (NCHW, float32, dilation 1; the reference is
:func:`max_pool2d_ref`). Stock TVM schedules the pooling window as strided vector loads,
which LLVM emits lane by lane on NEON (the ResNet-18 stem's 3x3 stride-2 pool: 10.4 M
instructions). Here:

- no padded copy: a window tap outside the image reads the nearest edge element instead,
  which lies in the same window (windows are contiguous and hold at least one element of the
  image, checked by :func:`supports`), so the maximum is unchanged;
- separable: each input row the windows touch is reduced across its window columns once
  (into a per-channel row buffer), then each output row is the maximum of its ``kh`` rows;
  the 3x3 stride-2 pool shares one of every three rows between two output rows;
- at column stride 2, taps ``dx`` and ``dx + 1`` of 8 output columns are the even and odd
  lanes of one contiguous 16-float load (``ld2``); at stride 1 each tap is one contiguous
  load; output columns whose loads would leave the row run as scalars.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .common import int64_shape
from .vector_tir import chunks as _chunks, extern

#: Output columns per vector step (two float32 registers).
LANES = 8


def out_size(size: int, kernel: int, stride: int, lo: int, hi: int) -> int:
    return (size + lo + hi - kernel) // stride + 1


def supports(in_shape, kernel, stride, padding, out_shape) -> bool:
    """Whether every window holds an image element (so edge clamping keeps the maximum)."""
    _, _, h, w = in_shape
    oh, ow = out_shape[2], out_shape[3]

    def ok(size, k, s, lo, outs):
        return all(o * s - lo + k - 1 >= 0 and o * s - lo <= size - 1 for o in range(outs))

    return ok(h, kernel[0], stride[0], padding[0], oh) and ok(w, kernel[1], stride[1], padding[1], ow)


def max_pool2d_ref(x: np.ndarray, kernel, stride, padding, out_shape) -> np.ndarray:
    """Readable reference: the maximum over each window's in-image elements."""
    n, c, h, w = x.shape
    oh, ow = out_shape[2], out_shape[3]
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        y0 = i * stride[0] - padding[0]
        rows = slice(max(0, y0), min(h, y0 + kernel[0]))
        for j in range(ow):
            x0 = j * stride[1] - padding[1]
            out[:, :, i, j] = x[:, :, rows, max(0, x0):min(w, x0 + kernel[1])].max(axis=(2, 3))
    return out


def _vector_columns(w, kw, sw, pl, ow):
    """Output columns whose taps all load in-row vectors (see the module docstring)."""
    if sw == 1:
        return [o for o in range(ow) if o - pl >= 0 and o - pl + kw - 1 <= w - 1]
    if sw == 2:
        # Odd tap counts load one column past the last tap, except 3: its tap 2 is the next
        # column's tap 0 (one element read, see _taps).
        last = 2 if kw == 3 else kw - 1 + (kw % 2)
        return [o for o in range(ow) if 2 * o - pl >= 0 and 2 * o - pl + last <= w - 1]
    return []


def _taps(x, n, c, rows, col0, lanes, kw, sw):
    """The window taps of ``lanes`` output columns from ``col0`` (input column of tap 0)."""
    vals = []
    for y in rows:
        if sw == 1:
            vals += [tirx.BufferLoad(x, [n, c, y, tirx.Ramp(col0 + dx, 1, lanes)]) for dx in range(kw)]
            continue
        for dx in range(0, kw, 2):
            if dx == 2 and kw == 3:
                # Tap 2 of column o is tap 0 of column o + 1: the even lanes already loaded,
                # one lane on, and the next column's (``ext`` with one broadcast element).
                nxt = tirx.Broadcast(x[n, c, y, col0 + 2 * lanes], lanes)
                vals.append(tirx.Shuffle([vals[-2], nxt], [tirx.IntImm("int32", i + 1) for i in range(lanes)]))
                continue
            pair = T.bind(tirx.BufferLoad(x, [n, c, y, tirx.Ramp(col0 + dx, 1, 2 * lanes)]))
            vals.append(tirx.Shuffle([pair], [tirx.IntImm("int32", 2 * i) for i in range(lanes)]))
            if dx + 1 < kw:
                vals.append(tirx.Shuffle([pair], [tirx.IntImm("int32", 2 * i + 1) for i in range(lanes)]))
    return vals


def _max(a, b, lanes):
    """``fmaxnm`` (``llvm.maxnum``): ``tirx.max`` lowers to a compare and a select on NEON
    (NaN inputs never get here: the compiled model refuses them)."""
    return tirx.call_llvm_pure_intrin("float32" if lanes == 1 else f"float32x{lanes}", "llvm.maxnum", a, b)


def _body(x, out, in_shape, kernel, stride, padding, out_shape):
    n_, c_, h, w = in_shape
    kh, kw = kernel
    sh, sw = stride
    pt, pl = padding[0], padding[1]
    oh_, ow_ = out_shape[2], out_shape[3]
    vcols = _vector_columns(w, kw, sw, pl, ow_) if oh_ * ow_ >= 1 else []
    scalar_cols = [o for o in range(ow_) if o not in vcols]
    groups = []
    for start in range(0, len(vcols), LANES):
        group = vcols[start:start + LANES]
        if len(group) < LANES and len(vcols) >= LANES and vcols[-1] - vcols[-LANES] == LANES - 1:
            group = vcols[-LANES:]  # whole vectors: the last one overlaps the one before
        if group[-1] - group[0] != len(group) - 1 or len(group) == 1:
            scalar_cols += group
        else:
            groups.append(group)
    # Input rows the windows touch (clamped to the image), each reduced across its columns once:
    # a row serves up to ceil(kh / sh) output rows (the 3x3 stride-2 pool: two of three).
    y_lo, y_hi = max(0, -pt), min(h, (oh_ - 1) * sh - pt + kh)
    with IRBuilder() as ib:
        with T.parallel(0, n_ * c_) as nc:
            n, c = nc // c_, nc % c_
            rowmax = T.alloc_buffer([h, ow_], "float32")
            with T.serial(y_lo, y_hi) as y:
                for group in groups:
                    lanes = len(group)
                    vals = _taps(x, n, c, [y], group[0] * sw - pl, lanes, kw, sw)
                    best = vals[0]
                    for v in vals[1:]:
                        best = _max(best, v, lanes)
                    T.buffer_store(rowmax, best, [y, tirx.Ramp(group[0], 1, lanes)])
                for o in sorted(scalar_cols):
                    best = None
                    for dx in range(kw):
                        v = x[n, c, y, min(max(o * sw + dx - pl, 0), w - 1)]
                        best = v if best is None else _max(best, v, 1)
                    T.buffer_store(rowmax, best, [y, o])
            with T.serial(0, oh_) as oh:
                rows = [tirx.max(tirx.min(oh * sh + dy - pt, h - 1), 0) for dy in range(kh)]
                for x0, lanes in _chunks(0, ow_, 4 * LANES):
                    best = None
                    for y in rows:
                        v = tirx.BufferLoad(rowmax, [y, tirx.Ramp(x0, 1, lanes) if lanes > 1 else x0])
                        best = v if best is None else _max(best, v, lanes)
                    T.buffer_store(out, best, [n, c, oh, tirx.Ramp(x0, 1, lanes) if lanes > 1 else x0])
    return ib.get()


def max_pool2d_neon_primfunc(in_shape, kernel, stride, padding, out_shape):
    """The scheduled kernel (``x`` float32 NCHW -> ``out``), for :mod:`relay_passes.lower_max_pool2d`.

    Raises
    ------
    ValueError
        When a window holds no image element (:func:`supports`).
    """
    if not supports(in_shape, kernel, stride, padding, out_shape):
        raise ValueError(f"max pool {kernel} stride {stride} padding {padding}: a window lies outside the image")
    x = te.placeholder(int64_shape(*in_shape), "float32", name="x")
    (out,) = extern("max_pool_neon", [x], [int64_shape(*out_shape)], ["float32"], ["out"],
                    lambda i, o: _body(i[0], o[0], in_shape, kernel, stride, padding, out_shape))
    func = te.create_prim_func([x, out])
    return func.with_attr({"tir.noalias": True, "tirx.is_scheduled": True})
