"""Schedules for sparks_tvm's binary kernels, one module per target family."""

from .arm import ArmSchedules
from .cuda import CudaSchedules
from .host import HostSchedules


def for_target(target) -> object:
    """Kernel builders for a ``tvm.target.Target``."""
    kind = target.kind.name
    if kind == "llvm":
        triple = str(target.attrs.get("mtriple", ""))
        if triple.startswith(("aarch64", "arm64", "arm", "thumb")):
            return ArmSchedules.for_target(target)
        return HostSchedules.for_target(target)
    if kind == "cuda":
        return CudaSchedules.for_target(target)
    raise NotImplementedError(f"no binary-conv schedules for target kind {kind!r} yet")


__all__ = ["ArmSchedules", "CudaSchedules", "HostSchedules", "for_target"]
