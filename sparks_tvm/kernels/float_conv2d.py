"""Float32 convolution with output channels packed into vector lanes (for the float parts).

``tvm.compile`` leaves a float conv2d as a naive single-threaded loop nest on CPUs (no
default schedule applies), which made the stem of the example ResNet-18 alone ~100x slower
than onnxruntime. This is the classic direct-convolution layout for SIMD CPUs: weights are
repacked at compile time to ``(O/V, C, KH, KW, V)`` so that one vector load gives V output
channels of one tap, and every input value is broadcast into V multiply-adds::

    conv[n, ob, oh, ow, v] = sum_{c, kh, kw} pad[n, c, oh*s + kh, ow*s + kw] * wpack[ob, c, kh, kw, v]
    out[n, o, oh, ow]      = conv[n, o // V, oh, ow, o % V]          (o < O)
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from .common import ConvGeometry, int64_shape


def pack_float_weights(weight: np.ndarray, lanes: int) -> np.ndarray:
    """(O, C, KH, KW) float32 -> (ceil(O/V), C, KH, KW, V), zero-padded output channels."""
    o, c, kh, kw = weight.shape
    blocks = -(-o // lanes)
    padded = np.zeros((blocks * lanes, c, kh, kw), np.float32)
    padded[:o] = weight
    return np.ascontiguousarray(padded.reshape(blocks, lanes, c, kh, kw).transpose(0, 2, 3, 4, 1))


def float_conv2d_compute(geom: ConvGeometry, lanes: int):
    """Define the packed float convolution.

    Returns
    -------
    list of te.Tensor
        ``[data, wpack, out]``: data float32 (N, C, H, W); wpack from
        :func:`pack_float_weights`; out float32 (N, O, OH, OW).
    """
    geom.validate()
    n_, c_, h_, w_ = geom.in_shape
    o_ = geom.out_channels
    kh_, kw_ = geom.kernel
    oh_, ow_ = geom.out_height, geom.out_width
    sh, sw = geom.stride
    top, left, bottom, right = geom.padding
    blocks = -(-o_ // lanes)

    shp = int64_shape

    data = te.placeholder(shp(n_, c_, h_, w_), "float32", name="data")
    wpack = te.placeholder(shp(blocks, c_, kh_, kw_, lanes), "float32", name="wpack")
    if any(geom.padding):
        pad = te.compute(
            shp(n_, c_, h_ + top + bottom, w_ + left + right),
            lambda n, c, y, x: tirx.if_then_else(
                tirx.all(y >= top, y < h_ + top, x >= left, x < w_ + left),
                data[n, c, y - top, x - left],
                tirx.const(0.0, "float32"),
            ),
            name="pad",
        )
    else:
        pad = data
    rc = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", c_)), name="rc")
    ry = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", kh_)), name="ry")
    rx = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", kw_)), name="rx")
    conv = te.compute(
        shp(n_, blocks, oh_, ow_, lanes),
        lambda n, ob, oh, ow, v: te.sum(
            pad[n, rc, oh * sh + ry, ow * sw + rx] * wpack[ob, rc, ry, rx, v], axis=[rc, ry, rx]
        ),
        name="conv",
    )
    out = te.compute(
        shp(n_, o_, oh_, ow_), lambda n, o, oh, ow: conv[n, o // lanes, oh, ow, o % lanes], name="out"
    )
    return [data, wpack, out]


def float_conv2d_primfunc(geom: ConvGeometry, lanes: int):
    """Unscheduled PrimFunc of :func:`float_conv2d_compute` (opaque to Relax fusion)."""
    func = te.create_prim_func(float_conv2d_compute(geom, lanes))
    return func.with_attr({"op_pattern": 8, "tir.noalias": True})
