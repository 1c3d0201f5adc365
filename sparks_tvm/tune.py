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

Records are appended one line per measured candidate as each batch finishes, so a run
killed mid-way loses at most the batch in flight; a rerun of :func:`tune` with the same
work dir counts the trials already recorded and only runs the rest.

Tuning cost on small machines: MetaSchedule's ``LocalBuilder`` starts fresh worker
processes for every batch, each importing ``tvm.s_tir.tensor_intrin`` (35-80 s on a 2-core
machine, more than its own 30 s time-out). :class:`InProcessBuilder` compiles in the tuning
process instead (no worker start-up, no tensor intrinsics: the binary kernels use none).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .errors import SparksError

logger = logging.getLogger("sparks_tvm")

META_FILE = "sparks_tuning.json"
TRIALS_FILE = "sparks_trials.jsonl"
CURVE_FILE = "tune_curve.png"
RECORDS_FILE = "database_tuning_record.json"
WORKLOADS_FILE = "database_workload.json"
#: MetaSchedule records a candidate whose build or run failed with this latency (kMaxMeanTime).
FAILED_SECS = 1e9


class TuningError(SparksError):
    """Tuning could not be done or its records cannot be used (wrong target, nothing measured...)."""


# ----------------------------------------------------------------------------- builder


def _make_in_process_builder():
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds candidates in the tuning process: no worker start-up per batch.

        ``f_export(rt_mod, path)`` writes the library (default: a shared object linked by the
        host compiler; for an aarch64 target, by ``aarch64-linux-gnu-gcc``, since the
        device of an RPC runner may have no compiler).
        """

        def __init__(self, f_export=None):
            super().__init__()
            self.f_export = f_export
            self.seconds = 0.0
            self.count = 0

        def build(self, build_inputs):
            from tvm.tirx import build as tvm_build

            results = []
            t0 = time.perf_counter()
            for item in build_inputs:
                try:
                    rt_mod = tvm_build(item.mod, target=item.target)
                    path = os.path.join(tempfile.mkdtemp(prefix="sparks_tune_"), "candidate.so")
                    if self.f_export is not None:
                        self.f_export(rt_mod, path)
                    else:
                        _export_for_target(rt_mod, path, item.target)
                    results.append(BuilderResult(path, None))
                except Exception as err:  # a candidate that fails to build is a failed trial, not a crash
                    results.append(BuilderResult(None, f"{err.__class__.__name__}: {err}"))
            self.seconds += time.perf_counter() - t0
            self.count += len(build_inputs)
            return results

    return InProcessBuilder


def _export_for_target(rt_mod, path, target):
    from .target import is_aarch64

    kwargs = {}
    if is_aarch64(target):
        import platform

        if platform.machine() not in ("aarch64", "arm64"):
            from tvm.support import cc

            kwargs["fcompile"] = cc.cross_compiler("aarch64-linux-gnu-gcc")
    rt_mod.export_library(path, **kwargs)


def in_process_builder(f_export=None):
    """A MetaSchedule builder that compiles candidates in this process (see module doc)."""
    return _make_in_process_builder()(f_export)


def default_runner(target, timeout_sec: float = 30.0):
    """The runner used when none is given: ``LocalRunner`` for a target this machine runs.

    Timing: one warm-up, then 3 repeats of at least 50 ms each; the tuner keeps the mean.
    A cross-compiled target (aarch64 from x86) needs an RPC runner: that is an error here.
    """
    import platform

    from tvm.s_tir import meta_schedule as ms

    from .target import is_aarch64

    if target.kind.name == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise TuningError("tuning a CUDA target measures on a GPU: none is visible here (run the tune on a GPU "
                              "machine, or pass an RPC runner whose devices have one)")
        return ms.runner.LocalRunner(
            timeout_sec=timeout_sec,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20),
        )
    if target.kind.name != "llvm" or (is_aarch64(target) and platform.machine() not in ("aarch64", "arm64")):
        raise TuningError(
            f"target {target.kind.name} {target.attrs.get('mtriple', '')} does not run on this machine: pass "
            "runner=sparks_tvm.tune.rpc_runner(tracker_host, tracker_port, key) (CLI: --rpc-tracker host:port "
            "--rpc-key KEY) to measure on the device"
        )
    return ms.runner.LocalRunner(
        timeout_sec=timeout_sec,
        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=50),
    )


def rpc_runner(tracker: str, key: str, timeout_sec: float = 60.0):
    """A MetaSchedule ``RPCRunner`` measuring on devices registered at ``tracker`` (``host:port``) under ``key``."""
    from tvm.s_tir import meta_schedule as ms

    host, sep, port = tracker.rpartition(":")
    if not sep or not port.isdigit():
        raise TuningError(f"bad RPC tracker {tracker!r}: expected host:port")
    return ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=timeout_sec),
        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=50),
        max_workers=1,
    )


class _NoTensorIntrinsics:
    """Keep ``TuneContext`` from importing ``tvm.s_tir.tensor_intrin`` (while it is constructed).

    ``TuneContext.__init__`` imports every tensor intrinsic TVM has (CUDA's are written in
    TVMScript and parsed at import): 20 s on an idle 2-core machine, 105 s on a loaded one,
    once per tuning process. The binary kernels' design spaces use none. A stand-in module
    is placed in ``sys.modules`` only if the real one is not imported yet, and removed on
    exit, so a later real import (tuning other ops with MetaSchedule's own rules) works.
    """

    NAME = "tvm.s_tir.tensor_intrin"

    def __enter__(self):
        import types

        self.installed = self.NAME not in sys.modules
        if self.installed:
            sys.modules[self.NAME] = types.ModuleType(self.NAME, "stand-in: sparks_tvm tuning needs no intrinsics")
        return self

    def __exit__(self, *exc):
        if self.installed and isinstance(sys.modules.get(self.NAME), type(sys)) and \
                (sys.modules[self.NAME].__doc__ or "").startswith("stand-in"):
            del sys.modules[self.NAME]
        return False


def _task_loggers(work_dir: str, names: list) -> list:
    """One DEBUG file log per task in ``work_dir/logs`` (MetaSchedule's per-task logs).

    Not ``get_loggers_from_work_dir``: its ``dictConfig`` fails on a second call in the same
    process (a handler without a name), i.e. on any second :func:`tune`.
    """
    log_dir = os.path.join(work_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        path = os.path.abspath(os.path.join(log_dir, f"task_{i:02d}_{name[:100]}.log"))
        lg = logging.getLogger("sparks_tvm.tune.task." + str(abs(hash(path))))
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        if not lg.handlers:
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
            lg.addHandler(handler)
        out.append(lg)
    return out


class _SchedulerLog:
    """Route MetaSchedule's own logger (task scheduler tables, XGBoost) to ``logs/task_scheduler.log``.

    Only warnings and errors still reach the console, so a tuning run's terminal shows the
    progress bar and the final table, not thousands of INFO lines.
    """

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, "logs", "task_scheduler.log")

    def __enter__(self):
        self.logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self.saved = (self.logger.level, self.logger.propagate)
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        self.console = logging.StreamHandler(sys.stderr)
        self.console.setLevel(logging.WARNING)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self.file)
        self.logger.addHandler(self.console)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.file)
        self.logger.removeHandler(self.console)
        self.file.close()
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        return False


# ----------------------------------------------------------------------------- work dir


def _read_meta(work_dir: str) -> dict | None:
    path = os.path.join(work_dir, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise TuningError(f"{path}: unreadable tuning metadata ({err})") from None


def _write_meta(work_dir: str, meta: dict) -> None:
    # Write-then-rename: a kill while writing leaves the previous file, never half of one.
    path = os.path.join(work_dir, META_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_target(work_dir: str, target, meta: dict | None = None) -> None:
    """Refuse records made for another target (MetaSchedule's lookups ignore the target)."""
    from .target import target_json

    meta = _read_meta(work_dir) if meta is None else meta
    if meta is None:
        return
    want = target_json(target)
    if meta.get("target") != want:
        raise TuningError(
            f"the tuning records in {work_dir} were made for target {_brief(meta.get('target'))}, "
            f"not {_brief(want)}: "
            "schedules tuned for one CPU are not valid (or not fast) on another. Tune this target into its "
            "own work dir (sparks-tvm tune ... --work-dir DIR)"
        )


def _brief(target_text) -> str:
    """``llvm mcpu=znver4 num-cores=2`` from a target's JSON (the fields that tell CPUs apart)."""
    try:
        spec = json.loads(target_text)
    except (TypeError, ValueError):
        return str(target_text)
    parts = [str(spec.get("kind"))] + [f"{k}={spec[k]}" for k in ("mtriple", "mcpu", "mattr", "num-cores") if k in spec]
    return "'" + " ".join(parts) + "'"


def repair_records(work_dir: str) -> int:
    """Drop a trailing partial line (a run killed while appending); returns lines dropped."""
    dropped = 0
    for name in (RECORDS_FILE, WORKLOADS_FILE, TRIALS_FILE):
        path = os.path.join(work_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        if not data:
            continue
        lines = data.split(b"\n")
        keep = len(lines)
        # Only the last line can be partial: JSON lines are appended one at a time.
        tail = lines[-1] if lines[-1] else (lines[-2] if len(lines) > 1 else b"")
        try:
            json.loads(tail)
            if lines[-1]:
                # A complete record without its newline: finish the line.
                with open(path, "ab") as fh:
                    fh.write(b"\n")
            continue
        except ValueError:
            keep = len(lines) - (1 if lines[-1] else 2)
        good = b"\n".join(lines[:keep]) + (b"\n" if keep else b"")
        with open(path, "wb") as fh:
            fh.write(good)
        dropped += 1
        logger.warning("%s: dropped a partial last line (a tuning run was killed while writing it)", path)
    return dropped


def open_database(work_dir: str, read_only: bool = False):
    """MetaSchedule's JSONDatabase in ``work_dir`` (created if missing).

    ``read_only`` (what ``compile(tuning_db=...)`` uses) never writes to ``work_dir``: the
    complete lines of the record files are copied to a private directory and the database is
    loaded from there, so a compile running beside a tune that is appending, or reading a
    damaged file, leaves the work dir exactly as it found it.
    """
    import shutil
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    if not read_only:
        os.makedirs(work_dir, exist_ok=True)
        repair_records(work_dir)
        return ms.database.JSONDatabase(
            path_workload=os.path.join(work_dir, WORKLOADS_FILE),
            path_tuning_record=os.path.join(work_dir, RECORDS_FILE),
            module_equality="structural",
        )
    private = tempfile.mkdtemp(prefix="sparks-tuning-db-")
    try:
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            src = os.path.join(work_dir, name)
            data = b""
            if os.path.exists(src):
                with open(src, "rb") as fh:
                    data = fh.read()
            # A line still being appended by a running tune has no newline yet: leave it out.
            if data and not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]
            with open(os.path.join(private, name), "wb") as fh:
                fh.write(data)
        return ms.database.JSONDatabase(
            path_workload=os.path.join(private, WORKLOADS_FILE),
            path_tuning_record=os.path.join(private, RECORDS_FILE),
            module_equality="structural",
        )
    finally:
        # JSONDatabase has read both files into memory; nothing is written to it when compiling.
        shutil.rmtree(private, ignore_errors=True)


def tuned_schedules(work_dir, target):
    """Schedules object for :func:`sparks_tvm.compile` that applies the records in ``work_dir``."""
    import schedules
    from schedules.tuning import TunedSchedules

    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        raise TuningError(f"tuning_db {work_dir}: no such directory")
    meta = _read_meta(work_dir)
    if meta is None or not os.path.exists(os.path.join(work_dir, RECORDS_FILE)):
        raise TuningError(f"tuning_db {work_dir}: no tuning records there ({META_FILE} or {RECORDS_FILE} is "
                          "missing); run sparks_tvm.tune with this work dir first")
    check_target(work_dir, target, meta)
    keep_default = {name: info["chosen_hash"] for name, info in meta.get("tasks", {}).items()
                    if info.get("use_default") and info.get("chosen_hash")}
    return TunedSchedules(schedules.for_target(target), open_database(work_dir, read_only=True), target,
                          keep_default=keep_default)


# ----------------------------------------------------------------------------- progress


def _make_progress_callback():
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(PyMeasureCallback):
        """Counts measured trials, keeps the best per task, appends the curve, draws the bar."""

        def __init__(self, run):
            super().__init__()
            self.run = run

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.run.on_batch(int(task_id), builder_results, runner_results)

    return Progress


@dataclass
class TaskResult:
    """One tuned kernel: name, how many layers use it, trials, default and best latency (ms)."""

    name: str
    layers: int
    trials: int = 0
    default_ms: float | None = None
    best_ms: float | None = None
    chosen: str = "tuned"

    @property
    def speedup(self) -> float | None:
        if self.default_ms is None or self.best_ms is None:
            return None
        return self.default_ms / self.best_ms


@dataclass
class TuneResult:
    """What :func:`tune` did: per-task results, the work dir, throughput."""

    work_dir: str
    target: str
    tasks: list = field(default_factory=list)
    trials_run: int = 0
    measured: int = 0
    seconds: float = 0.0
    curve_png: str | None = None

    @property
    def trials_per_minute(self) -> float:
        return 60.0 * self.trials_run / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        """Per task: trials, default latency, best latency, speed-up."""
        head = (f"{'task':<52} {'layers':>6} {'trials':>6} {'default ms':>11} {'best ms':>9} {'speed-up':>8} "
                f"{'compile uses':>12}")
        lines = [head, "-" * len(head)]
        for t in self.tasks:
            fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
            sp = f"{t.speedup:.2f}x" if t.speedup is not None else "-"
            lines.append(f"{t.name:<52} {t.layers:>6} {t.trials:>6} {fmt(t.default_ms):>11} {fmt(t.best_ms):>9} "
                         f"{sp:>8} {t.chosen:>12}")
        lines.append("default and best: re-measured interleaved at the end of the run (medians); compile uses the "
                     "tuned schedule only where it was faster")
        lines.append(f"{self.trials_run} trials this run ({self.measured} measured) in {self.seconds:.0f} s: "
                     f"{self.trials_per_minute:.1f} trials/min; records in {self.work_dir}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "work_dir": self.work_dir,
            "target": self.target,
            "trials_run": self.trials_run,
            "measured": self.measured,
            "seconds": self.seconds,
            "trials_per_minute": self.trials_per_minute,
            "tasks": [dict(name=t.name, layers=t.layers, trials=t.trials, default_ms=t.default_ms,
                           best_ms=t.best_ms, speedup=t.speedup, chosen=t.chosen) for t in self.tasks],
        }


class _Run:
    """State of one tuning run, shared by the progress callback."""

    def __init__(self, work_dir, tasks, total, done, best, progress):
        self.work_dir = work_dir
        self.tasks = tasks
        self.total = total
        self.done = done
        self.best = best  # task name -> best seconds so far
        self.progress = progress
        self.measured = 0
        self.attempted = 0
        self.errors = []
        self.task_trials = {t.name: 0 for t in tasks}

    def on_batch(self, task_id, builder_results, runner_results):
        task = self.tasks[task_id]
        lines = []
        for b, r in zip(builder_results, runner_results):
            self.attempted += 1
            self.done += 1
            secs = None
            if b.error_msg is None and r.error_msg is None and r.run_secs:
                secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                self.measured += 1
                if secs < self.best.get(task.name, float("inf")):
                    self.best[task.name] = secs
            else:
                msg = b.error_msg or r.error_msg or "no timing"
                self.errors.append(str(msg).strip().splitlines()[-1][:300] if str(msg).strip() else "error")
            self.task_trials[task.name] += 1
            lines.append(json.dumps({"task": task.name, "trial": self.done, "latency_s": secs,
                                     "best_s": self.best.get(task.name)}))
        with open(os.path.join(self.work_dir, TRIALS_FILE), "a") as fh:
            fh.write("\n".join(lines) + "\n")
        if self.progress:
            best = self.best.get(task.name)
            bar_w = 30
            fill = int(bar_w * min(self.done, self.total) / max(1, self.total))
            sys.stderr.write(
                f"\r[{'#' * fill}{'.' * (bar_w - fill)}] {self.done}/{self.total} trials  "
                f"{task.name[:40]} best {best * 1e3:.4f} ms   " if best is not None else
                f"\r[{'#' * fill}{'.' * (bar_w - fill)}] {self.done}/{self.total} trials  {task.name[:40]}   "
            )
            sys.stderr.flush()


# ----------------------------------------------------------------------------- tune


def extract_tasks(proto, specs, target, strict: bool = True, force_kind: str | None = None):
    """The model's binary kernels as tuning tasks, deduplicated: ``[(KernelTask, layers)]``."""
    import schedules
    from schedules.tuning import RecordingSchedules, make_task

    from .compiler import build_relax

    rec = RecordingSchedules(schedules.for_target(target))
    build_relax(proto, specs, target, strict=strict, force_kind=force_kind, kernel_schedules=rec)
    tasks, counts = {}, {}
    for kind, geom, k, mode in rec.calls:
        task = make_task(rec.base, kind, geom, k, mode)
        tasks.setdefault(task.name, task)
        counts[task.name] = counts.get(task.name, 0) + 1
    return [(tasks[name], counts[name]) for name in tasks]


def _measure_schedule(task, sch, target, builder, runner, what: str = "default schedule"):
    """Build and run one schedule of ``task`` with the tuning builder/runner: ``(run secs, args info)``."""
    from tvm.s_tir import meta_schedule as ms

    (b,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if b.error_msg is not None:
        raise TuningError(f"task {task.name}: the {what} does not build: {b.error_msg.strip()[:500]}")
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    (fut,) = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu" if target.kind.name == "llvm" else str(target.kind.name), args_info)])
    r = fut.result()
    try:
        os.remove(b.artifact_path)
    except OSError:
        pass
    if r.error_msg is not None or not r.run_secs:
        raise TuningError(f"task {task.name}: the {what} could not be measured: "
                          f"{str(r.error_msg).strip()[-800:]}")
    return [float(s) for s in r.run_secs], args_info


def _check_printable(database, tasks, work_dir):
    """Refuse to search from a record whose trace TVM cannot print.

    Work dirs tuned before this check seeded the database with the default schedule itself,
    ``decompose_padding`` included; MetaSchedule would crash with a type error on the first
    failed candidate descending from it.
    """
    for task in tasks:
        records = database.get_top_k(database.commit_workload(task.mod), 1 << 30)
        for rec in records:
            try:
                rec.trace.as_python()
            except Exception as err:  # noqa: BLE001 - TVM raises a TypeError from its FFI
                raise TuningError(
                    f"task {task.name}: {work_dir} holds a record whose trace TVM cannot print "
                    f"({err.__class__.__name__}: {str(err)[:200]}); it was made by an older sparks_tvm. "
                    f"compile(tuning_db=...) can still use this work dir, and so can tune() with no more "
                    f"trials than it holds (it then only reports); to tune more, start a new one"
                ) from None


def _measure_default(task, target, builder, runner):
    """Measure the default schedule and the record that stands for it in the database.

    Returns ``(default secs, seed schedule, args info, seed run secs)``: the seed is
    ``task.default_point()`` (see :class:`schedules.tuning.KernelTask`), measured itself when it
    is not the default schedule, so that its record's latency is its own.
    """
    import tvm_ffi

    default = task.default_schedule()
    secs, args_info = _measure_schedule(task, default, target, builder, runner)
    point = task.default_point()
    seed_secs = secs
    if not tvm_ffi.structural_equal(point.mod, default.mod):
        seed_secs, _ = _measure_schedule(task, point, target, builder, runner, "default schedule's seed point")
    return sum(secs) / len(secs), point, args_info, seed_secs


def tune(model, target="llvm", work_dir="sparks-tune", trials: int = 64, runner=None, *, shapes: dict | None = None,
         strict: bool = True, force_kind: str | None = None, builder=None, batch: int = 8, seed: int = 0,
         progress: bool | None = None, plot: bool = True) -> TuneResult:
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
    runner : MetaSchedule Runner, optional
        Default: :func:`default_runner` (local). For a Raspberry Pi: :func:`rpc_runner`.
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

    Returns
    -------
    TuneResult
        ``.table()`` is the per-task summary.

    Raises
    ------
    TuningError
        No binary kernel to tune; records of another target in ``work_dir``; a default
        schedule that cannot be measured; trials were run but none could be measured.
    """
    from . import frontend
    from .target import resolve_target

    t_start = time.perf_counter()
    if trials < 0:
        raise TuningError(f"trials must be >= 0, got {trials}")
    proto = frontend.load_onnx(model)
    frontend.check_supported_ops(proto)
    specs = frontend.input_specs(proto, shapes)
    tgt = resolve_target(target)
    pairs = extract_tasks(proto, specs, tgt, strict=strict, force_kind=force_kind)
    if not pairs:
        raise TuningError("the model has no binary convolution to tune (see `sparks-tvm inspect`)")
    return tune_kernels(pairs, tgt, work_dir, trials, runner, builder=builder, batch=batch, seed=seed,
                        progress=progress, plot=plot, t_start=t_start)


def tune_kernels(pairs, tgt, work_dir, trials: int, runner=None, *, builder=None, batch: int = 8, seed: int = 0,
                 progress: bool | None = None, plot: bool = True, t_start: float | None = None,
                 skip_intrinsics: bool = True, max_trials_per_task: int | None = None,
                 validate_rounds: int = 9) -> TuneResult:
    """Tune kernel tasks directly: ``pairs`` is ``[(schedules.tuning.KernelTask, layers)]``.

    :func:`tune` after task extraction; also used by ``benchmarks/bench_tune.py`` on layer
    shapes without a model. ``skip_intrinsics=False`` keeps MetaSchedule's import of every
    tensor intrinsic (to measure the stock set-up).
    """
    import contextlib

    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from .target import target_json

    t_start = time.perf_counter() if t_start is None else t_start
    work_dir = os.fspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    meta = _read_meta(work_dir)
    check_target(work_dir, tgt, meta)
    if meta is None:
        meta = {"target": target_json(tgt), "tasks": {}}
    database = open_database(work_dir)
    builder = builder if builder is not None else in_process_builder()
    runner = runner if runner is not None else default_runner(tgt)
    progress = sys.stderr.isatty() if progress is None else progress

    # The default schedule of each task, measured once per work dir; its seed point (the default
    # unless that cannot be printed, see KernelTask) is committed as a record, so the search
    # starts from the default's knobs whatever it samples.
    for task, _layers in pairs:
        info = meta["tasks"].get(task.name)
        if info is not None and info.get("default_s") is not None:
            continue
        secs, point, args_info, all_secs = _measure_default(task, tgt, builder, runner)
        workload = database.commit_workload(task.mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            point.trace, workload, [_float(s) for s in all_secs], tgt, args_info))
        # Until a search's winner is validated, the seed stands for the default: a run killed or
        # failing before the end must not leave compile replaying the seed (no padding split).
        meta["tasks"][task.name] = {"default_s": secs, "use_default": True,
                                    "chosen_hash": str(tvm_ffi.structural_hash(point.mod))}
        _write_meta(work_dir, meta)

    # Trials already in the database (resume): all records of our workloads but the defaults.
    done = sum(_count_records(database, task.mod) - 1 for task, _ in pairs)
    remaining = max(0, trials - done)
    best = {}
    for task, _ in pairs:
        rec = database.query_tuning_record(task.mod, tgt, "main")
        if rec is not None and rec.run_secs:
            best[task.name] = _mean(rec.run_secs)
    run = _Run(work_dir, [t for t, _ in pairs], total=max(trials, done), done=done, best=best, progress=progress)

    if remaining > 0:
        _check_printable(database, [t for t, _ in pairs], work_dir)
        names = [t.name for t, _ in pairs]
        loggers = _task_loggers(work_dir, names)
        from tvm.s_tir.meta_schedule.utils import fork_seed

        from schedules.tuning import mutate_categorical

        contexts = []
        for (task, _), log, rand_state in zip(pairs, loggers, fork_seed(seed, n=len(pairs))):
            space = ms.space_generator.ScheduleFn(
                task.space, sch_rules=[], postprocs=[], mutator_probs={mutate_categorical(): 1.0}
            )
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=64, init_measured_ratio=0.25, init_min_unmeasured=16, genetic_num_iters=2,
                max_fail_count=3,
            )
            with _NoTensorIntrinsics() if skip_intrinsics else contextlib.nullcontext():
                contexts.append(ms.TuneContext(
                    mod=task.mod, target=tgt, space_generator=space, search_strategy=strategy, task_name=task.name,
                    rand_state=rand_state, num_threads=1, logger=log,
                ).clone())
        callbacks = ms.measure_callback.MeasureCallback.create("default") + [_make_progress_callback()(run)]
        with _SchedulerLog(work_dir):
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
        if progress:
            sys.stderr.write("\n")
        if run.attempted > 0 and run.measured == 0:
            raise TuningError(
                f"none of the {run.attempted} candidates could be measured; first error: "
                f"{run.errors[0] if run.errors else 'unknown'}"
            )

    result = TuneResult(work_dir=work_dir, target=target_json(tgt), trials_run=run.attempted, measured=run.measured)
    for task, layers in pairs:
        info = meta["tasks"][task.name]
        rec = database.query_tuning_record(task.mod, tgt, "main")
        trials_done = _count_records(database, task.mod) - 1
        # Validate the search's winner against the default, interleaved (see _validate): a lone
        # noisy measurement on a shared machine must not pass for a speed-up.
        if rec is not None and info.get("validated_trials") != trials_done:
            for key in ("validated_default_s", "validated_best_s", "use_default", "chosen_hash"):
                info.pop(key, None)  # an earlier run's verdict must not outlive this one
            info.update(_validate(task, rec.trace, tgt, builder, runner, rounds=validate_rounds))
            info["validated_trials"] = trials_done
        default_ms = info.get("validated_default_s", info["default_s"]) * 1e3
        if info.get("use_default"):
            # What compile runs is the default: its latency, not that of the record that lost to
            # it (or of the seed record, measured apart from the default).
            best_ms = default_ms
        else:
            best_ms = info.get("validated_best_s", _mean(rec.run_secs) if rec else info["default_s"]) * 1e3
        tr = TaskResult(task.name, layers, trials=trials_done, default_ms=default_ms, best_ms=best_ms,
                        chosen="default" if info.get("use_default") else "tuned")
        info.update(trials=trials_done, layers=layers)
        result.tasks.append(tr)
    result.seconds = time.perf_counter() - t_start
    _write_meta(work_dir, meta)
    if plot:
        result.curve_png = plot_curve(work_dir, meta)
    with open(os.path.join(work_dir, "tune_summary.json"), "w") as fh:
        json.dump(result.to_json(), fh, indent=1)
    return result


#: Fraction by which the best record must beat the default in :func:`_validate` to be used.
VALIDATION_MARGIN = 0.03


def _validate(task, trace, tgt, builder, runner, rounds: int = 5) -> dict:
    """Re-measure the default and the best record, alternating, ``rounds`` times each.

    Returns ``validated_default_s`` / ``validated_best_s`` (medians; the latter is the
    default's when the default is kept), ``use_default`` (the best record is not faster by
    :data:`VALIDATION_MARGIN`: compile keeps the default) and ``chosen_hash`` (structural
    hash of the validated schedule, so a later, unvalidated best record is not overruled).
    """
    import statistics

    import tvm_ffi
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    best = s_tir.Schedule(task.mod)
    trace.apply_to_schedule(best, remove_postproc=False)
    default = task.default_schedule()
    chosen_hash = str(tvm_ffi.structural_hash(best.mod))
    # The seed record stands for the default (it is the default less an unprintable step).
    if tvm_ffi.structural_equal(best.mod, default.mod) or tvm_ffi.structural_equal(best.mod, task.default_point().mod):
        return {"use_default": True, "chosen_hash": chosen_hash}
    built = builder.build([ms.builder.BuilderInput(sch.mod, tgt) for sch in (default, best)])
    if any(b.error_msg is not None for b in built):
        return {"use_default": True, "chosen_hash": chosen_hash}
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    dev = "cpu" if tgt.kind.name == "llvm" else str(tgt.kind.name)
    if isinstance(runner, ms.runner.LocalRunner) and tgt.kind.name == "llvm":
        # This machine's CPU: time both in this process, interleaved, as bench_tune.py does.
        # Through LocalRunner's worker, the default schedule measured 1.4-1.8x slower than in
        # any process of ours (64->64, 1 thread: 0.286 vs 0.197 ms) while the records did not,
        # so records 6-35% slower were chosen on every ResNet-18 layer (cause not found).
        times = _time_in_process([b.artifact_path for b in built], args_info, rounds)
    else:
        times = ([], [])
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                (fut,) = runner.run([ms.runner.RunnerInput(built[i].artifact_path, dev, args_info)])
                res = fut.result()
                if res.error_msg is None and res.run_secs:
                    times[i].append(_mean(res.run_secs))
    for b in built:
        try:
            os.remove(b.artifact_path)
        except OSError:
            pass
    if not times[0] or not times[1]:
        return {"use_default": True, "chosen_hash": chosen_hash}
    d, b = float(statistics.median(times[0])), float(statistics.median(times[1]))
    # A record must win by more than the measurement noise: with `b >= d` alone, 5 noisy rounds
    # picked tuned schedules that 30 interleaved rounds then found 3-12% slower
    # (benchmarks/results/tune_layers.md, run at 556eede).
    use_default = bool(b >= (1.0 - VALIDATION_MARGIN) * d)
    return {"validated_default_s": d, "validated_best_s": d if use_default else b, "use_default": use_default,
            "chosen_hash": chosen_hash}


def _time_in_process(paths, args_info, rounds: int) -> list:
    """Seconds per call of each library in ``paths``, timed interleaved in this process."""
    import numpy as np
    import tvm

    from .bench import interleaved_times

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for info in args_info:
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        if dtype.startswith("float"):
            value = rng.standard_normal(shape).astype(dtype)
        else:  # codeword bits, packed indices: any value is valid for the kernels
            value = rng.integers(0, 256, size=shape).astype(dtype)
        args.append(tvm.runtime.tensor(value, dev))
    libs = [tvm.runtime.load_module(p) for p in paths]
    for lib in libs:
        lib["main"](*args)
    return interleaved_times(libs, args, dev, rounds)[0]


def _float(v):
    from tvm import tirx

    return tirx.FloatImm("float32", float(v))


def _mean(run_secs) -> float:
    vals = [float(s) for s in run_secs]
    return sum(vals) / len(vals)


def _count_records(database, mod) -> int:
    """Records of ``mod``'s workload, failed candidates included (``get_top_k`` skips those)."""
    if not database.has_workload(mod):
        return 0
    workload = database.commit_workload(mod)
    return sum(1 for rec in database.get_all_tuning_records() if rec.workload.same_as(workload))


def plot_curve(work_dir: str, meta: dict | None = None) -> str | None:
    """``tune_curve.png``: best latency so far (relative to the default) vs trials, one line per task."""
    path = os.path.join(work_dir, TRIALS_FILE)
    if not os.path.exists(path):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no tuning curve PNG")
        return None
    meta = meta or _read_meta(work_dir) or {"tasks": {}}
    series = {}
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            series.setdefault(row["task"], []).append(row)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in series.items():
        default = meta["tasks"].get(name, {}).get("default_s")
        best, xs, ys = default, [0], [default * 1e3 if default else None]
        for i, row in enumerate(rows, 1):
            if row["latency_s"] is not None and (best is None or row["latency_s"] < best):
                best = row["latency_s"]
            xs.append(i)
            ys.append(best * 1e3 if best is not None else None)
        ax.step(xs, ys, where="post", label=name)
    ax.set_xlabel("trials of the task (0 = default schedule)")
    ax.set_ylabel("best latency (ms)")
    ax.set_yscale("log")
    ax.set_title("sparks_tvm tuning: best latency vs trials")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out = os.path.join(work_dir, CURVE_FILE)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
