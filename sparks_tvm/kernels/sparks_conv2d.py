"""The Sparks convolution as a two-stage TE computation.

Stage 1 convolves every input channel with each of the K 3x3 codewords; stage 2 gathers,
per output channel, one stage-1 response per input channel and accumulates them.

Bit formulation of stage 1 (SPARKS.md). For an output pixel, the 3x3 patch of input channel
i has ``neg`` (taps holding -1) and ``mask`` (taps holding a real +-1: inside the image and,
for ONNX ``Sign``, non-zero) bits. With the codeword's ``-1`` taps in ``code``, the patch and
codeword agree on ``m = popcount(~(neg ^ code) & mask)`` taps, and the response is
``S = 2 * m - popcount(mask)``.

Biased responses on byte lanes. Stage 1 stores ``S + 9`` (0..18, uint8): unsigned, so each
input channel's bias is removed once at the end (``- 9 * C``). Taps 0..7 of a patch are one
byte (``patch_neg``, ``patch_mask``), so the popcount runs on bytes: 64 lanes per AVX-512
``vpopcntb``, NEON's native ``cnt``, where a 9-bit word needed 16-bit lanes and a narrowing
pack. Everything else in ``S + 9`` -- the ninth tap's match, the real-tap count and the bias --
does not depend on the codeword beyond its bit 8, so it is one precomputed byte plane per
value of that bit (``patch_bias``). Per codeword and pixel, stage 1 is then
``2 * popcount((neg ^ ~code) & mask) + plane[bit 8]``: xor, and, popcount, add, add, the
plane picked per codeword (an address outside the pixel loop).

Layout. Output pixels are flattened (``p = oh * OW + ow``) and padded to a multiple of the
pixel tile ``T``: a schedule then vectorizes over whole machine vectors of pixels whatever
the image width (7, 14, 28 and 56 are not multiples of 32). Stage 1 is stored as
``(N, C, K, P)`` uint8 so that stage 2's inner step is one byte-vector add of a contiguous
row ``stage1[n, ci, idx[o, ci], p0:p0+T]``: 64 pixels per AVX-512 add. At row stride 1 the
patch planes are flat over the padded pixels too (row triples are read at ``p + dy * OW``), so
packing also runs in whole vectors; pixels past ``OH*OW`` then hold arbitrary in-range values
and are never stored.

Narrow accumulation. Stage 2 sums ``G`` input channels at a time in uint8 (``G * 18 <= 255``,
so ``G <= 14``), then widens each partial sum into the uint16 (or int32, for very wide
layers) accumulator: the loads per gathered row are bytes, not 16-bit words. The output is
int32 NCHW: computed over flattened pixels, stored through a layout map (``nchw_output``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from .common import ConvGeometry, int64_shape, nchw_output
from .encoding import (  # noqa: F401 - the index encoding is re-exported here
    accumulator_dtype,
    activation_code,
    codeword_index,
    idx_dtype,
    index_bits,
    pack_indices,
    packed_index_shape,
    unpack_indices,
)

#: Default pixel tile (flattened output pixels per stage-2 row).
DEFAULT_TILE = 64
#: Input channels summed in uint8 before widening: 8 * 18 = 144 <= 255, and 8 divides the usual widths.
DEFAULT_GROUP = 8
#: Largest group whose uint8 partial sum of biased responses cannot overflow (14 * 18 = 252).
MAX_GROUP = 14


def padded_pixels(geom: ConvGeometry, tile: int) -> int:
    """Flattened output pixels rounded up to a multiple of ``tile``."""
    pixels = geom.out_height * geom.out_width
    return -(-pixels // tile) * tile


def sparks_out_shape(geom: ConvGeometry) -> tuple:
    """Shape of the kernel's output parameter: NCHW (see :func:`~.common.nchw_output`)."""
    return tuple(geom.out_shape)


