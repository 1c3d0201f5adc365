"""CUDA schedules for the binary kernels.

The Sparks op runs as one fused kernel (plus two small preparation kernels) built on
:mod:`sparks_tvm.kernels.sparks_conv2d_gpu`, where a stage-1 word carries four pixels::

    grid:   (image n, output-channel block, pixel tile of 4*TW pixels)
    block:  threadIdx.x = stage-1 word of the tile (TW), threadIdx.y = OT output-channel lanes
    for g in channel groups of G:                       # serial
        __shared__ stage1[G, K, TW]                     # __popc, written cooperatively
        __syncthreads()
        for o in the thread's OR output channels:       # registers
            part = sum_j stage1[j, idx[o, g*G + j], x]  # 32-bit adds move 4 pixels
            acc[o] += widen(part)                       # two words of 16-bit lanes
    out[n, o, 4x:4x+4] = acc - 9*C                       # int32, coalesced

Small grids (batch 1) take smaller blocks, and layers of 128+ input channels split those
channels among blocks (split-K, ``GpuSparksParams.splits``): each block then stores its
partial sums, and a second elementwise kernel adds the splits and writes ``out``.

Inside a warp every thread reads the same codeword row (same ``o``) at consecutive words,
so the gather is conflict-free in shared memory and the index load is a broadcast. The
packed patch words (``patch``) and the tau-bit index unpacking are separate elementwise
kernels over global memory.

The dense binary conv (the comparison baseline) has its own tiled schedule in
:mod:`schedules.cuda_binary`.

Binary tensor cores (sm_80+, issue 24): :mod:`sparks_tvm.kernels.sparks_conv2d_mma_gpu`
(stage 1 as ``mma.sync.m16n8k128.b1.xor.popc``, stage 2 in byte lanes, pixel tiles across
the batch) and :mod:`sparks_tvm.kernels.binary_conv2d_mma_gpu` (the dense conv as an implicit
GEMM on ``mma.sync.m16n8k256.b1.xor.popc``). :class:`CudaSchedules` picks them on sm_80+
targets when asked (``binary_mma=True`` or ``SPARKS_CUDA_BINARY_MMA=1``); older targets, and
layers they cannot take, keep the kernels above. They are not the default yet: they are exact
on the CPU with the tensor core emulated, and have not run on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from tvm import s_tir, tirx

from sparks_tvm.kernels.binary_conv2d_mma_gpu import MmaBinaryParams, binary_conv2d_mma_primfunc
from sparks_tvm.kernels.sparks_conv2d_gpu import sparks_conv2d_gpu_primfunc
from sparks_tvm.kernels.sparks_conv2d_mma_gpu import MmaSparksParams, sparks_conv2d_mma_primfunc

from .cuda_binary import GpuBinaryParams, schedule_binary_conv2d_cuda
from .target_info import CUDA_GRID_Y_LIMIT, DEFAULT_SM_COUNT, TargetInfo

#: Environment switch for the binary tensor-core kernels ("1": use them on sm_80+ targets).
MMA_ENV = "SPARKS_CUDA_BINARY_MMA"
#: Whether sm_80+ targets get the tensor-core kernels when nothing asks. Off until they have
#: been run exactly on a GPU (issue 24): so far only their CPU emulation has.
MMA_BY_DEFAULT = False

#: Budget for the shared stage-1 block, in 32-bit words (32 KB, under the 48 KB static limit).
SHARED_WORDS = 8192
#: Grids of fewer thread blocks than this take the small-grid knobs
#: (:meth:`GpuSparksParams.for_small_grid`): about two waves on a 132-SM H100. Other GPUs scale
#: it by their SM count (:meth:`GpuSparksParams.for_layer`).
SMALL_GRID_BLOCKS = 256
#: Small grids over at least this many channel groups split their input channels among blocks
#: (:meth:`GpuSparksParams.for_small_grid`).
SPLIT_MIN_GROUPS = 16


@dataclass(frozen=True)
class GpuSparksParams:
    """Knobs of :func:`apply_sparks_gpu_schedule` (defaults from :meth:`for_layer`).

    Attributes
    ----------
    threads_x : int
        threadIdx.x extent: threads along the pixel tile.
    vec : int
        Stage-1 words per thread (4 pixels each), read as one vector: a gathered row costs
        one index load and one shared load per ``4 * vec`` pixels.
    out_threads : int
        threadIdx.y extent: output-channel lanes of a block.
    out_regs : int
        Output channels per thread (register accumulators).
    group : int
        Input channels per shared stage-1 block (and per byte-lane partial sum).
    splits : int
        Thread blocks sharing one output tile, each over its own share of the input channels
        (split-K); a second, elementwise kernel adds their partial sums. Must divide the
        channel groups.
    """

    threads_x: int = 32
    vec: int = 2
    out_threads: int = 8
    out_regs: int = 8
    group: int = 8
    splits: int = 1

    @property
    def tile_words(self) -> int:
        return self.threads_x * self.vec

    @property
    def out_block(self) -> int:
        return self.out_threads * self.out_regs

    def shared_words(self, num_codewords: int) -> int:
        return self.group * num_codewords * self.tile_words

    def validate(self, num_codewords: int) -> None:
        if self.threads_x * self.out_threads > 1024:
            raise ValueError(f"{self}: more than 1024 threads per block")
        if self.shared_words(num_codewords) > SHARED_WORDS:
            raise ValueError(f"{self}: stage 1 needs {4 * self.shared_words(num_codewords)} bytes of shared memory "
                             f"at K={num_codewords}, over the {4 * SHARED_WORDS}-byte budget")

    @classmethod
    def for_layer(cls, geom, num_codewords: int, sms: int = DEFAULT_SM_COUNT) -> "GpuSparksParams":
        """Default knobs for a layer on a GPU of ``sms`` SMs (the small-grid threshold scales with it)."""
        words = -(-geom.out_height * geom.out_width // 4)
        # Narrow tiles for small images: a 7x7 output is 13 words, a 14x14 one 49.
        # Measured on an H200 (benchmarks/results/cuda_layers.md, variants): one word per
        # thread beats two once the image has 128+ words (more, smaller blocks in flight).
        threads_x, vec = (32, 1) if words >= 256 else (16, 1) if words >= 128 else (16, 2) if words >= 32 else (16, 1)
        group = 8
        while group > 1 and group > geom.in_channels:
            group //= 2
        while group > 1 and group * num_codewords * threads_x * vec > SHARED_WORDS:
            group //= 2
        while vec > 1 and group * num_codewords * threads_x * vec > SHARED_WORDS:
            vec //= 2
        while threads_x > 1 and group * num_codewords * threads_x * vec > SHARED_WORDS:
            threads_x //= 2
        out_threads, out_regs = 8, 8
        if geom.out_channels >= 256:
            # Wide layers: 128 output channels per block halves the stage-1 recomputation per
            # output-channel block (measured 1.1-1.2x on the H200 over 64 per block).
            out_threads, out_regs = (8, 16) if words >= 32 else (16, 8)
        elif words >= 256:
            threads_x = 16  # 56x56: smaller blocks measured 1.1x faster
        out_regs = max(1, min(out_regs, -(-geom.out_channels // out_threads)))
        params = cls(threads_x, vec, out_threads, out_regs, group)
        if params.blocks(geom) < SMALL_GRID_BLOCKS * sms // DEFAULT_SM_COUNT:
            params = params.for_small_grid(geom)
        return params

    def blocks(self, geom) -> int:
        """Thread blocks in the fused kernel's grid: images x output-channel blocks x pixel tiles."""
        words = -(-geom.out_height * geom.out_width // 4)
        return geom.batch * -(-geom.out_channels // self.out_block) * -(-words // self.tile_words) * self.splits

    def for_small_grid(self, geom) -> "GpuSparksParams":
        """Smaller blocks for grids that would leave most of the GPU idle (batch 1, deep layers).

        The knobs above were chosen at batch 64. At batch 1 they give 4 to 49 blocks, and each
        block runs all the input channels one after another. Two output channels per thread and,
        on images under 128 words, 8-word pixel tiles, gave 1.2x-2.3x on every ResNet-18 layer
        at batch 1 (NVIDIA H100, ``benchmarks/results/cuda_b1_variants.md``). Each extra
        output-channel block recomputes its tile's stage 1, which the idle SMs absorb. Layers
        of 128+ input channels then also split them among blocks
        (``benchmarks/results/cuda_b1_splits.md``, ``cuda_b4_b16_splits.md``).
        """
        words = -(-geom.out_height * geom.out_width // 4)
        if words < 128:
            threads_x, vec, out_threads = 8, 1, self.out_threads
        else:
            threads_x, vec, out_threads = self.threads_x, 1, 16
        out_regs = max(1, min(2, -(-geom.out_channels // out_threads)))
        params = dataclasses.replace(self, threads_x=threads_x, vec=vec, out_threads=out_threads, out_regs=out_regs)
        groups = -(-geom.in_channels // self.group)
        if groups < SPLIT_MIN_GROUPS:
            return params
        # Deep layers: split the input channels among 8 blocks (split-K; 4 or 2 where 8 does not
        # divide the groups), four output channels per thread. On the H100, at batch 1, 4 and
        # 16, this was the best or within 9% of the best of 2/4/8 splits x 2/4 channels per
        # thread on every 128+ channel ResNet-18 layer, 1.2x-2.6x faster than not splitting. On
        # 64-channel layers every split was slower (8 groups leave too little work per block).
        out_regs = max(1, min(4, -(-geom.out_channels // out_threads)))
        for splits in (8, 4, 2):
            if groups % splits == 0:
                return dataclasses.replace(params, out_regs=out_regs, splits=splits)
        return params


def _bind_elementwise(sch, block_name: str, threads: int = 256) -> None:
    blk = sch.get_sblock(block_name)
    fused = sch.fuse(*sch.get_loops(blk))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


#: Pixels of one (image, channel) plane per patch-packing block.
PATCH_PIXELS = 256
#: CUDA's limit on gridDim.y; more (image, channel) planes go on blockIdx.x with the pixels.
GRID_Y_LIMIT = CUDA_GRID_Y_LIMIT


def _schedule_patch(sch) -> None:
    """Patch words per block of PATCH_PIXELS pixels of one (image, channel) plane.

    The block first binarizes the input rows its pixels touch into shared memory (one float
    compare per activation, the 2-bit codes never go to global memory), then packs each
    pixel's nine taps from there. Planes go on blockIdx.y, so no thread divides a flat
    index by the plane size (as one flat elementwise kernel per stage did, spending most of
    its time on index arithmetic).
    """
    pb = sch.get_sblock("patch")
    try:
        rows = sch.get_sblock("row_bits")
    except Exception:  # noqa: BLE001 - inputs wider than 64 columns: byte codes in shared memory
        rows = None
    if rows is not None:
        _schedule_row_bits(sch, rows)
    anchor = _bind_planes(sch, pb)
    if rows is not None:
        return
    bp = sch.get_sblock("bin_pad")
    sch.set_scope(bp, 0, "shared")
    sch.compute_at(bp, anchor)
    # bin_pad's own loops are those below the anchor (its rows and columns in this block).
    above = len(sch.get_loops(pb)) - 1
    fused = sch.fuse(*sch.get_loops(bp)[above:])
    _, ti = sch.split(fused, [None, PATCH_PIXELS])
    sch.bind(ti, "threadIdx.x")


def _bind_planes(sch, block):
    """Bind an (n, c, p) block: planes on blockIdx.y (grid y holds up to 65535), pixel chunks
    on blockIdx.x, PATCH_PIXELS threads. Returns the innermost block-level loop."""
    n, c, p = sch.get_loops(block)
    po, pi = sch.split(p, [None, PATCH_PIXELS])
    planes = sch.fuse(n, c)
    if int(sch.get(planes).extent) <= GRID_Y_LIMIT:
        sch.reorder(po, planes)
        sch.bind(planes, "blockIdx.y")
        sch.bind(po, "blockIdx.x")
        anchor = planes
    else:
        anchor = sch.fuse(planes, po)
        sch.bind(anchor, "blockIdx.x")
    sch.bind(pi, "threadIdx.x")
    return anchor


def _schedule_row_bits(sch, rows) -> None:
    """One thread per (plane, row, bit plane): a serial OR over the row's columns in a register."""
    acc = sch.cache_write(rows, 0, "local")
    n, c, y, plane, _ = sch.get_loops(rows)
    fused = sch.fuse(n, c, y, plane)
    bx, tx = sch.split(fused, [None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(acc, tx)
    # Unrolled: the row's loads are independent, only the OR chain is serial.
    sch.unroll(sch.get_loops(rows)[-1])
    sch.decompose_reduction(rows, sch.get_loops(rows)[-1])


def _gpu_stage2(sch, params: GpuSparksParams):
    """The fused kernel's grid and threads, its register accumulators and the gathered partial sums.

    Returns ``(stage2 block, channel-group loop, thread-x loop, write-back block or None)``.
    """
    tx, vec, ty, orr = params.threads_x, params.vec, params.out_threads, params.out_regs
    acc = sch.get_sblock("stage2")
    loops = sch.get_loops(acc)
    split = len(loops) == 6  # (n, o, split, h, q, g): the kernel was built with channel splits
    n, o, *s, h, q, g = loops
    qb, qt, qv = sch.split(q, [None, tx, vec])
    ob, oy, oreg = sch.split(o, [None, ty, orr])
    sch.reorder(n, ob, *s, qb, oy, qt, g, oreg, h, qv)
    sch.bind(sch.fuse(n, ob, *s, qb), "blockIdx.x")
    sch.bind(oy, "threadIdx.y")
    sch.bind(qt, "threadIdx.x")
    if split:
        # Partial sums accumulate in registers and go to global memory once per thread; the
        # splits of a pixel are added by `out`, a second kernel.
        write_back = sch.cache_write(acc, 0, "local")
    else:
        write_back = None
        sch.set_scope(acc, 0, "local")
    # Unrolled so that the per-thread accumulators are registers, not local memory.
    for loop in (oreg, h, qv):
        sch.unroll(loop)

    # compute_at drops unit loops (a one-channel group, one word per thread), so the loops it
    # creates are found by position below the anchor, not assumed.
    part = sch.get_sblock("stage2_part")
    sch.compute_at(part, oreg)
    sch.set_scope(part, 0, "local")
    # The group's codeword indices of this output channel: one aligned vector load into
    # registers (group bytes), instead of a dependent byte load before every gather.
    names = [region.source.name for region in sch.get(part).reads]
    idx_local = sch.cache_read(part, names.index("idx_unpack"), "local")
    sch.compute_at(idx_local, oreg)
    idx_loops = sch.get_loops(idx_local)[5:]
    if idx_loops:
        sch.vectorize(idx_loops[-1])
    below = sch.get_loops(part)[5:]  # under (block, oy, x, g, oreg): (qv, j), either may be absent
    if vec > 1:
        if len(below) == 2:  # (qv, j) -> (j, qv): the vector words innermost
            sch.reorder(*below[::-1])
        below = sch.get_loops(part)[5:]
        sch.vectorize(below[-1])  # the vec words of a gathered row: one shared vector load
        below = below[:-1]
    if below:
        sch.unroll(below[0])
        sch.decompose_reduction(part, below[0])
    return acc, g, qt, write_back


def _gpu_stage1(sch, params: GpuSparksParams, g) -> None:
    """Stage 1 of one channel group into shared memory, written by the whole thread block."""
    tx, ty = params.threads_x, params.out_threads
    s1 = sch.get_sblock("stage1")
    sch.set_scope(s1, 0, "shared")
    sch.compute_at(s1, g)
    new = sch.get_loops(s1)[4:]  # under (block, oy, x, g): (c, k, x), c absent for G = 1
    if len(new) == 3:
        c, k, x = new
        sch.reorder(k, c, x)
        kc = sch.fuse(k, c)
    elif len(new) == 2:
        kc, x = new
    else:  # pragma: no cover - K >= 2 and tile_words >= 2 always give both loops
        raise RuntimeError(f"unexpected stage-1 loop nest ({len(new)} loops) for {params}")
    kc_o, kc_t = sch.split(kc, [None, ty])
    # Word x = xo * tx + threadIdx.x: consecutive threads write consecutive words.
    xo, xt = sch.split(x, [None, tx])
    sch.reorder(kc_o, kc_t, xo, xt)
    sch.bind(kc_t, "threadIdx.y")
    sch.bind(xt, "threadIdx.x")
    sch.unroll(kc_o)
    sch.unroll(xo)


def apply_sparks_gpu_schedule(sch, params: GpuSparksParams):
    """Schedule :func:`~sparks_tvm.kernels.sparks_conv2d_gpu.sparks_conv2d_gpu_compute` in place.

    ``sch`` must hold the function built with ``params.tile_words`` and ``params.group``.
    """
    acc, g, qt, write_back = _gpu_stage2(sch, params)
    _gpu_stage1(sch, params, g)
    if write_back is not None:  # channel splits: `out` adds them, as its own kernel
        sch.reverse_compute_at(write_back, qt)
        for loop in sch.get_loops(write_back)[3:]:  # under (block, oy, x): (oreg, h, qv)
            sch.unroll(loop)
        _bind_elementwise(sch, "out")
    else:
        out = sch.get_sblock("out")
        sch.reverse_compute_at(out, qt)
        for loop in sch.get_loops(out)[-2:]:
            sch.unroll(loop)
    init = sch.decompose_reduction(acc, g)
    for loop in sch.get_loops(init)[-3:]:
        sch.unroll(loop)

    _schedule_patch(sch)
    _bind_elementwise(sch, "idx_unpack")
    return sch


class CudaSchedules:
    """Kernel builders for CUDA targets.

    Parameters
    ----------
    target : tvm.target.Target
        The CUDA target (thread limits, architecture; SM count and shared memory from the
        device when it is the target's, see :class:`~schedules.target_info.TargetInfo`).
    binary_mma : bool, optional
        Use the binary tensor-core kernels where the target has them (sm_80+). Default: the
        ``SPARKS_CUDA_BINARY_MMA`` environment variable, else :data:`MMA_BY_DEFAULT`.
    """

    name = "cuda"

    def __init__(self, target, binary_mma: bool | None = None):
        self.target = target
        self.info = TargetInfo.from_target(target)
        if binary_mma is None:
            binary_mma = os.environ.get(MMA_ENV, "1" if MMA_BY_DEFAULT else "0").lower() in ("1", "true", "on", "yes")
        #: The tensor-core kernels are used: asked for, and the target has binary tensor cores.
        self.binary_mma = bool(binary_mma) and self.info.binary_mma

    @classmethod
    def for_target(cls, target) -> "CudaSchedules":
        return cls(target)

    #: The kernels can take a per-channel shift of their input (``shift=True``): the binarizer's
    #: ``x + b`` is then no separate kernel launch.
    folds_shift = True

    def sparks_params(self, geom, num_codewords: int) -> GpuSparksParams:
        """The fused SIMT kernel's default knobs for this GPU (its SM count)."""
        return GpuSparksParams.for_layer(geom, num_codewords, self.info.sm_count)

    def mma_sparks_params(self, geom, num_codewords: int) -> MmaSparksParams | None:
        """Knobs of the tensor-core Sparks kernel for this layer, or None where it is not used."""
        if not self.binary_mma or tuple(geom.kernel) != (3, 3):
            return None
        params = MmaSparksParams.for_layer(geom, num_codewords, self.info.sm_count, self.info.shared_bytes)
        try:
            params.validate(geom, num_codewords, self.info.shared_bytes)
        except ValueError:  # e.g. 3641+ channels (16-bit lanes) or a codebook too large to share
            return None
        return params

    def mma_binary_params(self, geom) -> MmaBinaryParams | None:
        """Knobs of the tensor-core dense binary kernel, or None where it is not used."""
        return MmaBinaryParams.for_layer(geom, self.info.sm_count) if self.binary_mma else None

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, params=None, shift: bool = False):
        """The Sparks kernel for one layer: tensor-core stage 1 where selected, else the fused kernel."""
        mma = params if isinstance(params, MmaSparksParams) else None
        if params is None:
            mma = self.mma_sparks_params(geom, num_codewords)
        if mma is not None:
            func = sparks_conv2d_mma_primfunc(geom, num_codewords, mode, mma, shift)
            return func.with_attr("op_pattern", 8)
        params = params or self.sparks_params(geom, num_codewords)
        params.validate(num_codewords)
        func = sparks_conv2d_gpu_primfunc(geom, num_codewords, mode, params.tile_words, params.group, params.splits,
                                          shift)
        sch = apply_sparks_gpu_schedule(s_tir.Schedule(func), params)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)

    def schedule_binary_conv2d(self, geom, mode: str, params=None, shift: bool = False) -> tirx.PrimFunc:
        """The dense binary conv: the tensor-core GEMM where selected, else channel-packed words
        staged in shared memory (schedules.cuda_binary)."""
        mma = params if isinstance(params, MmaBinaryParams) else None
        if params is None:
            mma = self.mma_binary_params(geom)
        if mma is not None:
            return binary_conv2d_mma_primfunc(geom, mode, mma, shift).with_attr("op_pattern", 8)
        return schedule_binary_conv2d_cuda(geom, mode, params, shift, self.info.sm_count)

    def binary_params(self, geom) -> GpuBinaryParams:
        """The dense binary conv's default knobs for this GPU (its SM count)."""
        return GpuBinaryParams.for_layer(geom, self.info.sm_count)
