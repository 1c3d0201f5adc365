"""``sparks_tvm.tune``: MetaSchedule autotuning of a model's binary kernels, with reusable records.

A user tunes a model once per target; the work dir keeps MetaSchedule's JSON database and
every later ``sparks_tvm.compile(..., tuning_db=work_dir)`` applies it::

    res = sparks_tvm.tune("model.onnx", "llvm", "tune-host", trials=64)
    print(res.table())
    model = sparks_tvm.compile("model.onnx", "llvm", tuning_db="tune-host")

What is tuned: the model's Sparks and dense binary conv kernels (one task per distinct
kernel; identical layers share a task), in the design spaces of :mod:`schedules.tuning`
(the default schedule is one point of each), with MetaSchedule's evolutionary search and
XGBoost cost model. The float parts keep their hand schedules.

Work dir layout::

    database_workload.json, database_tuning_record.json   MetaSchedule's JSONDatabase
    sparks_tuning.json      target, per-task default latency and trial counts
    sparks_trials.jsonl     one line per measured candidate (task, trial, latency): the curve
    tune_curve.png          best latency vs trials, per task
    logs/                   MetaSchedule's logs (one file per task)

ARM targets (``runner="emulated-pi"``, :mod:`.arm`): the NEON kernels are IRBuilder TIR that
MetaSchedule cannot trace, so their plans (tiles, chunks, channel and output-channel blocks)
are searched by counting aarch64 instructions on the emulated Pi, with the Sparks-vs-dense
choice per layer by the same counts; records in ``arm_plans.json`` / ``arm_trials.jsonl``
(:mod:`.arm_records`).

Records are appended one line per measured candidate as each batch finishes, so a run
killed mid-way loses at most the batch in flight; a rerun of :func:`tune` with the same
work dir counts the trials already recorded and only runs the rest.

Package layout (after MetaSchedule's): :mod:`.space` (a model's tasks; the design spaces are
:mod:`schedules.tuning`'s), :mod:`.search` (the search, :func:`tune`, :func:`tune_kernels`),
:mod:`.database` (the work dir), :mod:`.runners` (in-process builder; local and RPC runners),
:mod:`.measure` (the default's seed and the final validation), :mod:`.progress` (trial log,
progress bar, MetaSchedule's logs), :mod:`.report` (results table, tuning curve); for ARM
:mod:`.arm` (the plan search), :mod:`.arm_records` (its records), :mod:`.emulated_pi` (counting).

The package is callable: ``sparks_tvm.tune(model, ...)`` is :func:`tune`.
"""

import sys
import types

from ..errors import TuningError
from .database import (
    CURVE_FILE,
    FAILED_SECS,
    META_FILE,
    RECORDS_FILE,
    TRIALS_FILE,
    WORKLOADS_FILE,
    check_target,
    lock_work_dir,
    open_database,
    repair_records,
    tuned_schedules,
)
from .arm import EMULATED_PI, ArmTask, extract_arm_tasks, tune_arm, tune_arm_tasks
from .arm_records import ARM_TRIALS_FILE, PLANS_FILE, ArmPlans
from .measure import VALIDATION_MARGIN
from .report import ArmTaskResult, ArmTuneResult, TaskResult, TuneResult, plot_curve
from .runners import RUNNER_NAMES, InProcessBuilder, default_runner, in_process_builder, rpc_runner
from .search import tune, tune_kernels
from .space import extract_tasks

__all__ = [
    "ARM_TRIALS_FILE", "EMULATED_PI", "PLANS_FILE", "RUNNER_NAMES", "ArmPlans", "ArmTask", "ArmTaskResult",
    "ArmTuneResult", "extract_arm_tasks", "tune_arm", "tune_arm_tasks",
    "CURVE_FILE", "FAILED_SECS", "META_FILE", "RECORDS_FILE", "TRIALS_FILE", "VALIDATION_MARGIN", "WORKLOADS_FILE",
    "InProcessBuilder", "TaskResult", "TuneResult", "TuningError", "check_target", "default_runner",
    "extract_tasks", "in_process_builder", "lock_work_dir", "open_database", "plot_curve", "repair_records", "rpc_runner", "tune",
    "tune_kernels", "tuned_schedules",
]


class _CallableModule(types.ModuleType):
    """``sparks_tvm.tune`` is this package and, called, :func:`tune` (the public API's verb)."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
