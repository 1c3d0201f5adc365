"""The interface every target family's schedules object implements (``schedules.for_target``).

The lowering passes call only these; tuning wraps an object of this interface
(:class:`schedules.tuning.RecordingSchedules`, :class:`schedules.tuning.TunedSchedules`) and
samples the same knobs the defaults use: each family's ``apply_*_schedule`` functions take
their knobs as ints (the default, from ``sparks_params``) or as MetaSchedule random variables
(the design space of :mod:`schedules.tuning`), in the manner of dlight's ``ScheduleRule``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tvm import tirx


@runtime_checkable
class KernelSchedules(Protocol):
    """Builds each binary kernel for one target: its compute plus its default schedule.

    Attributes
    ----------
    name : str
        The family: ``"host"``, ``"arm"`` or ``"cuda"``.
    folds_shift : bool
        The kernels take a per-channel shift of their input (``shift=True``).
    """

    name: str
    folds_shift: bool

    @classmethod
    def for_target(cls, target) -> "KernelSchedules":
        """The object for a ``tvm.target.Target`` (machine facts from ``TargetInfo``)."""

    def sparks_params(self, geom, num_codewords: int):
        """The default knobs of the Sparks kernel for one layer (the default point of its space)."""

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, shift: bool = False) -> tirx.PrimFunc:
        """The scheduled (or, with ``defer``, deferred) Sparks kernel of one layer."""

    def schedule_binary_conv2d(self, geom, mode: str, shift: bool = False) -> tirx.PrimFunc:
        """The scheduled (or deferred) dense binary kernel of one layer."""


#: Optional: ``schedule_float_conv2d(geom)`` and ``float_lanes`` (CPU families), used by
#: ``LowerFloatConv2d``; ``defer`` (LLVM families), set by the pipeline to fuse epilogues;
#: ``binary_weights(geom, mode, signs)``, the dense kernel's weight constant where it is not
#: ``pack_binary_weights(signs)`` (ARM's NEON kernel reads its own layout).
OPTIONAL = ("schedule_float_conv2d", "float_lanes", "defer", "binary_weights")
