"""The search: MetaSchedule's evolutionary search and XGBoost cost model over the kernels' spaces.

:func:`tune` (a model) and :func:`tune_kernels` (tasks directly) run, per work dir: the
default schedule of each task measured once and committed as the seed record
(:func:`seed_defaults`); the search for the trials not yet recorded (:func:`search`); then
each task's best record validated against the default (:func:`collect_results`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types

import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.utils import fork_seed

from schedules.tuning import mutate_categorical

from .. import frontend
from ..errors import TuningError
from ..target import resolve_target, target_json
from .database import (
    SUMMARY_FILE,
    check_printable,
    check_target,
    count_records,
    lock_work_dir,
    open_database,
    prepare_work_dir,
    read_meta,
    write_meta,
)
from .measure import float_imm, mean_secs, measure_default, validate
from .progress import ProgressCallback, Run, SchedulerLog, task_loggers
from .report import TaskResult, TuneResult, plot_curve
from .arm import EMULATED_PI, tune_arm
from .runners import default_runner, in_process_builder, runner_by_name
from .space import extract_tasks


class NoTensorIntrinsics:
    """Keep ``TuneContext`` from importing ``tvm.s_tir.tensor_intrin`` (while it is constructed).

    ``TuneContext.__init__`` imports every tensor intrinsic TVM has (CUDA's are written in
    TVMScript and parsed at import): 20 s on an idle 2-core machine, 105 s on a loaded one,
    once per tuning process. The binary kernels' design spaces use none. A stand-in module
    is placed in ``sys.modules`` only if the real one is not imported yet, and removed on
    exit, so a later real import (tuning other ops with MetaSchedule's own rules) works.
    """

    NAME = "tvm.s_tir.tensor_intrin"

    def __enter__(self):
        self.installed = self.NAME not in sys.modules
        if self.installed:
            sys.modules[self.NAME] = types.ModuleType(self.NAME, "stand-in: sparks_tvm tuning needs no intrinsics")
        return self

    def __exit__(self, *exc):
        if self.installed and isinstance(sys.modules.get(self.NAME), type(sys)) and \
                (sys.modules[self.NAME].__doc__ or "").startswith("stand-in"):
            del sys.modules[self.NAME]
        return False



def tune(model, target="llvm", work_dir="sparks-tune", trials: int = 64, runner=None, *, shapes: dict | None = None,
         strict: bool = True, force_kind: str | None = None, builder=None, batch: int = 8, seed: int = 0,
         progress: bool | None = None, plot: bool = True, wait: bool = False) -> TuneResult:
    """Tune a model's binary kernels with MetaSchedule (XGBoost cost model); records go to ``work_dir``.

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto
    target : str, dict or tvm.target.Target
        As for :func:`sparks_tvm.compile` (``"llvm"``: this CPU).
    work_dir : str or os.PathLike
        One directory per target. Rerunning with the same directory resumes: trials already
        recorded count towards ``trials``.
    trials : int
        Total measured candidates over all tasks (not counting each task's default-schedule
        measurement, taken once per work dir).
    runner : MetaSchedule Runner or str, optional
        Default: :func:`default_runner` (local). For a Raspberry Pi: :func:`rpc_runner`.
        ``"emulated-pi"`` (ARM targets): tune the NEON kernels' plans by counting aarch64
        instructions on the emulated Pi (:mod:`.arm`; returns an :class:`.report.ArmTuneResult`);
        ``"local"``: the default.
    shapes, strict, force_kind
        As for :func:`sparks_tvm.compile`.
    builder : MetaSchedule Builder, optional
        Default: :func:`in_process_builder`.
    batch : int
        Candidates per search iteration (records are written after each batch).
    seed : int
        Search seed.
    progress : bool, optional
        Progress bar on stderr; default: when stderr is a terminal.
    plot : bool
        Write ``tune_curve.png`` (needs matplotlib; skipped with a warning without it).
    wait : bool
        If another run holds ``work_dir`` (see :func:`.database.lock_work_dir`), wait for it
        to end instead of failing at once with :class:`~sparks_tvm.errors.WorkDirLockedError`.

    Returns
    -------
    TuneResult
        ``.table()`` is the per-task summary.

    Raises
    ------
    TuningError
        No binary kernel to tune; records of another target in ``work_dir``; a default
        schedule that cannot be measured; trials were run but none could be measured;
        ``work_dir`` is a file, is in use by another run, or holds a damaged database.
    """
    t_start = time.perf_counter()
    if not isinstance(trials, int) or trials < 0:
        raise TuningError(f"trials must be an integer >= 0, got {trials!r}")
    if not isinstance(batch, int) or batch < 1:
        raise TuningError(f"batch (candidates per search round) must be an integer >= 1, got {batch!r}")
    runner = runner_by_name(runner)
    if runner == EMULATED_PI:
        # NEON plans, counted on the emulated Pi (not MetaSchedule: the kernels are IRBuilder TIR).
        return tune_arm(model, resolve_target(target), work_dir, trials, shapes=shapes, strict=strict,
                        force_kind=force_kind, batch=batch, seed=seed, progress=progress, wait=wait)
    work_dir = prepare_work_dir(work_dir)
    with lock_work_dir(work_dir, wait=wait):  # before the extraction: a second run fails at once
        proto = frontend.load_onnx(model)
        frontend.check_supported_ops(proto)
        specs = frontend.input_specs(proto, shapes)
        tgt = resolve_target(target)
        pairs = extract_tasks(proto, specs, tgt, strict=strict, force_kind=force_kind)
        if not pairs:
            raise TuningError("the model has no binary convolution to tune (see `sparks-tvm inspect`)")
        return tune_kernels(pairs, tgt, work_dir, trials, runner, builder=builder, batch=batch, seed=seed,
                            progress=progress, plot=plot, t_start=t_start, wait=wait)


def tune_kernels(pairs, tgt, work_dir, trials: int, runner=None, *, builder=None, batch: int = 8, seed: int = 0,
                 progress: bool | None = None, plot: bool = True, t_start: float | None = None,
                 skip_intrinsics: bool = True, max_trials_per_task: int | None = None,
                 validate_rounds: int = 9, wait: bool = False) -> TuneResult:
    """Tune kernel tasks directly: ``pairs`` is ``[(schedules.tuning.KernelTask, layers)]``.

    :func:`tune` after task extraction; also used by ``benchmarks/bench_tune.py`` on layer
    shapes without a model. ``skip_intrinsics=False`` keeps MetaSchedule's import of every
    tensor intrinsic (to measure the stock set-up). The work dir is locked for the run
    (``wait``: as for :func:`tune`).
    """
    t_start = time.perf_counter() if t_start is None else t_start
    work_dir = prepare_work_dir(work_dir)
    with lock_work_dir(work_dir, wait=wait):
        return _tune_locked(pairs, tgt, work_dir, trials, runner, builder=builder, batch=batch, seed=seed,
                            progress=progress, plot=plot, t_start=t_start, skip_intrinsics=skip_intrinsics,
                            max_trials_per_task=max_trials_per_task, validate_rounds=validate_rounds)


def _tune_locked(pairs, tgt, work_dir, trials, runner, *, builder, batch, seed, progress, plot, t_start,
                 skip_intrinsics, max_trials_per_task, validate_rounds) -> TuneResult:
    """The body of :func:`tune_kernels`, run while holding the work dir's lock."""
    meta = read_meta(work_dir)
    check_target(work_dir, tgt, meta)
    if meta is None:
        meta = {"target": target_json(tgt), "tasks": {}}
    database = open_database(work_dir)
    builder = builder if builder is not None else in_process_builder()
    runner = runner if runner is not None else default_runner(tgt)
    progress = sys.stderr.isatty() if progress is None else progress

    seed_defaults(pairs, tgt, work_dir, meta, database, builder, runner)
    # Trials already in the database (resume): all records of our workloads but the defaults.
    done = sum(count_records(database, task.mod) - 1 for task, _ in pairs)
    remaining = max(0, trials - done)
    best = {}
    for task, _ in pairs:
        rec = database.query_tuning_record(task.mod, tgt, "main")
        if rec is not None and rec.run_secs:
            best[task.name] = mean_secs(rec.run_secs)
    run = Run(work_dir, [t for t, _ in pairs], total=max(trials, done), done=done, best=best, progress=progress)
    if remaining > 0:
        search(pairs, tgt, work_dir, database, builder, runner, run, remaining, batch=batch, seed=seed,
               skip_intrinsics=skip_intrinsics, max_trials_per_task=max_trials_per_task)

    result = TuneResult(work_dir=work_dir, target=target_json(tgt), trials_run=run.attempted, measured=run.measured)
    result.tasks = collect_results(pairs, tgt, meta, database, builder, runner, validate_rounds)
    result.seconds = time.perf_counter() - t_start
    write_meta(work_dir, meta)
    if plot:
        result.curve_png = plot_curve(work_dir, meta)
    with open(os.path.join(work_dir, SUMMARY_FILE), "w") as fh:
        json.dump(result.to_json(), fh, indent=1)
    return result


def seed_defaults(pairs, tgt, work_dir, meta, database, builder, runner) -> None:
    """Measure each task's default schedule, once per work dir, and commit its seed record.

    The seed point (the default unless that cannot be printed, see
    :class:`schedules.tuning.KernelTask`) is committed as a record, so the search starts from
    the default's knobs whatever it samples.
    """
    for task, _layers in pairs:
        info = meta["tasks"].get(task.name)
        if info is not None and info.get("default_s") is not None:
            continue
        secs, point, args_info, all_secs = measure_default(task, tgt, builder, runner)
        workload = database.commit_workload(task.mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            point.trace, workload, [float_imm(s) for s in all_secs], tgt, args_info))
        # Until a search's winner is validated, the seed stands for the default: a run killed or
        # failing before the end must not leave compile replaying the seed (no padding split).
        meta["tasks"][task.name] = {"default_s": secs, "use_default": True,
                                    "chosen_hash": str(tvm_ffi.structural_hash(point.mod))}
        write_meta(work_dir, meta)


