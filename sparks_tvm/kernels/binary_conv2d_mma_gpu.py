"""Dense binary convolution on binary tensor cores (sm_80+): an implicit GEMM over ``xor.popc``.

Same op, parameters and output as :func:`sparks_tvm.kernels.binary_conv2d_compute`
(``data`` float32 NCHW, ``wbits`` from :func:`~.encoding.pack_binary_weights`, optional
per-channel ``shift``; ``out`` int32 NCHW), as a GEMM::

    M = N * OH * OW   output pixels, the batch included (rows of A: batch-aware tiles)
    N = O             output channels (columns of B)
    K = 9 * CG slots  of 32 bits, slot s = (tap t = s // CG, channel group cg = s % CG)

with 16 input channels per slot in the (neg, pos) pair encoding of :mod:`.mma_b1_gpu`, so
``out = 9 * C - popc(A xor B)`` exactly. Three kernels, one PrimFunc:

* ``act`` (N, CG, H+pad, W+pad): the binarized, zero-padded input as slot words;
* ``wslot`` (Opad, Kpad): the weights re-packed from 32-channel words into slot words;
* the GEMM: a thread block of ``warps_m x warps_n`` warps, each warp a tile of
  ``16 * tiles_m`` pixels x ``8 * tiles_n`` channels in registers, one
  ``mma.m16n8k256`` per (tile, 8 slots). A lane loads its fragment words straight from
  ``act`` (a tap is an offset in the padded image) and ``wslot``: no shared memory.

:func:`binary_conv2d_mma_reference` is the same tiling in numpy, with the tensor core
emulated (:func:`~.mma_b1_gpu.emulate_mma_b1`); it runs on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from .common import ConvGeometry
from .encoding import activation_code, num_words
from .mma_b1_gpu import D_REGS, MMA_M, MMA_N, SHAPES, WARP, KernelIR, a_fragment, b_fragment, d_fragment
from .mma_b1_gpu import emulate_mma_b1, pair_word, store, when
from .reference import binarize

#: Input channels per 32-bit slot: 16 (neg, pos) pairs.
SLOT_CHANNELS = 16
#: The instruction: 8 slots (256 bits) per MMA.
SHAPE = "m16n8k256"
A_REGS, B_REGS, SLOTS = SHAPES[SHAPE]


@dataclass(frozen=True)
class MmaBinaryParams:
    """Tiling of :func:`binary_conv2d_mma_primfunc`.

    Attributes
    ----------
    tiles_m, tiles_n : int
        16-pixel and 8-channel MMA tiles per warp (``4 * tiles_m * tiles_n`` int32 registers).
    warps_m, warps_n : int
        Warps of a thread block along pixels and channels.
    """

    tiles_m: int = 2
    tiles_n: int = 2
    warps_m: int = 2
    warps_n: int = 2

    @property
    def block_m(self) -> int:
        return MMA_M * self.tiles_m * self.warps_m

    @property
    def block_n(self) -> int:
        return MMA_N * self.tiles_n * self.warps_n

    def blocks(self, geom: ConvGeometry) -> int:
        """Thread blocks of the GEMM kernel."""
        return -(-gemm_sizes(geom)[0] // self.block_m) * -(-geom.out_channels // self.block_n)

    @classmethod
    def for_layer(cls, geom: ConvGeometry, sms: int | None = None) -> "MmaBinaryParams":
        """64 x 32 block tiles; with ``sms`` given, grids under two blocks per SM take one MMA tile
        per warp along channels, then along pixels (a rule, not a measurement)."""
        params = cls()
        for field in ("tiles_n", "tiles_m"):
            if sms is not None and params.blocks(geom) < 2 * sms:
                params = dataclasses.replace(params, **{field: 1})
        return params


def gemm_sizes(geom: ConvGeometry) -> tuple:
    """``(M, CG, slots, padded slots)`` of the layer's GEMM."""
    cg = -(-geom.in_channels // SLOT_CHANNELS)
    slots = geom.kernel[0] * geom.kernel[1] * cg
    return geom.batch * geom.out_height * geom.out_width, cg, slots, -(-slots // SLOTS) * SLOTS


def _padded(geom: ConvGeometry) -> tuple:
    top, left, bottom, right = geom.padding
    return geom.height + top + bottom, geom.width + left + right


def _pack_act_kernel(ir: KernelIR, data, shift, act, geom: ConvGeometry, mode: str) -> None:
    """``act[n, cg, y, x]``: 16 channels' (neg, pos) pairs at padded pixel (y, x); padding is 0."""
    cg_, (hp, wp) = gemm_sizes(geom)[1], _padded(geom)
    total = geom.batch * cg_ * hp * wp
    c_, top, left = geom.in_channels, geom.padding[0], geom.padding[1]
    with ir.grid({"blockIdx.x": -(-total // 256)}, {"threadIdx.x": 256}) as (bx,):
        # The code and the word in registers: an expression reused inline would be copied.
        code, word = ir.local("code", 1, "uint8"), ir.local("word", 1, "uint32")
        with ir.phase("threadIdx.x") as (tx,):
            i = bx * 256 + tx
            with when(i < total):
                x, y = i % wp, i // wp % hp
                cg, n = i // (wp * hp) % cg_, i // (wp * hp * cg_)
                word.set(0, T.uint32(0))
                with T.unroll(0, SLOT_CHANNELS) as j:
                    ch = cg * SLOT_CHANNELS + j
                    code.set(0, activation_code(data, mode, n, T.min(ch, c_ - 1), y - top, x - left, shift))
                    # Channels of the tail slot past C stay (0, 0), as in the weights.
                    real = T.Cast("uint32", ch < c_) * T.Cast("uint32", code[0] >> T.uint8(1))
                    neg = T.Cast("uint32", code[0] & T.uint8(1)) * real
                    pos_shift = T.Cast("uint32", SLOT_CHANNELS + j)
                    word.set(0, word[0] | (neg << T.Cast("uint32", j)) | ((real - neg) << pos_shift))
                store(act, word[0], n, cg, y, x)


def _pack_weight_kernel(ir: KernelIR, wbits, wslot, geom: ConvGeometry, rows: int, kpad: int) -> None:
    """``wslot[o, s]``: weights of slot s = (tap, 16 channels) as (neg, pos) pairs; 0 past O and the slots."""
    _, cg_, slots, _ = gemm_sizes(geom)
    kw, c_, o_ = geom.kernel[1], geom.in_channels, geom.out_channels
    total = rows * kpad
    with ir.grid({"blockIdx.x": -(-total // 256)}, {"threadIdx.x": 256}) as (bx,):
        with ir.phase("threadIdx.x") as (tx,):
            i = bx * 256 + tx
            with when(i < total):
                s, o = i % kpad, i // kpad
                cg = s % cg_
                t = T.min(s // cg_, geom.kernel[0] * kw - 1)
                # The real channels of this slot as a 16-bit mask (all 16 but in the tail slot).
                unused = T.Cast("uint32", T.max(SLOT_CHANNELS - (c_ - cg * SLOT_CHANNELS), 0))
                real = T.shift_right(T.uint32(0xFFFF), unused)
                w = wbits[T.min(o, o_ - 1), cg // 2, t // kw, t % kw]
                neg = T.shift_right(w, T.Cast("uint32", (cg % 2) * SLOT_CHANNELS)) & real
                word = neg | ((~neg & real) << T.uint32(SLOT_CHANNELS))
                store(wslot, T.if_then_else(T.And(o < o_, s < slots), word, T.uint32(0)), o, s)


def _a_word(act, geom: ConvGeometry, m, s):
    """Slot word of A at (pixel m, slot s): tap ``s // CG`` of channel group ``s % CG``; 0 past the slots."""
    total, cg_, slots, _ = gemm_sizes(geom)
    p_, kw = geom.out_height * geom.out_width, geom.kernel[1]
    mm = T.min(m, total - 1)  # rows past M (the last tile) read pixel M-1 and are never stored
    n, p = mm // p_, mm % p_
    t = T.min(s // cg_, geom.kernel[0] * kw - 1)
    word = act[n, s % cg_, p // geom.out_width * geom.stride[0] + t // kw, p % geom.out_width * geom.stride[1] + t % kw]
    return T.if_then_else(s < slots, word, T.uint32(0))


def _gemm_kernel(ir: KernelIR, act, wslot, out, geom: ConvGeometry, params: MmaBinaryParams) -> None:
    """The warp-tiled GEMM: fragments from global memory, ``mma.m16n8k256.xor.popc``, epilogue."""
    total, _, _, kpad = gemm_sizes(geom)
    tm, tn, wn = params.tiles_m, params.tiles_n, params.warps_n
    p_, o_, bias = geom.out_height * geom.out_width, geom.out_channels, 9 * geom.in_channels
    blocks = {"blockIdx.x": -(-total // params.block_m), "blockIdx.y": -(-o_ // params.block_n)}
    with ir.grid(blocks, {"threadIdx.x": WARP, "threadIdx.y": params.warps_m * wn}) as (bx, by):
        a, b = ir.local("frag_a", tm * A_REGS, "uint32"), ir.local("frag_b", tn * B_REGS, "uint32")
        acc = ir.local("acc", tm * tn * D_REGS, "int32")
        with ir.phase("threadIdx.y") as (warp,):
            m0 = bx * params.block_m + warp // wn * (MMA_M * tm)
            n0 = by * params.block_n + warp % wn * (MMA_N * tn)
            with ir.phase("threadIdx.x"):
                for r in range(tm * tn * D_REGS):
                    acc.set(r, T.int32(0))
            with T.serial(0, kpad // SLOTS) as kc:
                with ir.phase("threadIdx.x") as (lane,):
                    for i in range(tm):
                        for r in range(A_REGS):
                            row, slot = a_fragment(lane, r)
                            a.set(i * A_REGS + r, _a_word(act, geom, m0 + i * MMA_M + row, kc * SLOTS + slot))
                    for j in range(tn):
                        for r in range(B_REGS):
                            col, slot = b_fragment(lane, r)
                            b.set(j * B_REGS + r, wslot[n0 + j * MMA_N + col, kc * SLOTS + slot])
                    if not ir.cpu:  # on CUDA the MMA is part of the lane's code
                        _mmas(ir, a, b, acc, tm, tn)
                if ir.cpu:  # on a CPU it reads every lane's fragments
                    _mmas(ir, a, b, acc, tm, tn)
            with ir.phase("threadIdx.x") as (lane,):
                for i in range(tm):
                    for j in range(tn):
                        for r in range(D_REGS):
                            row, col = d_fragment(lane, r)
                            m, o = m0 + i * MMA_M + row, n0 + j * MMA_N + col
                            with when(T.And(m < total, o < o_)):
                                value = bias - acc[(i * tn + j) * D_REGS + r]
                                store(out, value, m // p_, o, m % p_ // geom.out_width, m % geom.out_width)


def _mmas(ir: KernelIR, a, b, acc, tm: int, tn: int) -> None:
    for i in range(tm):
        for j in range(tn):
            ir.mma(SHAPE, a, i * A_REGS, b, j * B_REGS, acc, (i * tn + j) * D_REGS)


def binary_conv2d_mma_primfunc(geom: ConvGeometry, mode: str, params: MmaBinaryParams | None = None,
                               shift: bool = False, emulate_on_cpu: bool = False):
    """The scheduled dense binary conv on binary tensor cores (see the module docstring).

    Parameters
    ----------
    geom : ConvGeometry
    mode : str
        Binarizer rule (:data:`~.encoding.BINARIZE_MODES`).
    params : MmaBinaryParams, optional
    shift : bool
        Take a per-channel float32 ``shift`` added before binarizing (as the other kernels).
    emulate_on_cpu : bool
        Build the same kernels for an LLVM target instead: threads one after another, the
        MMA a loop nest (:class:`~.mma_b1_gpu.KernelIR`). For tests.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(data, wbits[, shift], out)``, marked scheduled; for CUDA sm_80+ (or, emulated, a CPU).
    """
    geom.validate()
    params = params or MmaBinaryParams()
    _, cg_, _, kpad = gemm_sizes(geom)
    rows = -(-geom.out_channels // params.block_n) * params.block_n
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name("binary_conv2d_mma")
            data = T.arg("data", T.buffer(geom.in_shape, "float32"))
            wshape = (geom.out_channels, num_words(geom.in_channels), *geom.kernel)
            wbits = T.arg("wbits", T.buffer(wshape, "uint32"))
            offset = T.arg("shift", T.buffer((geom.in_channels,), "float32")) if shift else None
            out = T.arg("out", T.buffer(geom.out_shape, "int32"))
            act = IRBuilder.name("act", T.alloc_buffer((geom.batch, cg_, *_padded(geom)), "uint32"))
            wslot = IRBuilder.name("wslot", T.alloc_buffer((rows, kpad), "uint32"))
            _pack_act_kernel(KernelIR(emulate_on_cpu), data, offset, act, geom, mode)
            _pack_weight_kernel(KernelIR(emulate_on_cpu), wbits, wslot, geom, rows, kpad)
            _gemm_kernel(KernelIR(emulate_on_cpu), act, wslot, out, geom, params)
    return ib.get().with_attr({"tir.noalias": True, "tirx.is_scheduled": True})


def _act_words_np(a: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """numpy ``act``: (N, CG, H+pad, W+pad) slot words of binarized activations ``a`` in {-1, 0, 1}."""
    top, left, bottom, right = geom.padding
    cg_ = gemm_sizes(geom)[1]
    padded = np.zeros((geom.batch, cg_ * SLOT_CHANNELS, *_padded(geom)), np.int8)
    padded[:, :geom.in_channels, top:top + geom.height, left:left + geom.width] = a
    groups = padded.reshape(geom.batch, cg_, SLOT_CHANNELS, *padded.shape[2:]).transpose(0, 1, 3, 4, 2)
    return pair_word(groups < 0, groups != 0, SLOT_CHANNELS)


def _weight_slots_np(wbits: np.ndarray, geom: ConvGeometry, rows: int, kpad: int) -> np.ndarray:
    """numpy ``wslot`` (rows, kpad) from the 32-channel weight words, as the weight kernel builds it."""
    _, cg_, slots, _ = gemm_sizes(geom)
    out = np.zeros((rows, kpad), np.uint32)
    kw = geom.kernel[1]
    for s in range(slots):
        t, cg = divmod(s, cg_)
        real = np.uint32((1 << min(SLOT_CHANNELS, geom.in_channels - cg * SLOT_CHANNELS)) - 1)
        neg = (wbits[:, cg // 2, t // kw, t % kw] >> np.uint32((cg % 2) * SLOT_CHANNELS)) & real
        out[:geom.out_channels, s] = neg | ((~neg & real) << np.uint32(SLOT_CHANNELS))
    return out


def binary_conv2d_mma_reference(x: np.ndarray, wbits: np.ndarray, geom: ConvGeometry, mode: str,
                                params: MmaBinaryParams | None = None, shift: np.ndarray | None = None) -> np.ndarray:
    """The kernel's computation in numpy, tile by tile and lane by lane, the MMA emulated.

    Same inputs as the kernel (``wbits`` from :func:`~.encoding.pack_binary_weights`), same
    encoding, the same fragment index arithmetic (:func:`~.mma_b1_gpu.a_fragment` and
    friends, evaluated on lane numbers) and the same blocks and warps; only the tensor core
    is replaced by :func:`~.mma_b1_gpu.emulate_mma_b1`. Returns int32 (N, O, OH, OW).
    """
    params = params or MmaBinaryParams()
    total, cg_, slots, kpad = gemm_sizes(geom)
    rows = -(-geom.out_channels // params.block_n) * params.block_n
    a = binarize(x if shift is None else x + shift[None, :, None, None], mode)
    act = _act_words_np(a, geom)
    wslot = _weight_slots_np(wbits, geom, rows, kpad)
    p_, ow_, kw = geom.out_height * geom.out_width, geom.out_width, geom.kernel[1]
    lane = np.arange(WARP)

    def a_word(m, s):  # _a_word, on arrays
        n, p = np.minimum(m, total - 1) // p_, np.minimum(m, total - 1) % p_
        t = np.minimum(s // cg_, geom.kernel[0] * kw - 1)
        word = act[n, s % cg_, p // ow_ * geom.stride[0] + t // kw, p % ow_ * geom.stride[1] + t % kw]
        return np.where(s < slots, word, 0).astype(np.uint32)

    out = np.zeros((geom.batch, geom.out_channels, p_), np.int64)
    for bx in range(-(-total // params.block_m)):
        for by in range(rows // params.block_n):
            for warp in range(params.warps_m * params.warps_n):
                m0 = bx * params.block_m + warp // params.warps_n * (MMA_M * params.tiles_m)
                n0 = by * params.block_n + warp % params.warps_n * (MMA_N * params.tiles_n)
                for i in range(params.tiles_m):
                    for j in range(params.tiles_n):
                        acc = np.zeros((WARP, D_REGS), np.int32)
                        for kc in range(kpad // SLOTS):
                            frag_a = np.stack([a_word(m0 + i * MMA_M + a_fragment(lane, r)[0],
                                                      kc * SLOTS + a_fragment(lane, r)[1]) for r in range(A_REGS)], 1)
                            frag_b = np.stack([wslot[n0 + j * MMA_N + b_fragment(lane, r)[0],
                                                     kc * SLOTS + b_fragment(lane, r)[1]] for r in range(B_REGS)], 1)
                            acc = emulate_mma_b1(SHAPE, frag_a, frag_b, acc)
                        for r in range(D_REGS):
                            row, col = d_fragment(lane, r)
                            m, o = m0 + i * MMA_M + row, n0 + j * MMA_N + col
                            ok = (m < total) & (o < geom.out_channels)
                            out[m[ok] // p_, o[ok], m[ok] % p_] = 9 * geom.in_channels - acc[ok, r]
    return out.reshape(geom.out_shape).astype(np.int32)
