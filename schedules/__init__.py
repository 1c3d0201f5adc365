"""Schedules for sparks_tvm's binary kernels, one module per target family."""

from .host import HostSchedules


def for_target(target) -> object:
    """Kernel builders for a ``tvm.target.Target``."""
    kind = target.kind.name
    if kind == "llvm":
        return HostSchedules.for_target(target)
    raise NotImplementedError(f"no binary-conv schedules for target kind {kind!r} yet")


__all__ = ["HostSchedules", "for_target"]