def _contexts(pairs, tgt, work_dir, seed: int, skip_intrinsics: bool) -> list:
    """One MetaSchedule ``TuneContext`` per task: its space, the mutator, the evolutionary search."""
    loggers = task_loggers(work_dir, [t.name for t, _ in pairs])
    contexts = []
    for (task, _), log, rand_state in zip(pairs, loggers, fork_seed(seed, n=len(pairs))):
        space = ms.space_generator.ScheduleFn(
            task.space, sch_rules=[], postprocs=[], mutator_probs={mutate_categorical(): 1.0}
        )
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=64, init_measured_ratio=0.25, init_min_unmeasured=16, genetic_num_iters=2,
            max_fail_count=3,
        )
        with NoTensorIntrinsics() if skip_intrinsics else contextlib.nullcontext():
            contexts.append(ms.TuneContext(
                mod=task.mod, target=tgt, space_generator=space, search_strategy=strategy, task_name=task.name,
                rand_state=rand_state, num_threads=1, logger=log,
            ).clone())
    return contexts


def search(pairs, tgt, work_dir, database, builder, runner, run: Run, remaining: int, *, batch: int, seed: int,
           skip_intrinsics: bool, max_trials_per_task: int | None) -> None:
    """Run ``remaining`` trials over the tasks (MetaSchedule's gradient task scheduler)."""
    check_printable(database, [t for t, _ in pairs], work_dir)
    contexts = _contexts(pairs, tgt, work_dir, seed, skip_intrinsics)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [ProgressCallback(run)]
    with SchedulerLog(work_dir):
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=[float(n) for _, n in pairs],
            work_dir=work_dir,
            max_trials_global=remaining,
            max_trials_per_task=max_trials_per_task,
            num_trials_per_iter=batch,
            builder=builder,
            runner=runner,
            database=database,
            cost_model=ms.cost_model.XGBModel(
                extractor=ms.feature_extractor.PerStoreFeature(), adaptive_training=True, num_tuning_cores=1
            ),
            measure_callbacks=callbacks,
            task_scheduler="gradient",
        )
    if run.progress:
        sys.stderr.write("\n")
    if run.attempted > 0 and run.measured == 0:
        raise TuningError(
            f"none of the {run.attempted} candidates could be measured; first error: "
            f"{run.errors[0] if run.errors else 'unknown'}"
        )


