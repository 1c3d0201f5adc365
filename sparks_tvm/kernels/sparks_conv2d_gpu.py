"""The Sparks convolution laid out for GPUs: stage-1 responses packed four pixels to a word.

Same op as :mod:`sparks_tvm.kernels.sparks_conv2d` (same parameters and output), computed
in a form that suits a GPU thread, which has 32-bit registers and no byte vectors:

* ``row_bits`` (N, C, H+pad, 2) uint64: each padded input row binarized into two bit words
  (taps holding -1; taps holding a real +-1), for rows of up to 64 columns; wider inputs use
  ``bin_pad`` (N, C, H+pad, W+pad) uint8 2-bit codes instead.
* ``patch`` (N, C, P) uint32 holds, per input channel and output pixel, the 3x3 patch's
  ``neg`` bits (0-8), its ``mask`` bits (9-17) and ``popcount(mask) + 9`` (bits 18-22).
  One word per pixel, so stage 1 reads one coalesced word and needs one ``__popc``.
* ``stage1`` (N, C, K, P/4) uint32 packs the biased responses ``S + 9`` (0..18) of four
  consecutive pixels into the four bytes of a word.
* ``stage2_part`` sums the gathered words of ``G`` input channels with plain 32-bit adds:
  with the +9 bias no byte goes negative, and ``G * 18 <= 252`` keeps every byte from
  carrying into its neighbour (SIMD within a register). One load and one add move four
  pixels.
* ``stage2`` widens each partial word into two words of 16-bit lanes (even and odd bytes),
  which hold up to 65535: ``18 * C`` fits for ``C <= 3640``; wider layers use four 32-bit
  lanes.
* ``out`` extracts each pixel's lane and removes the bias, ``9 * C``.

Channels of the tail group past C add 0 (not 9), so the bias is exact. Pixels past
``OH*OW`` (the padding of the last pixel tile) are computed from a clamped row and never
written.
"""

from __future__ import annotations

from tvm import te, tirx

from .common import ConvGeometry, activation_code, int64_shape, nchw_output
from .sparks_conv2d import codeword_index, idx_dtype, index_bits, packed_index_shape

#: Pixels per stage-1 word (one byte each).
LANES = 4
#: Largest channel group whose biased byte sums cannot carry: 14 * 18 = 252 <= 255.
MAX_GROUP = 14
#: Widest layer whose sums fit 16-bit lanes: 18 * C <= 65535.
MAX_C_16BIT = 65535 // 18
#: Padded input rows up to this width are packed into one 64-bit word per plane.
ROW_BITS = 64


