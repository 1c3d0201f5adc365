"""The tuning work dir: MetaSchedule's JSON database plus sparks_tvm's metadata.

Layout (see :mod:`sparks_tvm.tune`): ``database_workload.json`` and
``database_tuning_record.json`` (MetaSchedule's JSONDatabase, JSON lines, append-only),
``sparks_tuning.json`` (target, per-task default latency, validation verdicts),
``sparks_trials.jsonl`` (the curve), ``tune_curve.png``, ``logs/``; for an ARM run on the
emulated Pi, ``arm_plans.json`` and ``arm_trials.jsonl`` instead (:mod:`.arm_records`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading

from tvm.s_tir import meta_schedule as ms

import schedules
from schedules.tuning import TunedSchedules

from ..errors import TuningDatabaseError, TuningError, WorkDirLockedError
from ..target import target_json
from .arm_records import ArmPlans, read_plans

logger = logging.getLogger("sparks_tvm")

META_FILE = "sparks_tuning.json"
TRIALS_FILE = "sparks_trials.jsonl"
CURVE_FILE = "tune_curve.png"
RECORDS_FILE = "database_tuning_record.json"
WORKLOADS_FILE = "database_workload.json"
SUMMARY_FILE = "tune_summary.json"
LOCK_FILE = ".sparks-tune.lock"
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
    """Drop a partial last line (a run killed while appending); returns lines dropped.

    Only a last line *without its newline* can be a partial write (JSON lines are appended
    one at a time, newline last): it is dropped, or finished with its newline if it is a
    whole record. Any other line that is not JSON is damage of another kind (an editor, a
    disk error, a concurrent writer): :class:`TuningDatabaseError` names it and the file is
    left exactly as it is.
    """
    dropped = 0
    for name in (RECORDS_FILE, WORKLOADS_FILE, TRIALS_FILE):
        path = os.path.join(work_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        complete, _, partial = data.rpartition(b"\n") if not data.endswith(b"\n") else (data[:-1], b"\n", b"")
        check_lines(path, complete.split(b"\n") if complete else [])
        if not partial:
            continue
        if _is_json(partial):
            with open(path, "ab") as fh:  # a whole record without its newline: finish the line
                fh.write(b"\n")
            continue
        with open(path, "wb") as fh:
            fh.write(complete + b"\n" if complete else b"")
        dropped += 1
        logger.warning("%s: dropped a partial last line (a tuning run was killed while writing it)", path)
    return dropped


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def check_lines(path: str, lines: list) -> None:
    """Raise :class:`TuningDatabaseError` at the first complete line that is not JSON."""
    for i, line in enumerate(lines):
        if line.strip() and not _is_json(line):
            raise TuningDatabaseError(
                f"{path}: line {i + 1} of {len(lines)} is not a JSON record ({line[:60]!r}...), and it is not a "
                "partial last write; the file is kept as it is. Move the work dir away and tune into a fresh "
                "one, or delete that line if you know it is the only damage")


#: (work dir, thread) holding the lock -> nesting depth (flock refuses a second open file
#: even in the same process, which is what another thread should get).
_HELD: dict = {}


@contextlib.contextmanager
def lock_work_dir(work_dir: str, wait: bool = False):
    """Hold the work dir's lock (``.sparks-tune.lock``, with the holder's PID) for one tuning run.

    Two runs appending to one MetaSchedule database interleave their records and each
    overwrites the other's metadata. Without ``wait`` a second run fails at once with
    :class:`WorkDirLockedError` naming the holder; with it, it waits for the first to end.
    The lock is an ``flock``: the kernel releases it when its holder dies, however it dies.
    Re-entrant within a thread (:func:`tune` takes it before extracting the tasks, so a second
    run fails before any work; :func:`tune_kernels` inside it takes it again); another thread
    of the same process is refused like another process.
    """
    key = (os.path.realpath(work_dir), threading.get_ident())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = os.path.join(work_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(fd)
            if not wait:
                raise WorkDirLockedError(
                    f"work dir {work_dir} is in use by another tuning run (PID {holder}); wait for it to end, "
                    "rerun with --wait (tune(..., wait=True)) to queue behind it, or use another work dir") from None
            logger.warning("work dir %s is in use by PID %s: waiting for it to end", work_dir, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def prepare_work_dir(work_dir: str) -> str:
    """Create ``work_dir`` if needed; :class:`TuningError` if it is a file or cannot be created."""
    work_dir = os.fspath(work_dir)
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise TuningError(f"work dir {work_dir} is a file, not a folder: give a new or existing folder")
    try:
        os.makedirs(work_dir, exist_ok=True)
    except OSError as err:
        raise TuningError(f"work dir {work_dir}: cannot create it ({err.strerror or err})") from None
    return work_dir


def open_database(work_dir: str, read_only: bool = False):
    """MetaSchedule's JSONDatabase in ``work_dir`` (created if missing).

    ``read_only`` (what ``compile(tuning_db=...)`` uses) never writes to ``work_dir``: the
    complete lines of the record files are copied to a private directory and the database is
    loaded from there, so a compile running beside a tune that is appending, or reading a
    damaged file, leaves the work dir exactly as it found it.
    """
    if not read_only:
        prepare_work_dir(work_dir)
        repair_records(work_dir)
        return _json_database(work_dir, work_dir)
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
            check_lines(src, data.split(b"\n")[:-1])
            with open(os.path.join(private, name), "wb") as fh:
                fh.write(data)
        return _json_database(private, work_dir)
    finally:
        # JSONDatabase has read both files into memory; nothing is written to it when compiling.
        shutil.rmtree(private, ignore_errors=True)


def _json_database(folder: str, work_dir: str):
    """MetaSchedule's JSONDatabase on ``folder``; its bare RuntimeError on bad records is named."""
    try:
        return ms.database.JSONDatabase(
            path_workload=os.path.join(folder, WORKLOADS_FILE),
            path_tuning_record=os.path.join(folder, RECORDS_FILE),
            module_equality="structural",
        )
    except Exception as err:  # noqa: BLE001 - TVM raises RuntimeError, bad_alloc, UnicodeDecodeError
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise TuningDatabaseError(
            f"the tuning database in {work_dir} is corrupt or was not written by sparks_tvm.tune "
            f"({err.__class__.__name__}: {first}); the files are kept: move the work dir away and tune into a "
            "fresh one") from None


