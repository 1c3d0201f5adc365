"""ScheduleFusedKernels: schedule our conv kernels after Relax fused their epilogues into them.

With :attr:`schedules.host.HostSchedules.defer` set (what :func:`sparks_tvm.compile` does on
LLVM targets), the lowering passes emit *unscheduled* conv kernels marked
``kOutEWiseFusable``, each carrying its schedule's knobs on its ``out`` block. Relax's
``FuseOps`` + ``FuseTIR`` then put each kernel and the elementwise ops after it (the int32
-> float cast, alpha, BatchNorm's affine, the residual add, PReLU, the next layer's
threshold shift) into one PrimFunc, as serial loop nests one after another. This pass
finishes the job: it inlines that chain into the kernel's ``out`` block
(``reverse_compute_inline``) and then applies the kernel's schedule, which computes ``out``
per pixel tile, vectorized. The epilogue then runs on the tile while it is in L1, and
neither the int32 conv result nor any intermediate reaches memory.

Inlining must come before scheduling: once ``out`` sits under a tile loop whose last tile is
partial (28x28 = 784 pixels in tiles of 64), TVM can no longer prove that the tiles cover the
tensor the epilogue reads, and refuses the inline.

Pattern: a PrimFunc, not yet scheduled, with an ``out`` block carrying
:data:`schedules.host.DEFERRED_SCHEDULE`. Check: each consumer in turn is the only consumer
of the block and one ``reverse_compute_inline`` accepts (elementwise in the conv's output).
Rewrite: inline; apply the schedule; mark the function scheduled. A consumer that cannot be
inlined stops the chain: the kernel is still scheduled and the rest of the chain runs after
it, as it did before fusion existed.
"""

from __future__ import annotations

import json

import tvm
from tvm import s_tir, tirx

from schedules.host import DEFERRED_SCHEDULE, apply_deferred

#: Name of the output block of every kernel that can carry a deferred schedule.
ANCHOR_BLOCK = "out"


def find_deferred(sch: s_tir.Schedule):
    """Pattern: ``(out block, schedule spec)`` of a deferred kernel in ``sch``, or None."""
    try:
        block = sch.get_sblock(ANCHOR_BLOCK)
    except Exception:  # noqa: BLE001 - no such block: not one of our kernels
        return None
    spec = sch.get(block).annotations.get(DEFERRED_SCHEDULE)
    return None if spec is None else (block, json.loads(str(spec)))


def inline_side_inputs(sch: s_tir.Schedule, anchor, consumer) -> bool:
    """Rewrite: inline the consumer's other producers (elementwise ops on the function's
    inputs, e.g. a residual plus a constant) into it; whether any was."""
    done = False
    for producer in sch.get_producers(consumer):
        if sch.get(producer).same_as(sch.get(anchor)):
            continue
        try:
            sch.compute_inline(producer)
            done = True
        except Exception:  # noqa: BLE001 - not inlinable (a reduction, another kernel): leave it
            pass
    return done


def inline_epilogue(sch: s_tir.Schedule, anchor) -> int:
    """Check + rewrite: inline the anchor's consumers one by one; return how many.

    A consumer that also reads another in-function result (the residual plus a shift) gets
    that producer inlined into it first, so the whole sum runs in the conv's epilogue.
    """
    count = 0
    while True:
        consumers = sch.get_consumers(anchor)
        if len(consumers) != 1:
            return count  # none left, or the conv result feeds two ops: keep it in memory
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - TVM refuses (not elementwise in the output): stop
            if not inline_side_inputs(sch, anchor, consumers[0]):
                return count
            continue
        count += 1


@tvm.transform.module_pass(opt_level=0, name="ScheduleFusedKernels")
class ScheduleFusedKernels:
    """Inline each deferred kernel's fused epilogue, then apply the kernel's schedule.

    ``self.inlined`` maps each scheduled function's name to the number of epilogue ops
    inlined into it (tests and reports read it).
    """

    def __init__(self):
        self.inlined: dict[str, int] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch = s_tir.Schedule(func)
            found = find_deferred(sch)
            if found is None:
                continue
            block, spec = found
            self.inlined[gvar.name_hint] = inline_epilogue(sch, block)
            apply_deferred(sch, spec)
            updates[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
