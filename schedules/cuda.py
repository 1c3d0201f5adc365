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

Inside a warp every thread reads the same codeword row (same ``o``) at consecutive words,
so the gather is conflict-free in shared memory and the index load is a broadcast. The
packed patch words (``patch``) and the tau-bit index unpacking are separate elementwise
kernels over global memory.

The dense binary conv keeps dlight's GPU ``Fallback`` mapping (one thread per output,
``__popc`` on 32-bit channel words): it is the comparison baseline, not the product.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx

#: Output-channel lanes of a thread block (threadIdx.y).
OUT_THREADS = 8
#: Budget for the shared stage-1 block, in 32-bit words (32 KB, under the 48 KB static limit).
SHARED_WORDS = 8192


@dataclass(frozen=True)
class GpuSparksParams:
    """Knobs of :func:`apply_sparks_gpu_schedule` (their defaults come from :meth:`for_layer`).

    Attributes
    ----------
    tile_words : int
        Stage-1 words per thread block = threadIdx.x extent (4 pixels each).
    group : int
        Input channels per shared stage-1 block (and per byte-lane partial sum); divides
        ``OUT_THREADS`` so that each thread writes stage 1 of one channel for every codeword.
    out_regs : int
        Output channels per thread (registers); ``OUT_THREADS * out_regs`` per block.
    """

    tile_words: int = 32
    group: int = 8
    out_regs: int = 8

    @classmethod
    def for_layer(cls, geom, num_codewords: int) -> "GpuSparksParams":
        pixels = geom.out_height * geom.out_width
        # Small images (7x7, 14x14) would leave most of a 128-pixel tile empty.
        tile_words = 32 if pixels >= 4 * 32 * 2 else 16
        # A power of two dividing OUT_THREADS, and no wider than the layer.
        group = 8
        while group > 1 and group > geom.in_channels:
            group //= 2
        while group > 1 and group * num_codewords * tile_words > SHARED_WORDS:
            group //= 2
        while tile_words > 1 and group * num_codewords * tile_words > SHARED_WORDS:
            tile_words //= 2
        # Enough output-channel blocks to fill the GPU when the batch and image are small.
        out_regs = max(1, min(8, -(-geom.out_channels // OUT_THREADS)))
        return cls(tile_words, group, out_regs)


def _bind_elementwise(sch, block_name: str, threads: int = 256) -> None:
    blk = sch.get_sblock(block_name)
    fused = sch.fuse(*sch.get_loops(blk))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def apply_sparks_gpu_schedule(sch, params: GpuSparksParams):
    """Schedule :func:`~sparks_tvm.kernels.sparks_conv2d_gpu.sparks_conv2d_gpu_compute` in place.

    ``sch`` must hold the function built with ``params.tile_words`` and ``params.group``.
    """
    tw, ot, orr = params.tile_words, OUT_THREADS, params.out_regs
    acc = sch.get_sblock("stage2")
    n, o, h, q, g = sch.get_loops(acc)
    qb, qt = sch.split(q, [None, tw])
    ob, oy, oreg = sch.split(o, [None, ot, orr])
    sch.reorder(n, ob, qb, oy, qt, g, oreg, h)
    sch.bind(sch.fuse(n, ob, qb), "blockIdx.x")
    sch.bind(oy, "threadIdx.y")
    sch.bind(qt, "threadIdx.x")
    sch.set_scope(acc, 0, "local")
    # Unrolled so that the per-thread accumulators are registers, not local memory.
    sch.unroll(oreg)
    sch.unroll(h)

    # compute_at drops unit loops (a one-channel group, a one-word tile), so the loops it
    # creates are taken by position below the anchor, not assumed.
    part = sch.get_sblock("stage2_part")
    sch.compute_at(part, oreg)
    sch.set_scope(part, 0, "local")
    j_loops = sch.get_loops(part)[5:]  # below (block, oy, x, g, oreg)
    if j_loops:
        sch.unroll(j_loops[0])
        sch.decompose_reduction(part, j_loops[0])

    # Stage 1 of one channel group into shared memory, written by the whole thread block.
    s1 = sch.get_sblock("stage1")
    sch.set_scope(s1, 0, "shared")
    sch.compute_at(s1, g)
    new = sch.get_loops(s1)[4:]  # below (block, oy, x, g): (c, k, x), c absent for G = 1
    if len(new) == 3:
        c, k, x = new
        sch.reorder(k, c, x)
        kc = sch.fuse(k, c)
    elif len(new) == 2:
        kc, x = new
    else:  # pragma: no cover - K >= 2 and tile_words >= 2 always give both loops
        raise RuntimeError(f"unexpected stage-1 loop nest ({len(new)} loops) for {params}")
    kc_o, kc_t = sch.split(kc, [None, ot])
    sch.bind(kc_t, "threadIdx.y")
    sch.bind(x, "threadIdx.x")
    sch.unroll(kc_o)

    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, qt)
    for loop in sch.get_loops(out)[-2:]:
        sch.unroll(loop)
    init = sch.decompose_reduction(acc, g)
    for loop in sch.get_loops(init)[-2:]:
        sch.unroll(loop)

    _bind_elementwise(sch, "bin_pad")
    _bind_elementwise(sch, "patch")
    try:
        _bind_elementwise(sch, "idx_unpack")
    except Exception:  # noqa: BLE001 - no such block: indices stored a byte each (tau = 8)
        pass
    return sch


class CudaSchedules:
    """Kernel builders for CUDA targets.

    Parameters
    ----------
    target : tvm.target.Target
        The CUDA target (thread limits come from it).
    """

    name = "cuda"

    def __init__(self, target):
        self.target = target

    @classmethod
    def for_target(cls, target) -> "CudaSchedules":
        return cls(target)

    def sparks_params(self, geom, num_codewords: int) -> GpuSparksParams:
        return GpuSparksParams.for_layer(geom, num_codewords)

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, params: GpuSparksParams | None = None):
        """The fused Sparks kernel for one layer (see the module docstring)."""
        from sparks_tvm.kernels.sparks_conv2d_gpu import sparks_conv2d_gpu_primfunc

        params = params or self.sparks_params(geom, num_codewords)
        func = sparks_conv2d_gpu_primfunc(geom, num_codewords, mode, params.tile_words, params.group)
        sch = apply_sparks_gpu_schedule(s_tir.Schedule(func), params)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)

    def _map(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        from tvm.s_tir import dlight

        with self.target:
            sch = dlight.gpu.Fallback().apply(func, self.target, False)
        if sch is None:  # pragma: no cover - Fallback maps every kernel we build
            raise RuntimeError("dlight's GPU fallback could not map the kernel")
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)

    def schedule_binary_conv2d(self, geom, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import binary_conv2d_primfunc

        return self._map(binary_conv2d_primfunc(geom, mode))
