"""Schedules for sparks_tvm's binary kernels, one module per target family.

Each family's schedules object (``HostSchedules``, ``ArmSchedules``, ``CudaSchedules``) builds a
kernel from :mod:`sparks_tvm.kernels` and applies its default schedule; the machine facts come
from :class:`schedules.target_info.TargetInfo`, the interface is
:class:`schedules.interface.KernelSchedules`, and :mod:`schedules.tuning` turns the same
schedule functions into MetaSchedule design spaces.
"""

from .arm import ArmSchedules
from .cuda import CudaSchedules
from .host import HostSchedules
from .interface import KernelSchedules
from .target_info import TargetInfo

#: Target family (``TargetInfo.family``) -> its schedules class.
FAMILIES = {"host": HostSchedules, "arm": ArmSchedules, "cuda": CudaSchedules}


def for_target(target) -> KernelSchedules:
    """Kernel builders for a ``tvm.target.Target``."""
    family = TargetInfo.from_target(target).family
    if family not in FAMILIES:
        raise NotImplementedError(f"no binary-conv schedules for target kind {target.kind.name!r} yet")
    return FAMILIES[family].for_target(target)


__all__ = ["ArmSchedules", "CudaSchedules", "HostSchedules", "KernelSchedules", "TargetInfo", "for_target"]
