"""A dlight rule for the model's small-window reductions on GPUs (pooling): one thread per output.

dlight's default GPU rules schedule any reduction as a cross-thread one: with ``Reduction``
each output gets a thread block and a warp shuffle over its taps. For a 2x2 average pool that
is a block of 4 threads per output pixel. In the example ResNet-18 at batch 1 (H100, Nsight
Compute) the three downsampling shortcuts' pools took 61 us of the model's 603, longer than
the Sparks kernels of those layers. A window of a few taps wants the opposite mapping: every
output in its own thread, summing its taps serially, which is dlight's ``Fallback`` mapping.

:class:`WindowReduction` therefore claims a function whose reductions are all small windows
(at most ``max_taps`` taps per output): each output in one thread, its taps accumulated in a
register, the epilogue (an average's division) inlined into the one store. Anything else
(matmuls, convolutions over many channels, softmax) is left to the rules after it.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import max_threads_per_block, try_inline
from tvm.s_tir.dlight.gpu import Fallback
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

#: Default largest window: a 3x3 max pool has 9 taps, a 2x2 average pool 4.
MAX_TAPS = 64


def window_taps(func: tirx.PrimFunc) -> int | None:
    """Largest reduction extent (taps per output) over ``func``'s reduction blocks.

    ``None`` if it has no reduction block, a reduction extent that is not a constant, or
    blocks dlight cannot normalize.
    """
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    largest = None
    for info in infos:
        kinds = info.dom_kind()
        if "R" not in kinds:
            continue
        taps = 1
        for loop, kind in zip(sch.get_loops(info.block_rv), kinds):
            if kind == "R":
                extent = sch.get(loop).extent
                if not isinstance(extent, tirx.IntImm):
                    return None
                taps *= int(extent)
        largest = taps if largest is None else max(largest, taps)
    return largest


class WindowReduction(GPUScheduleRule):
    """Pooling-like reductions as one GPU thread per output (dlight's ``Fallback`` mapping).

    Parameters
    ----------
    max_taps : int
        Largest reduction extent per output that counts as a window.
    """

    def __init__(self, max_taps: int = MAX_TAPS):
        self.max_taps = max_taps

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        taps = window_taps(func)
        if taps is None or taps > self.max_taps:
            return None
        try:
            return self._one_kernel(func, target)
        except s_tir.ScheduleError:
            # Another shape of function (several reductions, an epilogue that cannot be
            # inlined): the same mapping, block by block, as dlight's Fallback does it.
            return Fallback().apply(func, target, tunable)

    @staticmethod
    def _one_kernel(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
        """The single reduction with its epilogue (an average's division) in one kernel."""
        sch = s_tir.Schedule(func)
        infos = try_inline(sch, normalize_prim_func(sch))  # padding, casts
        reductions = [info for info in infos if "R" in info.dom_kind()]
        if len(reductions) != 1:
            raise s_tir.ScheduleError("not a single reduction")
        block = reductions[0].block_rv
        later = [info.block_rv for info in infos[infos.index(reductions[0]) + 1:]]
        s_loops, r_loops = [], []
        for loop, kind in zip(sch.get_loops(block), reductions[0].dom_kind()):
            (r_loops if kind == "R" else s_loops).append(loop)
        sch.reorder(*s_loops, *r_loops)
        bx, tx = sch.split(sch.fuse(*s_loops), factors=[None, min(256, max_threads_per_block(target))])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        # The taps accumulate in a register; the result is stored once, with the epilogue
        # (e.g. the division by the window size) inlined into that store.
        store = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(store, tx)
        for epilogue in later:
            sch.reverse_compute_inline(epilogue)
        sch.decompose_reduction(block, r_loops[0])
        return sch