def tuned_schedules(work_dir, target):
    """Schedules object for :func:`sparks_tvm.compile` that applies the records in ``work_dir``."""
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        raise TuningError(f"tuning_db {work_dir}: no such directory")
    meta = read_meta(work_dir)
    arm = read_plans(work_dir)
    if arm is not None:
        # An ARM run (runner="emulated-pi"): NEON plans, not MetaSchedule records.
        check_target(work_dir, target, meta if meta is not None else {"target": arm.get("target")})
        base = schedules.for_target(target)
        if not hasattr(base, "plans"):
            raise TuningError(f"tuning_db {work_dir}: its ARM records do not apply to a {target.kind.name} target")
        base = type(base).for_target(target, plans=ArmPlans(arm))
        if not os.path.exists(os.path.join(work_dir, RECORDS_FILE)):
            return base
        return TunedSchedules(base, open_database(work_dir, read_only=True), target, keep_default=_kept(meta))
    if meta is None or not os.path.exists(os.path.join(work_dir, RECORDS_FILE)):
        raise TuningError(f"tuning_db {work_dir}: no tuning records there ({META_FILE} or {RECORDS_FILE} is "
                          "missing); run sparks_tvm.tune with this work dir first")
    check_target(work_dir, target, meta)
    return TunedSchedules(schedules.for_target(target), open_database(work_dir, read_only=True), target,
                          keep_default=_kept(meta))


def _kept(meta: dict | None) -> dict:
    """Task name -> hash of the best record that lost to the default when both were re-measured."""
    return {name: info["chosen_hash"] for name, info in (meta or {}).get("tasks", {}).items()
            if info.get("use_default") and info.get("chosen_hash")}



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