def collect_results(pairs, tgt, meta, database, builder, runner, validate_rounds: int) -> list:
    """Per task: validate the best record against the default, then its :class:`TaskResult`."""
    out = []
    for task, layers in pairs:
        info = meta["tasks"][task.name]
        rec = database.query_tuning_record(task.mod, tgt, "main")
        trials_done = count_records(database, task.mod) - 1
        # Validate the search's winner against the default, interleaved (see validate): a lone
        # noisy measurement on a shared machine must not pass for a speed-up.
        if rec is not None and info.get("validated_trials") != trials_done:
            for key in ("validated_default_s", "validated_best_s", "use_default", "chosen_hash"):
                info.pop(key, None)  # an earlier run's verdict must not outlive this one
            info.update(validate(task, rec.trace, tgt, builder, runner, rounds=validate_rounds))
            info["validated_trials"] = trials_done
        default_ms = info.get("validated_default_s", info["default_s"]) * 1e3
        if info.get("use_default"):
            # What compile runs is the default: its latency, not that of the record that lost to
            # it (or of the seed record, measured apart from the default).
            best_ms = default_ms
        else:
            best_ms = info.get("validated_best_s", mean_secs(rec.run_secs) if rec else info["default_s"]) * 1e3
        out.append(TaskResult(task.name, layers, trials=trials_done, default_ms=default_ms, best_ms=best_ms,
                              chosen="default" if info.get("use_default") else "tuned"))
        info.update(trials=trials_done, layers=layers)
    return out
