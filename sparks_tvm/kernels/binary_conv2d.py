"""Dense binary convolution (XNOR-popcount on channel-packed words) as a TE computation.

Activations are packed 32 input channels to a uint32 word, in two planes: ``neg`` (the
channel holds -1) and ``mask`` (the channel holds a real +-1: a real channel, inside the
image, and non-zero for ONNX ``Sign``). Weights are packed the same way (bit set where the
weight is -1; weights are never 0). Per output pixel::

    y = sum_taps popcount(mask) - 2 * sum_taps popcount((neg ^ wbits) & mask)

The first sum does not depend on the output channel and is computed once per pixel.
"""

from __future__ import annotations

from tvm import te, tirx

from .common import ConvGeometry, int64_shape
from .encoding import WORD_BITS, activation_bits, as_u32, num_words, pack_binary_weights  # noqa: F401

def binary_conv2d_compute(geom: ConvGeometry, mode: str, shift: bool = False):
    """Define the dense binary convolution.

    Returns
    -------
    list of te.Tensor
        ``[data, wbits, out]`` (``[data, wbits, shift, out]`` with ``shift``, a per-channel
        float32 (C,) added before binarizing, as in the Sparks kernel): data float32
        (N, C, H, W); wbits uint32 (O, CW, KH, KW) from :func:`pack_binary_weights`; out
        int32 (N, O, OH, OW).
    """
    geom.validate()
    n_, c_, h_, w_ = geom.in_shape
    o_ = geom.out_channels
    kh_, kw_ = geom.kernel
    oh_, ow_ = geom.out_height, geom.out_width
    sh, sw = geom.stride
    top, left, bottom, right = geom.padding
    cw_ = num_words(c_)

    shp = int64_shape

    data = te.placeholder(shp(n_, c_, h_, w_), "float32", name="data")
    wbits = te.placeholder(shp(o_, cw_, kh_, kw_), "uint32", name="wbits")
    offset = te.placeholder(shp(c_), "float32", name="shift") if shift else None
    hp, wp = h_ + top + bottom, w_ + left + right

    def plane(which):
        def word(n, cw, y, x):
            yy, xx = y - top, x - left
            inside = tirx.all(yy >= 0, yy < h_, xx >= 0, xx < w_)
            yc = tirx.max(tirx.min(yy, h_ - 1), 0)
            xc = tirx.max(tirx.min(xx, w_ - 1), 0)
            acc = tirx.const(0, "uint32")
            for j in range(WORD_BITS):
                ch = cw * WORD_BITS + j
                val = data[n, tirx.min(ch, c_ - 1), yc, xc]
                if offset is not None:
                    val = val + offset[tirx.min(ch, c_ - 1)]
                neg, nz = activation_bits(val, mode)
                real = tirx.all(inside, ch < c_, nz)
                bit = tirx.all(real, neg) if which == "neg" else real
                acc = acc | (as_u32(bit) << j)
            return acc

        return word

    act_neg = te.compute(shp(n_, cw_, hp, wp), plane("neg"), name="pack_neg")
    act_mask = te.compute(shp(n_, cw_, hp, wp), plane("mask"), name="pack_mask")

    def reduce_axes():
        return (
            te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", cw_)), name="cw"),
            te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", kh_)), name="dy"),
            te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", kw_)), name="dx"),
        )

    rc, ry, rx = reduce_axes()
    valid = te.compute(
        shp(n_, oh_, ow_),
        lambda n, oh, ow: te.sum(
            tirx.Cast("int32", tirx.popcount(act_mask[n, rc, oh * sh + ry, ow * sw + rx])), axis=[rc, ry, rx]
        ),
        name="valid",
    )
    qc, qy, qx = reduce_axes()

    def mismatch(n, o, oh, ow):
        y, x = oh * sh + qy, ow * sw + qx
        diff = (act_neg[n, qc, y, x] ^ wbits[o, qc, qy, qx]) & act_mask[n, qc, y, x]
        return te.sum(tirx.Cast("int32", tirx.popcount(diff)), axis=[qc, qy, qx])

    acc = te.compute(shp(n_, o_, oh_, ow_), mismatch, name="mismatch")
    out = te.compute(
        shp(n_, o_, oh_, ow_), lambda n, o, oh, ow: valid[n, oh, ow] - 2 * acc[n, o, oh, ow], name="out"
    )
    return [data, wbits, out] if offset is None else [data, wbits, offset, out]


def binary_conv2d_primfunc(geom: ConvGeometry, mode: str, shift: bool = False):
    """Unscheduled PrimFunc of :func:`binary_conv2d_compute`."""
    func = te.create_prim_func(binary_conv2d_compute(geom, mode, shift))
    return func.with_attr({"op_pattern": 8, "tir.noalias": True})