def padded_words(geom: ConvGeometry, tile_words: int) -> int:
    """Stage-1 words per (channel, codeword) row: the pixels rounded up to whole tiles."""
    words = -(-geom.out_height * geom.out_width // LANES)
    return -(-words // tile_words) * tile_words


def sparks_conv2d_gpu_compute(geom: ConvGeometry, num_codewords: int, mode: str, tile_words: int = 32, group: int = 8,
                              splits: int = 1, shift: bool = False):
    """Define the Sparks convolution in the packed-byte GPU form.

    Parameters
    ----------
    geom : ConvGeometry
        Must have a 3x3 kernel.
    num_codewords : int
        K.
    mode : str
        Binarizer rule (see :data:`sparks_tvm.kernels.reference.BINARIZE_MODES`).
    tile_words : int
        Stage-1 words (``4 * tile_words`` pixels) per pixel tile; the pixel axis is padded
        to whole tiles so that a schedule needs no bounds checks inside a tile.
    group : int
        Input channels G summed with byte-lane adds before widening (1 <= G <= 14).
    splits : int
        Channel splits S, dividing the channel groups: ``stage2`` holds S partial sums per
        pixel, each over its own contiguous share of the groups, and ``out`` adds them. A
        schedule can then run the splits in separate thread blocks (split-K), for grids that
        are too small otherwise (batch 1, deep layers).
    shift : bool
        Take a per-channel float32 ``shift`` (C,) added to the activations before they are
        binarized (a ``sign(x + b)`` binarizer folded into the kernel, as on CPUs): on a GPU
        at batch 1 the separate add was a ~3 us kernel launch per layer.

    Returns
    -------
    list of te.Tensor
        ``[data, codes, idx, out]`` (``[data, codes, idx, shift, out]`` with ``shift``) with
        the same meaning, types and shapes as :func:`sparks_tvm.kernels.sparks_conv2d_compute`.
    """
    groups = _check_args(geom, tile_words, group, splits)
    n_, c_, h_, w_ = geom.in_shape
    o_, k_ = geom.out_channels, num_codewords
    words = padded_words(geom, tile_words)
    shp = int64_shape
    data = te.placeholder(shp(n_, c_, h_, w_), "float32", name="data")
    codes = te.placeholder(shp(k_), "int32", name="codes")
    idx = te.placeholder(shp(*packed_index_shape(o_, c_, k_)), idx_dtype(k_), name="idx")
    offset = te.placeholder(shp(c_), "float32", name="shift") if shift else None
    kernel_index = _kernel_indices(idx, geom, k_, groups * group)
    patch = _patch_words(data, mode, offset, geom, words)
    s1 = _stage1(patch, codes, geom, k_, words)
    out = _stage2(s1, kernel_index, geom, group, groups, splits, words)
    return [data, codes, idx, out] if offset is None else [data, codes, idx, offset, out]


def _u32(v):
    return tirx.const(v, "uint32")


def _check_args(geom: ConvGeometry, tile_words: int, group: int, splits: int) -> int:
    """Validate the arguments; return the number of channel groups."""
    geom.validate()
    if tuple(geom.kernel) != (3, 3):
        raise ValueError(f"the Sparks op needs 3x3 kernels, got {geom.kernel}")
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"byte-lane channel group must be in [1, {MAX_GROUP}], got {group}")
    if tile_words < 1:
        raise ValueError(f"tile_words must be positive, got {tile_words}")
    groups = -(-geom.in_channels // group)
    if splits < 1 or groups % splits:
        raise ValueError(f"channel splits must divide the {groups} channel groups of {group}, got {splits}")
    return groups


def _kernel_indices(idx, geom: ConvGeometry, num_codewords: int, cpad: int):
    """``kernel_index(o, c)`` read from ``idx_unpack`` (O, cpad): one byte (two past K = 256) per kernel.

    Rows are padded to whole channel groups (``cpad``): a thread then loads a group's indices
    of one output channel as a single aligned vector. Padding entries are 0 and their channels
    are masked out in stage 2.
    """
    o_, c_ = geom.out_channels, geom.in_channels
    field_bits = index_bits(num_codewords)

    def unpack(o, c):
        cc = tirx.min(c, c_ - 1)
        if field_bits >= 8:
            value = idx[o, cc]
        else:
            per = 8 // field_bits
            value = (idx[o, cc // per] >> tirx.Cast(idx.dtype, (cc % per) * field_bits)) & tirx.const(
                (1 << field_bits) - 1, idx.dtype)
        return tirx.if_then_else(c < c_, value, tirx.const(0, idx.dtype))

    unpacked = te.compute(int64_shape(o_, cpad), unpack, name="idx_unpack")
    return lambda o, c: codeword_index(unpacked[o, c], num_codewords)


def _patch_words(data, mode: str, offset, geom: ConvGeometry, words: int):
    """``patch`` (N, C, 4 * words) uint32: neg bits 0-8, mask bits 9-17, popcount(mask) + 9 at 18-22.

    Built from the binarized, zero-padded input (bit 0 = -1, bit 1 = holds a real +-1), one
    float compare per activation, so the words need no bounds checks: built straight from the
    floats (18 guarded loads per pixel) they took 5x longer than the fused kernel on an H200;
    from byte codes (``bin_pad``), 0.7x; from row words (``row_bits``), less.
    """
    n_, c_ = geom.batch, geom.in_channels
    oh_, ow_ = geom.out_height, geom.out_width
    sh, sw = geom.stride
    top, left = geom.padding[0], geom.padding[1]
    hp = geom.height + geom.padding[0] + geom.padding[2]
    wp = geom.width + geom.padding[1] + geom.padding[3]
    u32 = _u32

    def pad_code(n, c, y, x):  # (y, x) in the padded frame
        return activation_code(data, mode, n, c, y - top, x - left, offset)

    def finish(word):
        # valid + 9 stored with the word, so stage 1 needs one popcount per codeword. The +9
        # is there for every pixel, also one whose taps are all zero or padding (S = 0).
        return word | ((tirx.Cast("uint32", tirx.popcount(word >> u32(9))) + u32(9)) << u32(18))

    if wp <= ROW_BITS:
        # Each padded input row as two 64-bit words (-1 taps, real taps), bit x = column x: a
        # pixel's three taps of a row are then one shift and mask of a word, whatever the stride.
        rx = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", wp)), name="rx")
        rows = te.compute(
            int64_shape(n_, c_, hp, 2),
            lambda n, c, y, plane: te.sum(
                tirx.Cast("uint64", (pad_code(n, c, y, rx) >> tirx.Cast("uint8", plane)) & tirx.const(1, "uint8"))
                << tirx.Cast("uint64", rx), axis=rx),
            name="row_bits",
        )

        def patch_word(n, c, p):
            oh, ow = tirx.min(p // ow_, oh_ - 1), p % ow_
            shift = tirx.Cast("uint64", ow * sw)
            word = u32(0)
            for dy in range(3):
                for plane in range(2):
                    taps = tirx.Cast("uint32", (rows[n, c, oh * sh + dy, plane] >> shift) & tirx.const(7, "uint64"))
                    word = word | (taps << u32(9 * plane + 3 * dy))
            return finish(word)
    else:
        bits = te.compute(int64_shape(n_, c_, hp, wp), pad_code, name="bin_pad")

        def patch_word(n, c, p):
            # Pixels past OH*OW (tile padding) read a clamped row and are never written out.
            oh, ow = tirx.min(p // ow_, oh_ - 1), p % ow_
            word = u32(0)
            for t in range(9):
                dy, dx = divmod(t, 3)
                b = tirx.Cast("uint32", bits[n, c, oh * sh + dy, ow * sw + dx])
                word = word | ((b & u32(1)) << u32(t)) | ((b >> u32(1)) << u32(9 + t))
            return finish(word)

    return te.compute(int64_shape(n_, c_, words * LANES), patch_word, name="patch")


def _stage1(patch, codes, geom: ConvGeometry, num_codewords: int, words: int):
    """``stage1`` (N, C, K, words) uint32: biased responses S + 9 of four pixels, one per byte."""
    u32 = _u32

    def stage1(n, c, k, q):
        code = tirx.Cast("uint32", codes[k])
        biased = u32(0)
        mismatches = u32(0)
        for lane in range(LANES):
            w = patch[n, c, q * LANES + lane]
            biased = biased | ((w >> u32(18)) << u32(8 * lane))
            diff = tirx.Cast("uint32", tirx.popcount((w ^ code) & (w >> u32(9)) & u32(0x1FF)))
            mismatches = mismatches | (diff << u32(8 * lane))
        # Byte-wise (valid + 9) - 2 * mismatches = S + 9 in [0, 18]: no byte borrows, so one
        # word subtraction does all four (and ``biased`` does not depend on the codeword).
        return biased - mismatches * u32(2)

    return te.compute(int64_shape(geom.batch, geom.in_channels, num_codewords, words), stage1, name="stage1")


def _stage2(s1, kernel_index, geom: ConvGeometry, group: int, groups: int, splits: int, words: int):
    """``stage2_part`` (byte-lane sums of G channels), ``stage2`` (16- or 32-bit lanes, per split), ``out``."""
    n_, c_, o_ = geom.batch, geom.in_channels, geom.out_channels
    u32 = _u32
    j = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", group)), name="j")

    def part(n, o, g, q):
        c = g * group + j
        if c_ % group == 0:
            return te.sum(s1[n, c, kernel_index(o, c), q], axis=j)
        cc = tirx.min(c, c_ - 1)
        return te.sum(tirx.if_then_else(c < c_, s1[n, cc, kernel_index(o, c), q], u32(0)), axis=j)

    parts = te.compute(int64_shape(n_, o_, groups, words), part, name="stage2_part")
    halves = 2 if c_ <= MAX_C_16BIT else LANES
    lane_mask = u32(0x00FF00FF if halves == 2 else 0xFF)
    per_split = groups // splits
    g = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", per_split)), name="g")

    def widen(n, o, group_index, h, q):
        return (parts[n, o, group_index, q] >> tirx.Cast("uint32", h * 8)) & lane_mask

    if splits == 1:
        acc = te.compute(int64_shape(n_, o_, halves, words),
                         lambda n, o, h, q: te.sum(widen(n, o, g, h, q), axis=g), name="stage2")
    else:
        acc = te.compute(int64_shape(n_, o_, splits, halves, words),
                         lambda n, o, s, h, q: te.sum(widen(n, o, s * per_split + g, h, q), axis=g), name="stage2")

    def extract(n, o, p):
        lane = p % LANES
        total = None
        for s in range(splits):
            at = (n, o) if splits == 1 else (n, o, s)
            if halves == 2:
                field = (acc[(*at, lane % 2, p // LANES)] >> tirx.Cast("uint32", (lane // 2) * 16)) & u32(0xFFFF)
            else:
                field = acc[(*at, lane, p // LANES)]
            field = tirx.Cast("int32", field)
            total = field if total is None else total + field
        return total - tirx.const(9 * c_, "int32")

    return te.compute(int64_shape(n_, o_, geom.out_height * geom.out_width), extract, name="out")


def sparks_conv2d_gpu_primfunc(geom: ConvGeometry, num_codewords: int, mode: str, tile_words: int = 32, group: int = 8,
                               splits: int = 1, shift: bool = False):
    """Unscheduled PrimFunc of :func:`sparks_conv2d_gpu_compute`, opaque to Relax fusion."""
    compute = sparks_conv2d_gpu_compute(geom, num_codewords, mode, tile_words, group, splits, shift)
    func = nchw_output(te.create_prim_func(compute), geom.out_width)
    return func.with_attr({"op_pattern": 8, "tir.noalias": True})
