"""The Sparks convolution with stage 1 on binary tensor cores (sm_80+) and stage 2 in byte lanes.

Same op, parameters and output as :mod:`.sparks_conv2d_gpu` (``data``, ``codes``, ``idx``,
optional ``shift``; ``out`` int32 NCHW). Two kernels in one PrimFunc:

* ``patch`` (N, C, OH*OW) uint32: each output pixel's 3x3 patch of one channel as nine
  (neg, pos) pairs, neg at bits 0-8, pos at 9-17 (:mod:`.mma_b1_gpu`; 0 and padding are
  (0, 0)). With a codeword ``B = neg bits | pos bits << 9``, ``S = 9 - popc(patch xor B)``.
* the fused kernel, over tiles of ``16 * tiles_m`` output pixels that run across images
  (the pixel axis is ``N * OH * OW``: at batch 64 a 7x7 layer still fills whole tiles)::

      block: (pixel tile, output-channel block); warps x 32 lanes
      for each group of G input channels:                              # serial
          __shared__ s1[G, Kpad, tile] uint8 = S + 9                    # stage 1
              one mma.m16n8k128.xor.popc per (channel, 16 pixels, 8 codewords), warps
              taking turns; lanes 0-3 of a group carry the 18 bits, the others zeros
          __syncthreads()
          thread (o, 4 pixels): part = sum_j s1word[j, idx[o, c], q]   # 4 pixels per add
          acc_lo += part & 0x00FF00FF; acc_hi += (part >> 8) & 0x00FF00FF
          __syncthreads()
      out = 16-bit lane of acc - 9 * C

  Stage 2 is SIMD within a 32-bit register (the ``__vadd4`` idea with plain adds): the +9
  bias keeps bytes non-negative and ``G * 18 <= 252`` keeps them from carrying.

Stage 1 uses 18 of the instruction's 128 bits: the smallest m16n8 binary shape, since a
response needs only its own 9 taps (packing more channels into K would sum them).

:func:`sparks_conv2d_mma_reference` is the same tiling in numpy, the MMA emulated; it runs
on a CPU. Nothing here has run on a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from .common import ConvGeometry
from .encoding import activation_code, codeword_index, codes_to_bits, index_bits, packed_index_shape
from .encoding import idx_dtype, pack_indices, unpack_indices
from .mma_b1_gpu import D_REGS, MMA_M, MMA_N, SHAPES, WARP, KernelIR, a_fragment, b_fragment, d_fragment
from .mma_b1_gpu import emulate_mma_b1, store, when
from .reference import binarize

SHAPE = "m16n8k128"
A_REGS, B_REGS, _ = SHAPES[SHAPE]
#: Largest channel group whose biased byte sums cannot carry: 14 * 18 = 252.
MAX_GROUP = 14
#: Widest layer whose sums fit 16-bit lanes: 18 * C <= 65535.
MAX_CHANNELS = 65535 // 18
#: Static shared memory per block (bytes).
SHARED_BYTES = 48 * 1024


@dataclass(frozen=True)
class MmaSparksParams:
    """Tiling of :func:`sparks_conv2d_mma_primfunc`.

    Attributes
    ----------
    tiles_m : int
        16-pixel MMA tiles per pixel tile (``16 * tiles_m`` pixels, ``4 * tiles_m`` words).
    warps : int
        Warps per block.
    out_regs : int
        Output channels per thread in stage 2.
    group : int
        Input channels per shared stage-1 block (1..14).
    """

    tiles_m: int = 4
    warps: int = 4
    out_regs: int = 8
    group: int = 8

    @property
    def tile(self) -> int:
        return MMA_M * self.tiles_m

    @property
    def out_lanes(self) -> int:
        return WARP * self.warps // (self.tile // 4)

    @property
    def out_block(self) -> int:
        return self.out_lanes * self.out_regs

    def shared_bytes(self, num_codewords: int) -> int:
        return self.group * padded_codewords(num_codewords) * self.tile

    def blocks(self, geom: ConvGeometry) -> int:
        """Thread blocks of the fused kernel: pixel tiles (across images) x output-channel blocks."""
        total = geom.batch * geom.out_height * geom.out_width
        return -(-total // self.tile) * -(-geom.out_channels // self.out_block)

    def validate(self, geom: ConvGeometry, num_codewords: int, shared_bytes: int = SHARED_BYTES) -> None:
        """Raise ``ValueError`` where the kernel cannot be exact or cannot launch."""
        if not 1 <= self.group <= MAX_GROUP:
            raise ValueError(f"{self}: channel group must be in [1, {MAX_GROUP}] (byte lanes would carry)")
        if (WARP * self.warps) % (self.tile // 4) or self.warps * WARP > 1024:
            raise ValueError(f"{self}: the block's threads must cover whole pixel tiles, at most 1024")
        if geom.in_channels > MAX_CHANNELS:
            raise ValueError(f"{geom.in_channels} input channels overflow the 16-bit lanes (max {MAX_CHANNELS})")
        if self.shared_bytes(num_codewords) > shared_bytes:
            raise ValueError(f"{self}: {self.shared_bytes(num_codewords)} bytes of shared stage 1 at K={num_codewords}, "
                             f"over {shared_bytes}")

    @classmethod
    def for_layer(cls, geom: ConvGeometry, num_codewords: int, sms: int | None = None,
                  shared_bytes: int = SHARED_BYTES) -> "MmaSparksParams":
        """Defaults for a layer on a GPU of ``sms`` SMs with ``shared_bytes`` of shared memory per block.

        64-pixel tiles, 4 warps, the largest channel group (at most 8) whose stage 1 fits. With
        ``sms`` given, grids of fewer than two blocks per SM take fewer output channels per
        thread, then smaller pixel tiles (a rule, not a measurement: nothing here has run).
        """
        group = max(1, min(8, geom.in_channels, shared_bytes // (padded_codewords(num_codewords) * 64)))
        params = cls(group=group, out_regs=max(1, min(8, -(-geom.out_channels // 8))))
        while sms is not None and params.blocks(geom) < 2 * sms:
            if params.out_regs > 2:
                params = dataclasses.replace(params, out_regs=params.out_regs // 2)
            elif params.tiles_m > 1:
                params = dataclasses.replace(params, tiles_m=params.tiles_m // 2)
            elif params.out_regs > 1:
                params = dataclasses.replace(params, out_regs=1)
            else:
                break
        return params


def padded_codewords(num_codewords: int) -> int:
    """K rounded up to whole 8-column MMA tiles."""
    return -(-num_codewords // MMA_N) * MMA_N


def _patch_kernel(ir: KernelIR, data, shift, patch, geom: ConvGeometry, mode: str) -> None:
    """``patch[n, c, p]``: nine (neg, pos) pairs of the pixel's 3x3 patch (neg bits 0-8, pos 9-17)."""
    p_ = geom.out_height * geom.out_width
    total = geom.batch * geom.in_channels * p_
    top, left = geom.padding[0], geom.padding[1]
    with ir.grid({"blockIdx.x": -(-total // 256)}, {"threadIdx.x": 256}) as (bx,):
        code, word = ir.local("code", 1, "uint8"), ir.local("word", 1, "uint32")
        with ir.phase("threadIdx.x") as (tx,):
            i = bx * 256 + tx
            with when(i < total):
                p, c, n = i % p_, i // p_ % geom.in_channels, i // (p_ * geom.in_channels)
                oh, ow = p // geom.out_width, p % geom.out_width
                word.set(0, T.uint32(0))
                for t in range(9):
                    y, x = oh * geom.stride[0] + t // 3 - top, ow * geom.stride[1] + t % 3 - left
                    code.set(0, activation_code(data, mode, n, c, y, x, shift))
                    neg = T.Cast("uint32", code[0] & T.uint8(1))
                    pos = T.Cast("uint32", code[0] >> T.uint8(1)) - neg  # a -1 is also "nonzero"
                    word.set(0, word[0] | (neg << T.uint32(t)) | (pos << T.uint32(9 + t)))
                store(patch, word[0], n, c, p)


def _kernel_index(idx, geom: ConvGeometry, num_codewords: int, o, c):
    """Codeword index of kernel (o, c), unpacked from the tau-bit fields and forced into [0, K)."""
    bits = index_bits(num_codewords)
    oo, cc = T.min(o, geom.out_channels - 1), T.min(c, geom.in_channels - 1)
    if bits >= 8:
        value = idx[oo, cc]
    else:
        per = 8 // bits
        value = T.shift_right(idx[oo, cc // per], T.Cast("uint8", cc % per * bits)) & T.uint8((1 << bits) - 1)
    return codeword_index(value, num_codewords)


def _stage1(ir: KernelIR, patch, codes, s1, geom: ConvGeometry, num_codewords: int, params: MmaSparksParams, m0,
            g0, regs) -> None:
    """Stage 1 of one channel group into shared memory: one MMA per (channel, 16 pixels, 8 codewords)."""
    kp, tm = padded_codewords(num_codewords), params.tiles_m
    tasks = params.group * tm * kp // MMA_N
    with ir.phase("threadIdx.y") as (warp,):
        with T.serial(0, -(-tasks // params.warps)) as it:
            task = it * params.warps + warp  # the warps take turns over (channel, pixel tile, codeword tile)
            with when(task < tasks):
                with ir.phase("threadIdx.x") as (lane,):
                    _stage1_fragments(patch, codes, geom, num_codewords, params, m0, g0, task, lane, regs)
                    if not ir.cpu:  # on CUDA the MMA is part of the lane's code
                        ir.mma(SHAPE, regs["a"], 0, regs["b"], 0, regs["d"], 0)
                if ir.cpu:  # on a CPU it reads every lane's fragments
                    ir.mma(SHAPE, regs["a"], 0, regs["b"], 0, regs["d"], 0)
                with ir.phase("threadIdx.x") as (lane,):
                    j, mt, kt = task // (tm * kp // MMA_N), task // (kp // MMA_N) % tm, task % (kp // MMA_N)
                    for r in range(D_REGS):
                        row, col = d_fragment(lane, r)
                        # S + 9 = 18 - popc: 0..18, a byte.
                        store(s1, T.Cast("uint8", 18 - regs["d"][r]),
                              (j * kp + kt * MMA_N + col) * params.tile + mt * MMA_M + row)


def _stage1_fragments(patch, codes, geom: ConvGeometry, num_codewords: int, params: MmaSparksParams, m0, g0, task,
                      lane, regs) -> None:
    """A lane's fragments of one stage-1 MMA: lanes 0-3 of each group hold the 18 bits, the rest 0."""
    total, p_ = geom.batch * geom.out_height * geom.out_width, geom.out_height * geom.out_width
    kp, tm = padded_codewords(num_codewords), params.tiles_m
    j, mt, kt = task // (tm * kp // MMA_N), task // (kp // MMA_N) % tm, task % (kp // MMA_N)
    c = T.min(g0 * params.group + j, geom.in_channels - 1)  # tail channels: computed, never summed
    for r in range(A_REGS):
        row, slot = a_fragment(lane, r)
        m = T.min(m0 + mt * MMA_M + row, total - 1)  # pixels past M: computed, never stored
        regs["a"].set(r, T.if_then_else(slot == 0, patch[m // p_, c, m % p_], T.uint32(0)))
    col, slot = b_fragment(lane, 0)
    k = kt * MMA_N + col
    neg = T.Cast("uint32", codes[T.min(k, num_codewords - 1)]) & T.uint32(0x1FF)
    word = neg | ((~neg & T.uint32(0x1FF)) << T.uint32(9))
    regs["b"].set(0, T.if_then_else(T.And(slot == 0, k < num_codewords), word, T.uint32(0)))
    for r in range(D_REGS):
        regs["d"].set(r, T.int32(0))


def _stage2(idx, s1w, acc, part, geom: ConvGeometry, num_codewords: int, params: MmaSparksParams, o0, g0,
            q) -> None:
    """Gather-add the group's responses for the thread's output channels, 4 pixels per 32-bit add."""
    kp, words = padded_codewords(num_codewords), params.tile // 4
    for r in range(params.out_regs):
        part.set(0, T.uint32(0))
        for j in range(params.group):
            c = g0 * params.group + j
            kidx = _kernel_index(idx, geom, num_codewords, o0 + r, c)
            value = s1w[(j * kp + kidx) * words + q]
            if geom.in_channels % params.group:  # the tail group's channels past C add nothing
                value = T.if_then_else(c < geom.in_channels, value, T.uint32(0))
            part.set(0, part[0] + value)
        acc.set(2 * r, acc[2 * r] + (part[0] & T.uint32(0x00FF00FF)))
        acc.set(2 * r + 1, acc[2 * r + 1] + (T.shift_right(part[0], T.uint32(8)) & T.uint32(0x00FF00FF)))


def _fused_kernel(ir: KernelIR, patch, codes, idx, out, geom: ConvGeometry, num_codewords: int,
                  params: MmaSparksParams) -> None:
    """Both stages per (pixel tile, output-channel block), looping over channel groups."""
    total, p_ = geom.batch * geom.out_height * geom.out_width, geom.out_height * geom.out_width
    kp, words, group = padded_codewords(num_codewords), params.tile // 4, params.group
    blocks = {"blockIdx.x": -(-total // params.tile), "blockIdx.y": -(-geom.out_channels // params.out_block)}
    with ir.grid(blocks, {"threadIdx.x": WARP, "threadIdx.y": params.warps}) as (bx, by):
        s1 = ir.shared("stage1", group * kp * params.tile, "uint8")
        s1w = ir.view("stage1_words", s1, group * kp * words, "uint32")  # 4 pixels to a word in stage 2
        regs = {"a": ir.local("frag_a", A_REGS, "uint32"), "b": ir.local("frag_b", B_REGS, "uint32"),
                "d": ir.local("acc_s1", D_REGS, "int32")}
        acc, part = ir.local("acc", 2 * params.out_regs, "uint32"), ir.local("part", 1, "uint32")

        def thread_tile(warp, lane):  # (pixel word q, first output channel) of a stage-2 thread
            tid = warp * WARP + lane
            return tid % words, by * params.out_block + tid // words * params.out_regs

        with ir.phase("threadIdx.y", "threadIdx.x"):
            for r in range(2 * params.out_regs):
                acc.set(r, T.uint32(0))
        with T.serial(0, -(-geom.in_channels // group)) as g0:
            _stage1(ir, patch, codes, s1, geom, num_codewords, params, bx * params.tile, g0, regs)
            ir.barrier()
            with ir.phase("threadIdx.y", "threadIdx.x") as (warp, lane):
                _stage2(idx, s1w, acc, part, geom, num_codewords, params, thread_tile(warp, lane)[1], g0,
                        thread_tile(warp, lane)[0])
            ir.barrier()  # before the next group overwrites stage 1
        with ir.phase("threadIdx.y", "threadIdx.x") as (warp, lane):
            q, o0 = thread_tile(warp, lane)
            for r in range(params.out_regs):
                for px in range(4):  # pixel 4q + px: acc_lo (even px) / acc_hi (odd), 16 bits each
                    m, o = bx * params.tile + 4 * q + px, o0 + r
                    field = T.shift_right(acc[2 * r + px % 2], T.uint32(16 * (px // 2))) & T.uint32(0xFFFF)
                    with when(T.And(m < total, o < geom.out_channels)):
                        store(out, T.Cast("int32", field) - 9 * geom.in_channels, m // p_, o,
                              m % p_ // geom.out_width, m % geom.out_width)


def sparks_conv2d_mma_primfunc(geom: ConvGeometry, num_codewords: int, mode: str,
                               params: MmaSparksParams | None = None, shift: bool = False,
                               emulate_on_cpu: bool = False):
    """The scheduled Sparks conv with binary tensor-core stage 1 (see the module docstring).

    Parameters
    ----------
    geom : ConvGeometry
        3x3 kernel.
    num_codewords : int
        K.
    mode : str
        Binarizer rule (:data:`~.encoding.BINARIZE_MODES`).
    params : MmaSparksParams, optional
        Default :meth:`MmaSparksParams.for_layer`.
    shift : bool
        Take a per-channel float32 ``shift`` added before binarizing.
    emulate_on_cpu : bool
        Build the same kernels for an LLVM target instead: threads one after another between
        barriers, the MMA a loop nest (:class:`~.mma_b1_gpu.KernelIR`). For tests.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(data, codes, idx[, shift], out)``, marked scheduled; for CUDA sm_80+ (or, emulated,
        a CPU).
    """
    geom.validate()
    if tuple(geom.kernel) != (3, 3):
        raise ValueError(f"the Sparks op needs 3x3 kernels, got {geom.kernel}")
    params = params or MmaSparksParams.for_layer(geom, num_codewords)
    params.validate(geom, num_codewords)
    p_ = geom.out_height * geom.out_width
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name("sparks_conv2d_mma")
            data = T.arg("data", T.buffer(geom.in_shape, "float32"))
            codes = T.arg("codes", T.buffer((num_codewords,), "int32"))
            ishape = packed_index_shape(geom.out_channels, geom.in_channels, num_codewords)
            idx = T.arg("idx", T.buffer(ishape, idx_dtype(num_codewords)))
            offset = T.arg("shift", T.buffer((geom.in_channels,), "float32")) if shift else None
            out = T.arg("out", T.buffer(geom.out_shape, "int32"))
            patch = IRBuilder.name("patch", T.alloc_buffer((geom.batch, geom.in_channels, p_), "uint32"))
            _patch_kernel(KernelIR(emulate_on_cpu), data, offset, patch, geom, mode)
            _fused_kernel(KernelIR(emulate_on_cpu), patch, codes, idx, out, geom, num_codewords, params)
    return ib.get().with_attr({"tir.noalias": True, "tirx.is_scheduled": True})


def _patch_words_np(a: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """numpy ``patch`` (N, C, P) from binarized activations ``a`` in {-1, 0, 1}."""
    top, left, bottom, right = geom.padding
    padded = np.pad(a, ((0, 0), (0, 0), (top, bottom), (left, right)))
    sh, sw = geom.stride
    word = np.zeros((geom.batch, geom.in_channels, geom.out_height, geom.out_width), np.uint32)
    for t in range(9):
        tap = padded[:, :, t // 3::sh, t % 3::sw][:, :, :geom.out_height, :geom.out_width]
        word |= ((tap < 0).astype(np.uint32) << t) | ((tap > 0).astype(np.uint32) << (9 + t))
    return word.reshape(geom.batch, geom.in_channels, -1)


def _stage1_np(patch, bwords, geom, num_codewords, params, m0, g0):
    """numpy stage 1 of one block and channel group: the (group, Kpad, tile) bytes, MMA emulated."""
    total, p_ = geom.batch * geom.out_height * geom.out_width, geom.out_height * geom.out_width
    kp, lane = padded_codewords(num_codewords), np.arange(WARP)
    s1 = np.zeros(params.group * kp * params.tile, np.uint8)
    tasks = params.group * params.tiles_m * kp // MMA_N
    for task in range(tasks):  # the warp that takes a task does not change what it computes
        j, mt, kt = task // (params.tiles_m * kp // MMA_N), task // (kp // MMA_N) % params.tiles_m, task % (kp // MMA_N)
        c = min(g0 * params.group + j, geom.in_channels - 1)
        frag_a = np.zeros((WARP, A_REGS), np.uint32)
        for r in range(A_REGS):
            row, slot = a_fragment(lane, r)
            m = np.minimum(m0 + mt * MMA_M + row, total - 1)
            frag_a[:, r] = np.where(slot == 0, patch[m // p_, c, m % p_], 0)
        col, slot = b_fragment(lane, 0)
        k = kt * MMA_N + col
        frag_b = np.where((slot == 0) & (k < num_codewords), bwords[np.minimum(k, num_codewords - 1)], 0)
        acc = emulate_mma_b1(SHAPE, frag_a, frag_b[:, None].astype(np.uint32), np.zeros((WARP, D_REGS), np.int32))
        for r in range(D_REGS):
            row, col = d_fragment(lane, r)
            s1[(j * kp + kt * MMA_N + col) * params.tile + mt * MMA_M + row] = 18 - acc[:, r]
    return s1


def sparks_conv2d_mma_reference(x: np.ndarray, codebook: np.ndarray, idx: np.ndarray, geom: ConvGeometry, mode: str,
                                params: MmaSparksParams | None = None, shift: np.ndarray | None = None) -> np.ndarray:
    """The kernel's computation in numpy: same tiles, byte layout, lane arithmetic; MMA emulated.

    ``codebook`` (K, 3, 3) in {-1, +1}, ``idx`` (O, C) codeword indices; the packed ``codes``
    and ``idx`` the kernel takes are made here as the graph makes them. Returns int32 NCHW.
    """
    k_ = codebook.shape[0]
    params = params or MmaSparksParams.for_layer(geom, k_)
    params.validate(geom, k_)
    total, p_ = geom.batch * geom.out_height * geom.out_width, geom.out_height * geom.out_width
    patch = _patch_words_np(binarize(x if shift is None else x + shift[None, :, None, None], mode), geom)
    neg = codes_to_bits(codebook).astype(np.uint32) & 0x1FF
    bwords = neg | ((~neg & 0x1FF) << 9)
    from_packed = unpack_indices(pack_indices(idx, k_), k_, geom.in_channels) % k_  # what the kernel unpacks
    kp, words = padded_codewords(k_), params.tile // 4
    tid = np.arange(WARP * params.warps)
    q, lanes_o = tid % words, tid // words
    out = np.zeros((geom.batch, geom.out_channels, p_), np.int64)
    for bx in range(-(-total // params.tile)):
        for by in range(-(-geom.out_channels // params.out_block)):
            o0 = by * params.out_block + lanes_o * params.out_regs
            acc = np.zeros((len(tid), 2 * params.out_regs), np.uint32)
            for g0 in range(-(-geom.in_channels // params.group)):
                s1w = _stage1_np(patch, bwords, geom, k_, params, bx * params.tile, g0).view(np.uint32)
                for r in range(params.out_regs):
                    part = np.zeros(len(tid), np.uint32)
                    for j in range(params.group):
                        c = g0 * params.group + j
                        if c < geom.in_channels:
                            kidx = from_packed[np.minimum(o0 + r, geom.out_channels - 1), c]
                            part += s1w[(j * kp + kidx) * words + q]
                    acc[:, 2 * r] += part & 0x00FF00FF
                    acc[:, 2 * r + 1] += (part >> 8) & 0x00FF00FF
            for r in range(params.out_regs):
                for px in range(4):
                    m, o = bx * params.tile + 4 * q + px, o0 + r
                    field = (acc[:, 2 * r + px % 2] >> (16 * (px // 2))) & 0xFFFF
                    ok = (m < total) & (o < geom.out_channels)
                    out[m[ok] // p_, o[ok], m[ok] % p_] = field[ok].astype(np.int64) - 9 * geom.in_channels
    return out.reshape(geom.out_shape).astype(np.int32)
