"""What a tuning run reports: per-task results, the summary table and the tuning curve."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from .database import CURVE_FILE, TRIALS_FILE, read_meta

logger = logging.getLogger("sparks_tvm")


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



@dataclass
class ArmTaskResult:
    """One ARM task (runner ``emulated-pi``): instructions of the default and of the chosen kernel.

    ``default_kernel`` is what compile would build untuned (the instruction model's choice,
    default plan); ``chosen_kernel`` and ``plan`` are what compile builds with the records.
    """

    name: str
    layers: int
    trials: int = 0
    default_kernel: str = "sparks"
    default_count: int | None = None
    chosen_kernel: str | None = None
    best_count: int | None = None
    plan: dict | None = None

    @property
    def ratio(self) -> float | None:
        """Tuned / default instructions (<= 1: the default is a candidate)."""
        if not self.default_count or self.best_count is None:
            return None
        return self.best_count / self.default_count


@dataclass
class ArmTuneResult:
    """What an ARM tuning run did; the cost is aarch64 instructions on the emulated Pi, not time."""

    work_dir: str
    target: str
    tasks: list = field(default_factory=list)
    trials_run: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)
    curve_png: str | None = None

    @property
    def default_total(self) -> int:
        return sum((t.default_count or 0) * t.layers for t in self.tasks)

    @property
    def tuned_total(self) -> int:
        return sum((t.best_count or 0) * t.layers for t in self.tasks)

    def table(self) -> str:
        """Per task: trials, default and tuned instructions (millions), ratio, kernel and plan."""
        head = (f"{'task':<52} {'layers':>6} {'trials':>6} {'default M':>10} {'tuned M':>8} {'ratio':>6} "
                f"{'kernel':>14}  plan")
        lines = [head, "-" * len(head)]
        for t in self.tasks:
            fmt = lambda v: f"{v / 1e6:.3f}" if v is not None else "-"  # noqa: E731
            ratio = f"{t.ratio:.3f}" if t.ratio is not None else "-"
            kernel = t.chosen_kernel if t.chosen_kernel == t.default_kernel else f"{t.default_kernel}->{t.chosen_kernel}"
            plan = ", ".join(f"{k}={v}" for k, v in (t.plan or {}).items())
            lines.append(f"{t.name:<52} {t.layers:>6} {t.trials:>6} {fmt(t.default_count):>10} "
                         f"{fmt(t.best_count):>8} {ratio:>6} {kernel:>14}  {plan}")
        d, b = self.default_total, self.tuned_total
        if d:
            lines.append(f"binary layers, weighted by layers: default {d / 1e6:.2f} M, tuned {b / 1e6:.2f} M "
                         f"instructions ({b / d:.3f}x)")
        lines.append("optimised: aarch64 instructions executed per kernel call (exact, one thread, emulated "
                     "Raspberry Pi 4), not time; every candidate's output was checked bit-exact")
        lines.append(f"{self.trials_run} trials this run in {self.seconds:.0f} s; records in {self.work_dir}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "work_dir": self.work_dir, "target": self.target, "runner": "emulated-pi",
            "cost": "aarch64 instructions (emulated Raspberry Pi 4), not time",
            "trials_run": self.trials_run, "seconds": self.seconds, "errors": self.errors,
            "default_total": self.default_total, "tuned_total": self.tuned_total,
            "tasks": [dict(name=t.name, layers=t.layers, trials=t.trials, default_kernel=t.default_kernel,
                           default_count=t.default_count, chosen_kernel=t.chosen_kernel, best_count=t.best_count,
                           ratio=t.ratio, plan=t.plan) for t in self.tasks],
        }


def plot_curve(work_dir: str, meta: dict | None = None) -> str | None:
    """``tune_curve.png``: best latency so far (relative to the default) vs trials, one line per task."""
    path = os.path.join(work_dir, TRIALS_FILE)
    if not os.path.exists(path):
        return None
    try:
        import matplotlib  # optional: no curve without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no tuning curve PNG")
        return None
    meta = meta or read_meta(work_dir) or {"tasks": {}}
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
