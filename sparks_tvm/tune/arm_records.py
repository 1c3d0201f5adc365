"""The ARM tuning records: NEON kernel plans and the Sparks-vs-dense choice, per layer task.

The NEON kernels (:mod:`sparks_tvm.kernels.sparks_conv2d_neon`, ``binary_conv2d_neon``) are
written out with TIR's IRBuilder, so their tuned choices are plain plans, not MetaSchedule
traces. ``sparks_tvm.tune(..., runner="emulated-pi")`` writes them to the work dir:

- ``arm_plans.json``: per task (one per distinct binary layer), its geometry, K and mode,
  the default and the best plan of each kernel (Sparks, dense) with their instruction
  counts, and the kernel compile should use (``choice``: the one with fewer instructions);
- ``arm_trials.jsonl``: one line per counted candidate (task, kernel, plan, instructions,
  exact), appended as each batch is counted: a rerun resumes from it.

:class:`ArmPlans` is what ``schedules.arm.ArmSchedules`` consults (``plans`` attribute) when
``compile(..., tuning_db=work_dir)`` builds for an ARM target.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from ..errors import TuningDatabaseError
from ..kernels.binary_conv2d_neon import NeonBinaryPlan
from ..kernels.sparks_conv2d_neon import NeonSparksPlan

logger = logging.getLogger(__name__)

PLANS_FILE = "arm_plans.json"
ARM_TRIALS_FILE = "arm_trials.jsonl"
#: The two NEON kernels a binary layer can run on.
FAMILIES = ("sparks", "dense")


def geom_key(geom) -> str:
    """``1x64x56x56_o64_k3x3_s1x1_p1111``: a layer's geometry as a record key."""
    return (f"{geom.batch}x{geom.in_channels}x{geom.height}x{geom.width}_o{geom.out_channels}"
            f"_k{geom.kernel[0]}x{geom.kernel[1]}_s{'x'.join(str(v) for v in geom.stride)}"
            f"_p{''.join(str(v) for v in geom.padding)}")


def plan_json(plan) -> dict:
    return dataclasses.asdict(plan)


def read_plans(work_dir: str) -> dict | None:
    """The parsed ``arm_plans.json`` of ``work_dir``, None if there is none."""
    path = os.path.join(work_dir, PLANS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise TuningDatabaseError(f"{path}: unreadable ARM tuning records ({err}); move the work dir away and "
                                  "tune into a fresh one") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise TuningDatabaseError(f"{path}: not ARM tuning records written by sparks_tvm.tune")
    return data


def write_plans(work_dir: str, data: dict) -> None:
    # Write-then-rename: a kill while writing leaves the previous file, never half of one.
    path = os.path.join(work_dir, PLANS_FILE)
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_trials(work_dir: str) -> list:
    """The counted candidates of ``arm_trials.jsonl`` (a partial last line, from a kill, is skipped)."""
    path = os.path.join(work_dir, ARM_TRIALS_FILE)
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def append_trials(work_dir: str, rows: list) -> None:
    with open(os.path.join(work_dir, ARM_TRIALS_FILE), "a") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


class ArmPlans:
    """Lookups of a work dir's ARM records, for ``ArmSchedules`` (its ``plans`` attribute).

    Each method returns None where the records say nothing (the schedules then keep their
    defaults). ``applied`` lists ``(what, task)`` for every lookup a record answered.

    Parameters
    ----------
    data : dict
        The parsed ``arm_plans.json`` (:func:`read_plans`).
    """

    def __init__(self, data: dict):
        self.tasks = data["tasks"]
        self.applied = []
        self._classes = {"sparks": NeonSparksPlan, "dense": NeonBinaryPlan}

    def _matches(self, geom, num_codewords=None, mode=None):
        key = geom_key(geom)
        for name, rec in self.tasks.items():
            if rec["geom"] == key and (num_codewords is None or rec.get("k") == num_codewords) and \
                    (mode is None or rec["mode"] == mode):
                yield name, rec

    def _best(self, family, geom, num_codewords, mode):
        """The best counted plan of ``family`` for the layer (an exact mode match first)."""
        for want_mode in (mode, None) if mode is not None else (None,):
            found = [(rec["best"][family]["count"], name, rec["best"][family]["plan"])
                     for name, rec in self._matches(geom, num_codewords, want_mode) if rec["best"].get(family)]
            for _, name, plan in sorted(found):
                try:
                    built = self._classes[family](**plan)
                except TypeError:  # a record of an older kernel's plan: not this kernel's
                    logger.warning("ignoring %s's %s plan %s: not a plan of this kernel (retune)", name, family, plan)
                    continue
                self.applied.append((f"{family}_plan", name))
                return built
        return None

    def sparks_plan(self, geom, num_codewords: int, mode: str | None = None):
        """The tuned NEON Sparks plan of a layer, or None."""
        return self._best("sparks", geom, num_codewords, mode)

    def dense_plan(self, geom, mode: str | None = None):
        """The tuned NEON dense binary plan of a layer, or None (any K: the dense kernel ignores it)."""
        return self._best("dense", geom, None, mode)

    def sparks_is_cheaper(self, geom, num_codewords: int):
        """The measured Sparks-vs-dense choice of a layer with K codewords, or None if not measured."""
        for name, rec in self._matches(geom, num_codewords):
            if rec.get("choice") in FAMILIES and all(rec["best"].get(f) for f in FAMILIES):
                self.applied.append(("choice", name))
                return rec["choice"] == "sparks"
        return None
