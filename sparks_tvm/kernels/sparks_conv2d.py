"""The Sparks convolution as a two-stage TE computation.

Stage 1 convolves every input channel with each of the K 3x3 codewords; stage 2 gathers,
per output channel, one stage-1 response per input channel and accumulates them.

Bit formulation of stage 1 (SPARKS.md): for an output pixel, the 3x3 patch of input
channel i is packed into two 9-bit words, ``neg`` (taps holding -1) and ``mask`` (taps
holding a real +-1: inside the image and, for ONNX ``Sign``, non-zero). With the codeword's
``-1`` taps in ``code``::

    S = popcount(mask) - 2 * popcount((neg ^ code) & mask)

The packed 9-bit words ``neg`` and ``mask`` (uint16) and ``popcount(mask)`` are computed once
per (channel, pixel) and shared by the K codewords.
"""

from __future__ import annotations

from tvm import te, tirx

from .common import ConvGeometry, activation_bits, as_u32

def accumulator_dtype(in_channels: int) -> str:
    """Narrowest accumulator that cannot overflow: |y| <= 9 * C."""
    return "int16" if 9 * in_channels <= 32767 else "int32"


def sparks_conv2d_compute(geom: ConvGeometry, num_codewords: int, mode: str, oh_pad: int | None = None):
    """Define the Sparks convolution.

    Parameters
    ----------
    geom : ConvGeometry
        Must have a 3x3 kernel.
    num_codewords : int
        K, the size of the layer's sub-codebook.
    mode : str
        Binarizer rule for activations (see :data:`sparks_tvm.reference.BINARIZE_MODES`).
    oh_pad : int, optional
        Output rows computed by the intermediate stages (>= the real output height) so that
        a schedule can tile rows evenly; rows past the real height are never written out.

    Returns
    -------
    list of te.Tensor
        ``[data, codes, idx, out]``: data float32 (N, C, H, W); codes int32 (K,) with bit t
        set where tap t of the codeword is -1; idx int32 (O, C); out int32 (N, O, OH, OW).
    """
    geom.validate()
    if tuple(geom.kernel) != (3, 3):
        raise ValueError(f"the Sparks op needs 3x3 kernels, got {geom.kernel}")
    n_, c_, h_, w_ = geom.in_shape
    o_ = geom.out_channels
    oh_, ow_ = geom.out_height, geom.out_width
    oh_pad = oh_ if oh_pad is None else oh_pad
    assert oh_pad >= oh_
    sh, sw = geom.stride
    top, left = geom.padding[0], geom.padding[1]
    k_ = num_codewords
    acc_dtype = accumulator_dtype(c_)

    # int64 shapes: FuseTIR and the Relax VM expect them (LegalizeOps does the same).
    def shp(*dims):
        return tuple(tirx.IntImm("int64", d) for d in dims)

    data = te.placeholder(shp(n_, c_, h_, w_), "float32", name="data")
    codes = te.placeholder(shp(k_), "int32", name="codes")
    idx = te.placeholder(shp(o_, c_), "int32", name="idx")

    def tap_bits(n, c, y, x):
        inside = tirx.all(y >= 0, y < h_, x >= 0, x < w_)
        val = data[n, c, tirx.max(tirx.min(y, h_ - 1), 0), tirx.max(tirx.min(x, w_ - 1), 0)]
        neg, nz = activation_bits(val, mode)
        # 2-bit code of a padded activation: bit 0 = -1, bit 1 = holds a value.
        return tirx.if_then_else(inside, as_u32(neg) | (as_u32(nz) << 1), tirx.const(0, "uint32"))

    bits = te.compute(
        shp(n_, c_, h_ + geom.padding[0] + geom.padding[2], w_ + geom.padding[1] + geom.padding[3]),
        lambda n, c, y, x: tap_bits(n, c, y - top, x - left),
        name="bin_pad",
    )

    def pack(n, c, oh, ow, plane):
        # plane 0: taps holding -1; plane 1: taps holding a real +-1 (in-image, non-zero).
        word = tirx.const(0, "uint16")
        for t in range(9):
            dy, dx = divmod(t, 3)
            b = bits[n, c, oh * sh + dy, ow * sw + dx]
            word = word | tirx.Cast("uint16", ((b >> plane) & 1) << t)
        return word

    def pack_rows(plane):
        def fcompute(n, c, oh, ow):
            if oh_pad == oh_:
                return pack(n, c, oh, ow, plane)
            # Padding rows (oh >= OH) read a clamped row and get an empty mask: they add 0
            # and are never stored.
            return tirx.if_then_else(
                oh < oh_, pack(n, c, tirx.min(oh, oh_ - 1), ow, plane), tirx.const(0, "uint16")
            )

        return fcompute

    neg = te.compute(shp(n_, c_, oh_pad, ow_), pack_rows(0), name="patch_neg")
    mask = te.compute(shp(n_, c_, oh_pad, ow_), pack_rows(1), name="patch_mask")
    # popcount(mask) does not depend on the codeword: computed once per (channel, pixel).
    valid = te.compute(
        shp(n_, c_, oh_pad, ow_), lambda n, c, oh, ow: tirx.Cast("int16", tirx.popcount(mask[n, c, oh, ow])),
        name="patch_valid",
    )

    def stage1(n, c, k, oh, ow):
        # 16-bit lanes end to end (popcount of a 9-bit word fits); signed before subtracting:
        # unsigned arithmetic that goes negative is poison in LLVM.
        code = tirx.Cast("uint16", codes[k])
        diff = tirx.Cast("int16", tirx.popcount((neg[n, c, oh, ow] ^ code) & mask[n, c, oh, ow]))
        return tirx.Cast("int8", valid[n, c, oh, ow] - diff * tirx.const(2, "int16"))

    s1 = te.compute(shp(n_, c_, k_, oh_pad, ow_), stage1, name="stage1")

    ci = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", c_)), name="ci")

    def stage2(n, o, oh, ow):
        # Clamp: tuning runners fill idx with random values; an OOB gather kills them.
        k = tirx.max(tirx.min(idx[o, ci], k_ - 1), 0)
        return te.sum(tirx.Cast(acc_dtype, s1[n, ci, k, oh, ow]), axis=ci)

    acc = te.compute(shp(n_, o_, oh_pad, ow_), stage2, name="stage2")
    out = te.compute(shp(n_, o_, oh_, ow_), lambda n, o, oh, ow: tirx.Cast("int32", acc[n, o, oh, ow]), name="out")
    return [data, codes, idx, out]


def sparks_conv2d_primfunc(geom: ConvGeometry, num_codewords: int, mode: str, oh_pad: int | None = None):
    """Unscheduled PrimFunc of :func:`sparks_conv2d_compute`, marked opaque for Relax fusion."""
    func = te.create_prim_func(sparks_conv2d_compute(geom, num_codewords, mode, oh_pad))
    # The data-dependent gather must not be fused or inlined by Relax: keep it opaque (8).
    return func.with_attr({"op_pattern": 8, "tir.noalias": True})
