"""The tuning work dir: MetaSchedule's JSON database plus sparks_tvm's metadata.

Layout (see :mod:`sparks_tvm.tune`): ``database_workload.json`` and
``database_tuning_record.json`` (MetaSchedule's JSONDatabase, JSON lines, append-only),
``sparks_tuning.json`` (target, per-task default latency, validation verdicts),
``sparks_trials.jsonl`` (the curve), ``tune_curve.png``, ``logs/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from tvm.s_tir import meta_schedule as ms

import schedules
from schedules.tuning import TunedSchedules

from ..errors import TuningError
from ..target import target_json

logger = logging.getLogger("sparks_tvm")

META_FILE = "sparks_tuning.json"
TRIALS_FILE = "sparks_trials.jsonl"
CURVE_FILE = "tune_curve.png"
RECORDS_FILE = "database_tuning_record.json"
WORKLOADS_FILE = "database_workload.json"
SUMMARY_FILE = "tune_summary.json"
#: MetaSchedule records a candidate whose build or run failed with this latency (kMaxMeanTime).
FAILED_SECS = 1e9


def read_meta(work_dir: str) -> dict | None:
    path = os.path.join(work_dir, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise TuningError(f"{path}: unreadable tuning metadata ({err})") from None


def write_meta(work_dir: str, meta: dict) -> None:
    # Write-then-rename: a kill while writing leaves the previous file, never half of one.
    path = os.path.join(work_dir, META_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def check_target(work_dir: str, target, meta: dict | None = None) -> None:
    """Refuse records made for another target (MetaSchedule's lookups ignore the target)."""
    meta = read_meta(work_dir) if meta is None else meta
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
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        raise TuningError(f"tuning_db {work_dir}: no such directory")
    meta = read_meta(work_dir)
    if meta is None or not os.path.exists(os.path.join(work_dir, RECORDS_FILE)):
        raise TuningError(f"tuning_db {work_dir}: no tuning records there ({META_FILE} or {RECORDS_FILE} is "
                          "missing); run sparks_tvm.tune with this work dir first")
    check_target(work_dir, target, meta)
    keep_default = {name: info["chosen_hash"] for name, info in meta.get("tasks", {}).items()
                    if info.get("use_default") and info.get("chosen_hash")}
    return TunedSchedules(schedules.for_target(target), open_database(work_dir, read_only=True), target,
                          keep_default=keep_default)



def count_records(database, mod) -> int:
    """Records of ``mod``'s workload, failed candidates included (``get_top_k`` skips those)."""
    if not database.has_workload(mod):
        return 0
    workload = database.commit_workload(mod)
    return sum(1 for rec in database.get_all_tuning_records() if rec.workload.same_as(workload))


def check_printable(database, tasks, work_dir):
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

