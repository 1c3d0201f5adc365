"""A default CPU schedule for the ops stock TVM leaves unscheduled (elementwise, pooling).

``tvm.compile`` on an LLVM target runs no schedule rule: every fused elementwise function
(the BatchNorm/PReLU/residual-add/binarizer chains between the binary convs) is a serial,
scalar loop nest. This rule follows dlight's ``ScheduleRule`` contract, like its GPU
``Fallback``: inline what can be inlined, then for each remaining block fuse the spatial
loops, vectorize the innermost machine vector and run the rest in parallel.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

#: Below this many output elements a parallel launch costs more than it saves.
MIN_PARALLEL_ELEMENTS = 8192


class InjectiveFallback(CPUScheduleRule):
    """Parallel + vectorized loops for spatial blocks; parallel loops for reduction blocks.

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
            if r_loops and self._contiguous_inner(sch, block, info):
                # A reduction whose innermost spatial axis reads contiguously (matmul /
                # dense layers: y[j] += x[k] * W[k, j]): put the reduction outside it and
                # vectorize it. dlight's CPU GEMV walked W by columns here (0.55 ms for a
                # 512x1000 classifier).
                inner = s_loops[-1]
                sch.reorder(*s_loops[:-1], *r_loops, inner)
                outer = s_loops[:-1]
                io = self._vectorize_inner(sch, block, inner)
                if io is not None:
                    sch.reorder(*s_loops[:-1], io, *r_loops)
                    outer = outer + [io]
            elif r_loops:
                # Reductions (pooling, means) stay scalar inside: vectorized over output columns
                # the window reads become strided gathers and a padded max pool ran 5x slower
                # (0.92 vs 0.19 ms at 112x112x64) than TVM's serial loop. Parallel over all
                # spatial axes but the innermost, which stays a plain loop: fusing it in too
                # puts a div/mod per window read.
                outer = s_loops[:-1]
            else:
                # Vectorize the innermost spatial axis itself (not a fused one): its accesses
                # stay affine, so they become contiguous vector loads instead of div/mod gathers.
                outer, inner = s_loops[:-1], s_loops[-1]
                io = self._vectorize_inner(sch, block, inner)
                if io is not None:
                    outer = outer + [io]
            if outer and total >= MIN_PARALLEL_ELEMENTS:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            if r_loops:
                reductions.append((block, r_loops[0]))
        for block, loop in reductions:
            sch.decompose_reduction(block, loop)
        return sch

    @staticmethod
    def _contiguous_inner(sch, block, info) -> bool:
        """True if every read that depends on the innermost spatial iterator has it, plus a
        constant at most, as its last index (unit stride), and some read does."""
        spatial = [it.var for it in info.iters if it.kind == "S"]
        if not spatial:
            return False
        var = spatial[-1]
        found = False
        for region in sch.get(block).reads:
            ranges = list(region.region)
            for dim, rng in enumerate(ranges):
                uses = _uses_var(rng.min, var)
                if not uses:
                    continue
                last = dim == len(ranges) - 1
                expr = rng.min
                unit = expr.same_as(var) or (
                    isinstance(expr, tirx.Add)
                    and (expr.a.same_as(var) and isinstance(expr.b, tirx.IntImm)
                         or expr.b.same_as(var) and isinstance(expr.a, tirx.IntImm))
                )
                if not (last and unit):
                    return False
                found = True
        return found

    def _vectorize_inner(self, sch, block, loop):
        """Vectorize ``loop`` whole (short) or split by the widest lane count dividing it.

        Returns the outer loop of a split, else None.
        """
        lanes = self._lanes(sch, block)
        width = int(sch.get(loop).extent)
        if lanes <= 1 or width <= 1:
            return None
        if width <= 4 * lanes:
            sch.vectorize(loop)
            return None
        v = lanes
        while v >= 4 and width % v:
            v //= 2
        if v < 4:
            return None
        outer, inner = sch.split(loop, [None, v])
        sch.vectorize(inner)
        return outer

    def _lanes(self, sch, block) -> int:
        writes = sch.get(block).writes
        if len(writes) != 1:
            return 1
        region = writes[0]
        buffer = region.buffer if hasattr(region, "buffer") else region.source
        bits = tvm.DataType(buffer.dtype).bits
        return max(1, self.vector_bytes * 8 // bits)


def _uses_var(expr, var) -> bool:
    found = []

    def visit(node):
        if isinstance(node, tirx.Var) and node.same_as(var):
            found.append(node)

    tvm_ffi.structural_walk(expr, [(tirx.Var, visit)], order="post")
    return bool(found)
