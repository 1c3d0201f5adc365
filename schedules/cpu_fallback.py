"""A default CPU schedule for the ops stock TVM leaves unscheduled (elementwise, pooling).

``tvm.compile`` on an LLVM target runs no schedule rule: every fused elementwise function
(the BatchNorm/PReLU/residual-add/binarizer chains between the binary convs) is a serial,
scalar loop nest. This rule follows dlight's ``ScheduleRule`` contract, like its GPU
``Fallback``: inline what can be inlined, then for each remaining block fuse the spatial
loops, vectorize the innermost machine vector and run the rest in parallel.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

#: Below this many output elements a parallel launch costs more than it saves.
MIN_PARALLEL_ELEMENTS = 8192


class InjectiveFallback(CPUScheduleRule):
    """Parallel + vectorized loops for spatial (and simple reduction) blocks.

    Parameters
    ----------
    vector_bytes : int
        Vector register width; the vectorized inner loop covers one register.
    """

    def __init__(self, vector_bytes: int = 64):
        self.vector_bytes = vector_bytes

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):  # noqa: D102 - ScheduleRule API
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        reductions = []
        for info in infos:
            block = info.block_rv
            s_loops, r_loops, o_loops = [], [], []
            for loop, kind in zip(sch.get_loops(block), info.dom_kind()):
                {"S": s_loops, "R": r_loops, "O": o_loops}[kind].append(loop)
            if o_loops or not s_loops or not all(isinstance(sch.get(l).extent, tirx.IntImm) for l in s_loops):
                continue
            total = 1
            for loop in s_loops:
                total *= int(sch.get(loop).extent)
            # Vectorize the innermost spatial axis itself (not a fused one): its accesses stay
            # affine, so they become contiguous vector loads instead of div/mod gathers.
            outer, inner = s_loops[:-1], s_loops[-1]
            sch.reorder(*outer, *r_loops, inner)
            lanes = self._lanes(sch, block)
            width = int(sch.get(inner).extent)
            if lanes > 1 and width > lanes and width % lanes == 0:
                io, inner = sch.split(inner, [None, lanes])
                if not r_loops:
                    outer = outer + [io]
                sch.vectorize(inner)
            elif lanes > 1 and 1 < width <= 4 * lanes:
                sch.vectorize(inner)
            if outer and total >= MIN_PARALLEL_ELEMENTS:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            if r_loops:
                reductions.append((block, r_loops[0]))
        for block, loop in reductions:
            sch.decompose_reduction(block, loop)
        return sch

    def _lanes(self, sch, block) -> int:
        writes = sch.get(block).writes
        if len(writes) != 1:
            return 1
        region = writes[0]
        buffer = region.buffer if hasattr(region, "buffer") else region.source
        bits = tvm.DataType(buffer.dtype).bits
        return max(1, self.vector_bytes * 8 // bits)
