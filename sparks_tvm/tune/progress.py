"""Progress of a tuning run: the trial log and bar, and where MetaSchedule's logs go."""

from __future__ import annotations

import json
import logging
import os
import sys

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

from .database import TRIALS_FILE


@derived_object
class ProgressCallback(PyMeasureCallback):
    """Counts measured trials, keeps the best per task, appends the curve, draws the bar."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.run.on_batch(int(task_id), builder_results, runner_results)


class Run:
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



class LogFile(logging.FileHandler):
    """A log file that, when it cannot be written (a full disk), says so once and stops.

    ``logging.FileHandler`` prints a traceback per record that fails (``--- Logging error
    ---``); a log is not worth that, nor worth stopping a tuning run whose records may still
    fit. One line on stderr, then nothing more is written to that file.
    """

    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def handleError(self, record):  # noqa: N802 - logging's name
        self._give_up(sys.exc_info()[1])

    def close(self):
        try:
            super().close()
        except OSError as err:  # the last buffered lines did not fit either
            self._give_up(err)

    def _give_up(self, err):
        if not self.failed:
            sys.stderr.write(f"sparks-tvm: warning: cannot write the log {self.baseFilename} "
                             f"({getattr(err, 'strerror', None) or err}); not logging there any more\n")
        self.failed = True


def task_loggers(work_dir: str, names: list) -> list:
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
            handler = LogFile(path)
            handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
            lg.addHandler(handler)
        out.append(lg)
    return out


class SchedulerLog:
    """Route MetaSchedule's own logger (task scheduler tables, XGBoost) to ``logs/task_scheduler.log``.

    Only warnings and errors still reach the console, so a tuning run's terminal shows the
    progress bar and the final table, not thousands of INFO lines.
    """

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, "logs", "task_scheduler.log")

    def __enter__(self):
        self.logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self.saved = (self.logger.level, self.logger.propagate)
        self.file = LogFile(self.path)
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