@dataclass(frozen=True)
class _Layout:
    """Sizes of one Sparks layer's stages (see the module docstring, "Layout")."""

    geom: ConvGeometry
    num_codewords: int
    tile: int

    @property
    def ppad(self) -> int:  # flattened output pixels padded to whole tiles
        return padded_pixels(self.geom, self.tile)

    @property
    def rows(self) -> int:  # patch rows covering the padded pixels
        return -(-self.ppad // self.geom.out_width)

    @property
    def flat(self) -> bool:
        # At row stride 1 the patch planes are flat over padded pixels (see _patch_planes).
        return self.geom.stride[0] == 1

    @property
    def wp(self) -> int:
        return self.geom.width + self.geom.padding[1] + self.geom.padding[3]

    @property
    def hp(self) -> int:
        # Flat planes read pixel p's rows r + dy with r = p // OW, so up to ceil(P / OW) + 2
        # rows. Rows past the padded image are more zero padding (code 0): the reads stay in
        # bounds without a clamp.
        hp = self.geom.height + self.geom.padding[0] + self.geom.padding[2]
        return max(hp, -(-self.ppad // self.geom.out_width) + 2) if self.flat else hp

    @property
    def plane_shape(self) -> tuple:
        return (self.ppad,) if self.flat else (self.rows, self.geom.out_width)


def _u8(v):
    return tirx.const(v, "uint8")


def _check_args(geom: ConvGeometry, tile: int, group: int) -> None:
    geom.validate()
    if tuple(geom.kernel) != (3, 3):
        raise ValueError(f"the Sparks op needs 3x3 kernels, got {geom.kernel}")
    if tile < 1:
        raise ValueError(f"pixel tile must be positive, got {tile}")
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"uint8 channel group must be in [1, {MAX_GROUP}], got {group}")


def _kernel_indices(idx, lay: _Layout):
    """``kernel_index(o, c)``: the codeword index of kernel (o, c), read from the packed ``idx``."""
    o_, c_, k_, tile = lay.geom.out_channels, lay.geom.in_channels, lay.num_codewords, lay.tile
    field_bits = index_bits(k_)
    if field_bits >= 8:
        # The codeword_index forcing keeps any byte value in [0, K).
        return lambda o, c: codeword_index(idx[o, c], k_)
    # The library keeps the indices packed (tau bits each); they are unpacked once per call
    # into (O, fields per byte, bytes), so that the unpack writes whole vectors and stage 2
    # reads channel c at [c % per, c // per]: constant offsets once its group loop unrolls.
    # Unpacked pre-multiplied by the row length T: a gather's row offset is then the value
    # masked (one AND), not masked and shifted (512->512, 1 thread: 0.188 -> 0.158 ms).
    per = 8 // field_bits
    scaled = "uint16" if ((1 << field_bits) - 1) * tile <= 65535 else "int32"
    unpacked = te.compute(
        int64_shape(o_, per, packed_index_shape(o_, c_, k_)[1]),
        lambda o, r, q: tirx.Cast(scaled, (idx[o, q] >> tirx.Cast("uint8", r * field_bits))
                                  & tirx.const((1 << field_bits) - 1, "uint8")) * tirx.const(tile, scaled),
        name="idx_unpack",
    )
    return lambda o, c: codeword_index(tirx.floordiv(tirx.Cast("int32", unpacked[o, c % per, c // per]), tile), k_)


def _binarized(data, mode: str, offset, lay: _Layout):
    """``bin_pad`` (N, C, HP, SW, ceil(WP / SW)) uint8: padded 2-bit codes, columns split by phase.

    With x = q * SW + phase, a strided conv's patch reads walk q contiguously (vector loads)
    instead of gathering every SW-th column; for SW = 1 this is the plain padded image.
    """
    geom = lay.geom
    n_, c_ = geom.batch, geom.in_channels
    top, left = geom.padding[0], geom.padding[1]
    sw, hp, wp = geom.stride[1], lay.hp, lay.wp

    def tap_bits(n, c, y, x):
        return activation_code(data, mode, n, c, y, x, offset)

    if sw == 1:
        return te.compute(int64_shape(n_, c_, hp, 1, wp), lambda n, c, y, ph, q: tap_bits(n, c, y - top, q - left),
                          name="bin_pad")
    # Binarized in the natural layout first (contiguous float loads: vector compares), then
    # split by phase with byte loads. Binarizing straight into the phase-split layout read
    # the floats at stride SW, which LLVM scalarized: half of a stride-2 layer's time.
    natural = te.compute(int64_shape(n_, c_, hp, wp), lambda n, c, y, x: tap_bits(n, c, y - top, x - left),
                         name="bin_codes")

    def split(n, c, y, ph, q):
        x = q * sw + ph
        return tirx.if_then_else(x < wp, natural[n, c, y, tirx.min(x, wp - 1)], _u8(0))

    return te.compute(int64_shape(n_, c_, hp, sw, -(-wp // sw)), split, name="bin_pad")


def _patch_planes(bits, lay: _Layout):
    """``(patch_neg, patch_mask, patch_bias)``: taps 0..7 as bytes, and the codeword-free rest.

    Patch planes are indexed by a pixel position ``pos``: ``(p,)`` flattened when flat, else
    ``(r, ow)``. Flat (row stride 1), patch row dy of pixel p is row triple p + dy * OW of the
    flattened (rows, OW) triples: a plane is then three contiguous shifted reads, one
    whole-vector loop over the padded pixels whatever the width (a 14-wide row was a ragged
    8 + 4 + 2-lane vector per row: 15% of the 256->256 layer). Padding pixels read real rows
    below the image and get arbitrary in-range bytes; their outputs are never stored. At row
    stride 2 the patch rows of consecutive pixels are not contiguous: the planes are
    (rows, OW), and rows past the image are masked.
    """
    geom = lay.geom
    n_, c_, oh_, ow_ = geom.batch, geom.in_channels, geom.out_height, geom.out_width
    sh, sw, flat, u8 = geom.stride[0], geom.stride[1], lay.flat, _u8

    def row_triple(n, c, y, ow):
        # The three horizontal taps of output column ow in padded row y: their -1 bits in bits
        # 0..2, their real bits in bits 3..5. Each row triple serves the three patch rows that
        # cover row y, so a patch is then three loads, not nine.
        word = u8(0)
        for dx in range(3):
            b = bits[n, c, y, dx % sw, ow + dx // sw]
            word = word | ((b & u8(1)) << u8(dx)) | ((b >> u8(1)) << u8(dx + 3))
        return word

    triple = te.compute(int64_shape(n_, c_, lay.hp, ow_), row_triple, name="row_triple")

    def triple_rows(n, c, pos):
        if flat:
            (p,) = pos
            r, w = p // ow_, p % ow_
            return [triple[n, c, r + dy, w] for dy in range(3)]
        r, w = pos
        y = tirx.min(r, oh_ - 1) * sh  # rows past the image read a real row; masked() masks them
        return [triple[n, c, y + dy, w] for dy in range(3)]

    def masked(pos, value):
        if flat or lay.rows == oh_:
            return value
        return tirx.if_then_else(pos[0] < oh_, value, u8(0))

    def pack_low(plane):
        # Taps 0..7 (rows 0 and 1, then taps 0..1 of row 2) in one byte: popcounts then run on
        # byte lanes (64 per AVX-512 vector, NEON's native `cnt`). plane 0: taps holding -1;
        # plane 1: taps holding a real +-1.
        def fcompute(n, c, *pos):
            t0, t1, t2 = (t >> u8(3 * plane) for t in triple_rows(n, c, pos))
            word = (t0 & u8(7)) | ((t1 & u8(7)) << u8(3)) | ((t2 & u8(3)) << u8(6))
            return masked(pos, word)

        return fcompute

    shape = int64_shape(n_, c_, *lay.plane_shape)
    neg = te.compute(shape, pack_low(0), name="patch_neg")
    mask = te.compute(shape, pack_low(1), name="patch_mask")

    def bias(n, c, b, *pos):
        # Everything in S + 9 = 2 * matches(taps 0..7) + [2 * match(tap 8) + 9 - real taps] but
        # the first popcount, for both values b of the codeword's bit 8: stage 1 picks the plane
        # per codeword (an address outside the pixel loop) instead of testing the bit per pixel.
        t2 = triple_rows(n, c, pos)[2]
        neg8 = (t2 >> u8(2)) & u8(1)
        real8 = masked(pos, (t2 >> u8(5)) & u8(1))  # masked rows past the image: no taps
        match8 = real8 & (neg8 ^ tirx.Cast("uint8", b) ^ u8(1))
        real = tirx.popcount(mask[(n, c, *pos)]) + real8
        # 0..11, so S + 9 stays in 0..18; masked pixel-padding rows come out at 9, S = 0.
        return match8 * u8(2) + (u8(9) - real)

    plane = te.compute(int64_shape(n_, c_, 2, *lay.plane_shape), bias, name="patch_bias")
    return neg, mask, plane


def _stage1(codes, neg, mask, plane, lay: _Layout):
    """``stage1`` (N, C, K, Ppad) uint8: every channel's biased response S + 9 to every codeword."""
    geom = lay.geom
    ow_ = geom.out_width
    # Per codeword, once per call: taps 0..7 where it is +1, and its bit 8. Read from these in
    # stage 1, each is one load per (channel, codeword) instead of a shift-and-mask chain.
    agree = te.compute(int64_shape(lay.num_codewords), lambda k: tirx.Cast("uint8", codes[k]) ^ tirx.const(0xFF, "uint8"),
                       name="code_agree")
    bit8 = te.compute(int64_shape(lay.num_codewords), lambda k: tirx.floormod(codes[k] >> 8, 2), name="code_bit8")

    def stage1(n, c, k, p):
        # S + 9 in 0..18. (rows, OW) patch planes are row-major: [p // OW, p % OW] is address p.
        pos = (p,) if lay.flat else (p // ow_, p % ow_)
        matches = tirx.popcount((neg[(n, c, *pos)] ^ agree[k]) & mask[(n, c, *pos)])
        return matches * tirx.const(2, "uint8") + plane[(n, c, bit8[k], *pos)]

    return te.compute(int64_shape(geom.batch, geom.in_channels, lay.num_codewords, lay.ppad), stage1, name="stage1")


def _stage2(s1, kernel_index, group: int, lay: _Layout):
    """``stage2_group`` (uint8 sums of G channels), ``stage2`` (widened) and ``out`` (int32, bias removed)."""
    geom = lay.geom
    n_, c_, o_, ppad = geom.batch, geom.in_channels, geom.out_channels, lay.ppad
    groups = -(-c_ // group)
    j = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", group)), name="j")

    def stage2_group(n, o, g, p):
        c = g * group + j
        if c_ % group == 0:
            return te.sum(s1[n, c, kernel_index(o, c), p], axis=j)
        # Tail group: channels past C add 0 (the clamp only keeps the load in bounds). A
        # select rather than a reduction `where`, which did not survive scheduling.
        cc = tirx.min(c, c_ - 1)
        val = s1[n, cc, kernel_index(o, cc), p]
        return te.sum(tirx.if_then_else(c < c_, val, _u8(0)), axis=j)

    part = te.compute(int64_shape(n_, o_, groups, ppad), stage2_group, name="stage2_group")
    g = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", groups)), name="g")
    acc_dtype = accumulator_dtype(c_)
    acc = te.compute(
        int64_shape(n_, o_, ppad), lambda n, o, p: te.sum(tirx.Cast(acc_dtype, part[n, o, g, p]), axis=g),
        name="stage2"
    )
    # Each real input channel added its S + 9.
    pixels = geom.out_height * geom.out_width
    return te.compute(int64_shape(n_, o_, pixels), lambda n, o, p: tirx.Cast("int32", acc[n, o, p]) - 9 * c_,
                      name="out")


def sparks_conv2d_compute(
    geom: ConvGeometry,
    num_codewords: int,
    mode: str,
    tile: int = DEFAULT_TILE,
    group: int = DEFAULT_GROUP,
    shift: bool = False,
):
    """Define the Sparks convolution.

    Parameters
    ----------
    geom : ConvGeometry
        Must have a 3x3 kernel.
    num_codewords : int
        K, the size of the layer's sub-codebook.
    mode : str
        Binarizer rule for activations (see :data:`sparks_tvm.kernels.reference.BINARIZE_MODES`).
    tile : int
        Pixel tile T: the stages before the output are computed for
        :func:`padded_pixels` pixels; pixels past ``OH*OW`` hold arbitrary in-range
        responses (0..18) and are never written out.
    group : int
        Input channels G summed in uint8 before widening (1 <= G <= 14).
    shift : bool
        Take a per-channel float32 ``shift`` (C,) added to the activations before they are
        binarized: a ``sign(x + b)`` binarizer (ReActNet's RSign) folded into the kernel.

    Returns
    -------
    list of te.Tensor
        ``[data, codes, idx, out]`` (``[data, codes, idx, shift, out]`` with ``shift``):
        data float32 (N, C, H, W); codes int32 (K,) with bit t
        set where tap t of the codeword is -1; idx the (O, C) codeword indices packed by
        :func:`pack_indices` (:func:`index_bits` per index); out int32
        (N, O, OH*OW).
    """
    _check_args(geom, tile, group)
    lay = _Layout(geom, num_codewords, tile)
    n_, c_, h_, w_ = geom.in_shape
    k_ = num_codewords
    data = te.placeholder(int64_shape(n_, c_, h_, w_), "float32", name="data")
    codes = te.placeholder(int64_shape(k_), "int32", name="codes")
    idx = te.placeholder(int64_shape(*packed_index_shape(geom.out_channels, c_, k_)), idx_dtype(k_), name="idx")
    offset = te.placeholder(int64_shape(c_), "float32", name="shift") if shift else None
    kernel_index = _kernel_indices(idx, lay)
    neg, mask, plane = _patch_planes(_binarized(data, mode, offset, lay), lay)
    out = _stage2(_stage1(codes, neg, mask, plane, lay), kernel_index, group, lay)
    return [data, codes, idx, out] if offset is None else [data, codes, idx, offset, out]


def sparks_conv2d_primfunc(
    geom: ConvGeometry,
    num_codewords: int,
    mode: str,
    tile: int = DEFAULT_TILE,
    group: int = DEFAULT_GROUP,
    shift: bool = False,
):
    """Unscheduled PrimFunc of :func:`sparks_conv2d_compute`, marked opaque for Relax fusion."""
    func = nchw_output(te.create_prim_func(sparks_conv2d_compute(geom, num_codewords, mode, tile, group, shift)),
                       geom.out_width)
    # The data-dependent gather must not be fused or inlined by Relax: keep it opaque (8).
    return func.with_attr({"op_pattern": 8, "tir.noalias": True})
