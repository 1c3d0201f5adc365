"""CUDA schedules for the binary kernels: a first, naive GPU mapping (built and checked, not tuned).

Each stage of the kernels gets dlight's GPU ``Fallback`` mapping: its spatial loops fused and
bound to blocks x threads (one thread per element of the stage), reductions serial inside a
thread. Stage 1 of the Sparks op is materialized in global memory, the codeword gather reads
it, and the popcounts are ``__popc`` on 32-bit words (CUDA's code generator has no narrower
one). No shared-memory tiling, no fusion of the stages yet: this makes ``compile(target="cuda")``
produce a correct CUDA module (checked as source and as nvcc-built PTX without a GPU); the
fast GPU schedule is future work. dlight's own GPU reduction rule cannot analyse the
data-dependent gather, which is why the kernels are mapped here and marked scheduled.
"""

from __future__ import annotations

from tvm import tirx


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

    def _map(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        from tvm.s_tir import dlight

        with self.target:
            sch = dlight.gpu.Fallback().apply(func, self.target, False)
        if sch is None:  # pragma: no cover - Fallback maps every kernel we build
            raise RuntimeError("dlight's GPU fallback could not map the kernel")
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import sparks_conv2d_primfunc

        return self._map(sparks_conv2d_primfunc(geom, num_codewords, mode, popcount_bits=32))

    def schedule_binary_conv2d(self, geom, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import binary_conv2d_primfunc

        return self._map(binary_conv2d_primfunc(geom, mode))
