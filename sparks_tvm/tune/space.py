"""A model's tuning tasks: one per distinct binary kernel, in :mod:`schedules.tuning`'s spaces.

The design spaces themselves are the schedules layer's (:mod:`schedules.tuning`: the default
schedule's structure with its knobs as sampled decisions). Here the model runs through the
same lowering phases as ``compile`` (:func:`relay_passes.pipeline.lower`), with a schedules
object that records every kernel the lowering asks for.
"""

from __future__ import annotations

import schedules
from relay_passes import pipeline
from schedules.tuning import RecordingSchedules, make_task, tuned_kinds

from .. import frontend


def extract_tasks(proto, specs, target, strict: bool = True, force_kind: str | None = None):
    """The model's binary kernels as tuning tasks, deduplicated: ``[(KernelTask, layers)]``."""
    rec = RecordingSchedules(schedules.for_target(target))
    pipeline.lower(frontend.import_graph(proto, specs),
                   pipeline.PipelineOptions(schedules=rec, strict=strict, force_kind=force_kind,
                                            conv_names=frontend.conv_names(proto)))
    tasks, counts = {}, {}
    for kind, geom, k, mode in rec.calls:
        if kind not in tuned_kinds(rec.base):
            continue  # the target keeps its own kernel for this kind (ARM: the NEON Sparks kernel)
        task = make_task(rec.base, kind, geom, k, mode)
        tasks.setdefault(task.name, task)
        counts[task.name] = counts.get(task.name, 0) + 1
    return [(tasks[name], counts[name]) for name in tasks]
