"""CUDA schedule for the dense binary convolution (:mod:`sparks_tvm.kernels.binary_conv2d`).

Four kernels; the packed activation planes are materialized once in global memory (dlight's
``Fallback`` inlines the packing into every consumer, i.e. 64 float loads per tap)::

    pack_neg, pack_mask   grid (pixel chunk, plane n*CW), 256 threads: one word per thread
    valid                 grid (pixel chunk, image), one pixel per thread, local accumulator
    mismatch + out        the main kernel:

    grid:   (image n, out-channel tile, output-row tile, output-column tile), flattened
    block:  threadIdx.x = output columns (TX), threadIdx.y = output rows (TY),
            threadIdx.z = out-channel lanes (TZ)
    acc[OR][RH][PX] = 0                                 # int32 registers
    for s in cw stages of W words:                      # serial
        __shared__ neg[W, rows, cols], mask[W, rows, cols]   # tile + halo, cooperative loads
        __shared__ wts[OR*TZ, W, KH, KW]
        __syncthreads()
        for w, dy, dx, o, r, p:                         # unrolled
            acc[o][r][p] += __popc((neg[..] ^ wts[o, w, dy, dx]) & mask[..])
        __syncthreads()
    out[n, o, y, x] = valid[n, y, x] - 2 * acc          # coalesced along x

A thread owns OR out-channels (``o = (tile*TZ + tz)*OR + i``), RH consecutive rows and PX
consecutive columns. The kernel is the ``out`` loop nest with the reduction computed at its
thread loop (``reverse_compute_at`` of ``out`` is refused: its other producer, ``valid``,
lives in another kernel). Inside an unrolled stage every shared word a thread needs is
loaded once (nvcc keeps it in a register): OR*W*KH*KW weight words (warp broadcasts) and
2*W*((RH-1)*SH+KH)*((PX-1)*SW+KW) activation words, for OR*RH*PX*W*KH*KW popcounts.
The popcount pipe (16/clk/SM) is the bound; see :func:`estimate_cycles`.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from tvm import s_tir, tirx

from sparks_tvm.kernels import binary_conv2d_primfunc
from sparks_tvm.kernels.binary_conv2d import num_words

from .target_info import CUDA_GRID_Y_LIMIT as GRID_Y_LIMIT
from .target_info import CUDA_STATIC_SHARED_BYTES, DEFAULT_SM_COUNT

#: Static shared-memory limit per block (bytes).
SHARED_BYTES = CUDA_STATIC_SHARED_BYTES
#: Threads of the pack and valid kernels.
PACK_THREADS = 256
VALID_THREADS = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GpuBinaryParams:
    """Knobs of :func:`apply_binary_gpu_schedule` (defaults from :meth:`for_layer`).

    Attributes
    ----------
    threads_x : int
        threadIdx.x extent: output columns of a block (one per thread and column register).
    cols : int
        Consecutive output columns per thread (PX).
    threads_y : int
        threadIdx.y extent: output-row lanes.
    rows : int
        Consecutive output rows per thread (RH): they share ``KH - SH`` input rows.
    out_threads : int
        threadIdx.z extent: output-channel lanes.
    out_regs : int
        Output channels per thread (OR).
    words : int
        Channel words (32 input channels each) staged in shared memory per step.
    """

    threads_x: int = 28
    cols: int = 2
    threads_y: int = 4
    rows: int = 2
    out_threads: int = 2
    out_regs: int = 4
    words: int = 1

    @property
    def threads(self) -> int:
        return self.threads_x * self.threads_y * self.out_threads

    @property
    def tile_cols(self) -> int:
        return self.threads_x * self.cols

    @property
    def tile_rows(self) -> int:
        return self.threads_y * self.rows

    @property
    def out_block(self) -> int:
        return self.out_threads * self.out_regs

    def shared_bytes(self, geom) -> int:
        kh, kw = geom.kernel
        sh, sw = geom.stride
        rows_in = min((self.tile_rows - 1) * sh + kh, geom.height + geom.padding[0] + geom.padding[2])
        cols_in = min((self.tile_cols - 1) * sw + kw, geom.width + geom.padding[1] + geom.padding[3])
        return 4 * self.words * (2 * rows_in * cols_in + self.out_block * kh * kw)

    def validate(self, geom) -> None:
        if self.threads > 1024 or self.out_threads > 64:
            raise ValueError(f"{self}: over the CUDA block limits")
        if self.shared_bytes(geom) > SHARED_BYTES:
            raise ValueError(f"{self}: needs {self.shared_bytes(geom)} bytes of shared memory, "
                             f"over the {SHARED_BYTES}-byte static limit")

    @classmethod
    def for_layer(cls, geom, sms: int = DEFAULT_SM_COUNT) -> "GpuBinaryParams":
        """Pick the knobs with the smallest :func:`estimate_cycles` on ``sms`` SMs (popcount-bound model)."""
        oh, ow, o = geom.out_height, geom.out_width, geom.out_channels
        words_total = num_words(geom.in_channels)
        taps = geom.kernel[0] * geom.kernel[1]
        best = None
        for cols in (1, 2):
            tx = min(32, _cdiv(ow, cols))
            if cols > 1 and tx * (cols - 1) >= ow:
                continue
            for rows in (1, 2, 4):
                for ty in range(1, 17):
                    if ty * rows > oh + rows - 1 or tx * ty > 256:
                        continue
                    for out_regs in (2, 4, 8):
                        out_regs = min(out_regs, o)
                        acc = out_regs * rows * cols
                        if acc > 16:
                            continue
                        for tz in (1, 2, 4, 8, 16):
                            if tx * ty * tz > 256 or (tz > 1 and tz * out_regs > o + out_regs - 1):
                                continue
                            # Unrolled stage of at most ~144 popcounts per thread (no spills).
                            words = max(1, min(words_total, 4, 144 // (taps * acc)))
                            params = cls(tx, cols, ty, rows, tz, out_regs, words)
                            while params.words > 1 and params.shared_bytes(geom) > SHARED_BYTES // 2:
                                params = cls(tx, cols, ty, rows, tz, out_regs, params.words - 1)
                            if params.shared_bytes(geom) > SHARED_BYTES:
                                continue
                            cost = (estimate_cycles(geom, params, sms), -params.threads)
                            if best is None or cost < best[0]:
                                best = (cost, params)
        return best[1]


def estimate_cycles(geom, p: GpuBinaryParams, sms: int = DEFAULT_SM_COUNT) -> float:
    """Rough SM cycles of the main kernel: per warp and stage, the larger of the popcount pipe
    (16/clk/SM), the shared-load pipe (one 32-bit warp load per clock, times bank conflicts)
    and instruction issue (4/clk/SM), plus the cooperative copy and two barriers; summed over
    all warps and spread over the SMs (at least 8 warps per SM to hide latency)."""
    kh, kw = geom.kernel
    sh, sw = geom.stride
    taps = kh * kw
    acc = p.out_regs * p.rows * p.cols
    rows_in, cols_in = (p.rows - 1) * sh + kh, (p.cols - 1) * sw + kw
    conflict = gcd(p.cols * sw, 32)
    per_word = {
        "popc": 2.0 * taps * acc,
        "lds": p.out_regs * taps + 2 * rows_in * cols_in * conflict,
        "issue": 0.25 * (3 * taps * acc + p.out_regs * taps + 2 * rows_in * cols_in),
    }
    copy_words = p.shared_bytes(geom) / 4 / p.words
    per_word_cycles = max(per_word.values()) + 0.25 * 12 * copy_words / p.threads
    stages = _cdiv(num_words(geom.in_channels), p.words)
    per_stage_fixed = 60.0  # two barriers and the exposed copy latency, per warp
    warps = _cdiv(p.threads, 32)
    blocks = (geom.batch * _cdiv(geom.out_channels, p.out_block) * _cdiv(geom.out_height, p.tile_rows)
              * _cdiv(geom.out_width, p.tile_cols))
    per_warp = stages * (p.words * per_word_cycles + per_stage_fixed)
    total_warps = blocks * warps
    return per_warp * max(total_warps / sms, 8.0) if total_warps < 8 * sms else per_warp * total_warps / sms


def _bind_planes(sch, block_name: str, threads: int) -> None:
    """Elementwise over (n, c, y, x) or reduction over (n, y, x, ...): planes on blockIdx.y."""
    blk = sch.get_sblock(block_name)
    loops = sch.get_loops(blk)
    spatial = [lp for lp, iv in zip(loops, sch.get(blk).iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
    plane_loops, pix_loops = spatial[:-2], spatial[-2:]
    planes = sch.fuse(*plane_loops) if len(plane_loops) > 1 else plane_loops[0]
    po, pi = sch.split(sch.fuse(*pix_loops), [None, threads])
    if int(sch.get(planes).extent) <= GRID_Y_LIMIT:
        sch.reorder(po, planes)
        sch.bind(planes, "blockIdx.y")
        sch.bind(po, "blockIdx.x")
    else:  # pragma: no cover - grid y is limited to 65535 planes
        sch.bind(sch.fuse(planes, po), "blockIdx.x")
    sch.bind(pi, "threadIdx.x")


def _cooperative(sch, block, depth: int, params: GpuBinaryParams) -> None:
    """Bind the copy loops of a shared cache block (below ``depth`` loops) to the whole block."""
    new = sch.get_loops(block)[depth:]
    fused = sch.fuse(*new) if len(new) > 1 else new[0]
    _, tz, ty, tx = sch.split(fused, [None, params.out_threads, params.threads_y, params.threads_x])
    sch.bind(tz, "threadIdx.z")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def apply_binary_gpu_schedule(sch, params: GpuBinaryParams):
    """Schedule :func:`~sparks_tvm.kernels.binary_conv2d.binary_conv2d_compute` in place."""
    tx, px, ty, rh = params.threads_x, params.cols, params.threads_y, params.rows
    tz, orr, wd = params.out_threads, params.out_regs, params.words

    # The epilogue's loop nest is the kernel; the reduction is computed at its thread loop
    # (reverse_compute_at of ``out`` is not allowed: its other producer, valid, is elsewhere).
    out = sch.get_sblock("out")
    n, o, oh, ow = sch.get_loops(out)
    ob, oz, oreg = sch.split(o, [None, tz, orr])
    hb, hy, hreg = sch.split(oh, [None, ty, rh])
    wb, wx, wreg = sch.split(ow, [None, tx, px])
    sch.reorder(n, ob, hb, wb, oz, hy, wx, oreg, hreg, wreg)
    sch.bind(sch.fuse(n, ob, hb, wb), "blockIdx.x")
    sch.bind(oz, "threadIdx.z")
    sch.bind(hy, "threadIdx.y")
    sch.bind(wx, "threadIdx.x")
    for loop in (oreg, hreg, wreg):
        sch.unroll(loop)

    acc = sch.get_sblock("mismatch")
    sch.set_scope(acc, 0, "local")
    sch.compute_at(acc, wx, preserve_unit_loops=True)
    an, ao, ah, aw, cw, dy, dx = sch.get_loops(acc)[4:]
    cwo, cwi = sch.split(cw, [None, wd])
    sch.reorder(cwo, cwi, dy, dx, an, ao, ah, aw)
    # Unrolled: the accumulators are registers and every shared word is loaded once per stage.
    for loop in (cwi, dy, dx, an, ao, ah, aw):
        sch.unroll(loop)

    # Stage of the tile's activation words (with halo) and weight words, per cw step.
    names = [region.source.name for region in sch.get(acc).reads]
    for name in ("pack_neg", "pack_mask", "wbits"):
        cache = sch.cache_read(acc, names.index(name), "shared", consumer_blocks=[acc])
        sch.compute_at(cache, cwo)
        _cooperative(sch, cache, 5, params)  # under (block, tz, ty, tx, cwo)

    init = sch.decompose_reduction(acc, cwo)
    for loop in sch.get_loops(init)[4:]:
        sch.unroll(loop)

    # valid[n, y, x] = sum popcount(mask): one pixel per thread, accumulated in a register.
    valid = sch.get_sblock("valid")
    sch.cache_write(valid, 0, "local")
    _bind_planes(sch, "valid", VALID_THREADS)
    vloops = sch.get_loops(valid)
    sch.reverse_compute_at(sch.get_sblock("valid_local"), vloops[2])
    vloops = sch.get_loops(valid)
    for loop in vloops[4:]:
        sch.unroll(loop)
    sch.decompose_reduction(valid, vloops[3])

    _bind_planes(sch, "pack_neg", PACK_THREADS)
    _bind_planes(sch, "pack_mask", PACK_THREADS)
    return sch


def schedule_binary_conv2d_cuda(geom, mode: str, params: GpuBinaryParams | None = None,
                                shift: bool = False, sms: int = DEFAULT_SM_COUNT) -> tirx.PrimFunc:
    """The scheduled dense binary conv for one layer (see the module docstring); ``shift`` as in
    :func:`sparks_tvm.kernels.binary_conv2d_compute`; ``sms``: the GPU's SM count (knob choice)."""
    params = params or GpuBinaryParams.for_layer(geom, sms)
    params.validate(geom)
    sch = apply_binary_gpu_schedule(s_tir.Schedule(binary_conv2d_primfunc(geom, mode, shift)), params)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
