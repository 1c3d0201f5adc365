"""ARM tuning on the emulated Pi: NEON kernel plans searched by counting instructions.

``sparks_tvm.tune(model, "arm_cpu", work_dir, trials, runner="emulated-pi")`` (CLI:
``sparks-tvm tune ... --target arm_cpu --runner emulated-pi``). What is optimised is the
number of aarch64 instructions a kernel executes (one call, one thread, on qemu-user with the
counting plugin: :mod:`.emulated_pi`), not time: counts are exact and repeatable, so each
candidate is counted once, and nothing here ran on a Pi.

Tasks: one per distinct binary layer (geometry, K, mode); identical layers share a task and
weigh as many times. A layer with a codebook has two kernels, the NEON Sparks kernel and the
NEON dense binary kernel; each has its plan space (:data:`schedules.tuning_neon.NEON_SPACES`), and
which of the two compile uses is decided by the counts.

The search, per work dir:

1. every task's default plans (what compile builds untuned) are counted first, in one
   emulator launch; they are candidates like the others, so the result is never worse;
2. then rounds of ``batch`` candidates, one launch each. A round's slots go to tasks by
   their share of the model's instructions (default count x layers), each task offering its
   unmeasured plan nearest its best so far (knob by knob: a local search around the best),
   the kernel whose best is lower first;
3. every candidate's output is compared with the reference, bit for bit (the int32 conv
   output, before the float epilogue): an inexact plan is recorded and never chosen.

Records (:mod:`.arm_records`) are written after every round; a rerun resumes from them.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

import schedules
from relay_passes import pipeline
from schedules.tuning import RecordingSchedules
from schedules.tuning_neon import NEON_SPACES

from .. import frontend, kernels
from .. import reference as ref
from ..kernels import binary_conv2d_neon
from ..kernels.binary_conv2d_neon import NeonBinaryPlan
from ..kernels.sparks_conv2d_neon import NeonSparksPlan
from ..models import random_codebook
from ..errors import TuningError
from ..target import is_aarch64, target_json
from . import emulated_pi
from .arm_records import FAMILIES, append_trials, geom_key, plan_json, read_plans, read_trials, write_plans
from .database import check_target, lock_work_dir, prepare_work_dir, read_meta, write_meta
from .report import ArmTaskResult, ArmTuneResult

logger = logging.getLogger("sparks_tvm")

#: The runner name of this module (``runner="emulated-pi"``, ``--runner emulated-pi``).
EMULATED_PI = "emulated-pi"


@dataclass
class ArmTask:
    """One binary layer to tune: geometry, K (None: a dense layer), mode, layers sharing it."""

    geom: object
    k: int | None
    mode: str
    layers: int = 1
    families: tuple = FAMILIES

    @property
    def name(self) -> str:
        if self.k is None:
            return f"binary_{geom_key(self.geom)}_{self.mode}"
        return f"sparks_{geom_key(self.geom)}_K{self.k}_{self.mode}"


def extract_arm_tasks(proto, specs, tgt, strict: bool = True, force_kind: str | None = None) -> list:
    """The model's binary layers as :class:`ArmTask` (deduplicated, in model order).

    The lowering is run with every codebook layer forced onto the Sparks kernel, so that each
    such layer is recorded with its K whatever the instruction model would choose; both of
    its kernels are then candidates (``force_kind`` given: only that one).
    """
    rec = RecordingSchedules(schedules.for_target(tgt))
    pipeline.lower(frontend.import_graph(proto, specs),
                   pipeline.PipelineOptions(schedules=rec, strict=strict, force_kind=force_kind or "sparks",
                                            conv_names=frontend.conv_names(proto)))
    tasks = {}
    for kind, geom, k, mode in rec.calls:
        if kind == "sparks":
            fams = ("sparks",) if force_kind == "sparks" or not binary_conv2d_neon.supports(geom) else FAMILIES
        else:
            if not binary_conv2d_neon.supports(geom):
                continue  # the host core's dense kernel: not a NEON plan
            fams, k = ("dense",), None
        task = ArmTask(geom, k, mode, 1, fams)
        if task.name in tasks:
            tasks[task.name].layers += 1
        else:
            tasks[task.name] = task
    return list(tasks.values())


class _FixedPlans:
    """``ArmSchedules.plans`` stand-in that answers with one given plan (to build a candidate)."""

    def __init__(self, sparks=None, dense=None):
        self.sparks, self.dense = sparks, dense

    def sparks_plan(self, geom, num_codewords, mode=None):
        return self.sparks

    def dense_plan(self, geom, mode=None):
        return self.dense

    def sparks_is_cheaper(self, geom, num_codewords):
        return None


class _Inputs:
    """A task's random inputs and exact reference output (shared by all its candidates)."""

    def __init__(self, task: ArmTask, seed: int):
        geom = self.geom = task.geom
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal(geom.in_shape).astype(np.float32)
        bits = ref.binarize(self.x, task.mode)
        kh, kw = geom.kernel
        if task.k is not None:
            codebook = random_codebook(rng, task.k).astype(np.int8)
            idx = rng.integers(0, task.k, size=(geom.out_channels, geom.in_channels))
            self.sparks_args = [self.x, ref.codes_to_bits(codebook), kernels.pack_indices(idx, task.k)]
            signs = codebook[idx]  # (O, C, 3, 3): the same weights for the dense kernel
            expected = ref.sparks_conv2d_ref(bits, codebook, idx, geom.stride, geom.padding)
        else:
            signs = np.where(rng.random((geom.out_channels, geom.in_channels, kh, kw)) < 0.5, -1, 1).astype(np.int8)
            expected = ref.binary_conv2d_ref(bits, signs, geom.stride, geom.padding)
        self.signs = np.asarray(signs, dtype=np.int8)
        self.dense_args = [self.x, kernels.pack_binary_weights(self.signs)]  # the generic layout
        # Both kernels compute the same conv: one reference checks either (and that they agree).
        self.expected = np.asarray(expected, dtype=np.int32)

    def out_shape(self, family: str) -> tuple:
        fn = getattr(kernels, f"{'sparks' if family == 'sparks' else 'binary'}_out_shape", None)
        return tuple(int(d) for d in fn(self.geom)) if fn is not None else tuple(self.expected.shape)


class _Search:
    """State of one task's search: its spaces, what was counted, the best plan of each kernel."""

    def __init__(self, task: ArmTask, base, target, seed: int):
        self.task = task
        self.base, self.base_target = base, target
        self.inputs = _Inputs(task, seed)
        self.counts = {f: {} for f in task.families}  # family -> {plan: count or None (failed / inexact)}
        self.invalid = {f: set() for f in task.families}
        self.knobs, self.defaults = {}, {}
        for fam in task.families:
            knobs_fn, plan_fn = NEON_SPACES[fam]
            kn = knobs_fn(task.geom, task.k or 16, base.cores)
            self.knobs[fam] = kn
            self.defaults[fam] = plan_fn(task.geom, task.k or 16, base.cores, **{n: v[0] for n, v in kn.items()})
        self.trials = 0  # candidates counted beyond the defaults

    def plan(self, family, knobs: dict):
        return NEON_SPACES[family][1](self.task.geom, self.task.k or 16, self.base.cores, **knobs)

    def best(self, family):
        """(count, plan) of the family's best exact plan, or None."""
        done = [(c, p) for p, c in self.counts[family].items() if c is not None]
        return min(done, key=lambda cp: (cp[0], cp[1] != self.defaults[family])) if done else None

    def weight(self) -> float:
        counts = [self.counts[f].get(self.defaults[f]) for f in self.task.families]
        counts = [c for c in counts if c is not None]
        return self.task.layers * (min(counts) if counts else 1.0)

    def _ranked(self, family):
        """Unmeasured plans of ``family`` nearest its best (knob-rank distance), nearest first."""
        best = self.best(family)
        centre = best[1] if best is not None else self.defaults[family]
        kn = self.knobs[family]
        order = {n: sorted(v) for n, v in kn.items()}
        cur = {n: getattr(centre, n) for n in kn}
        out = []

        def walk(names, chosen):
            if not names:
                dist = sum(abs(order[n].index(chosen[n]) - order[n].index(cur[n])) if cur[n] in order[n] else 1
                           for n in kn)
                out.append((dist, dict(chosen)))
                return
            for v in order[names[0]]:
                chosen[names[0]] = v
                walk(names[1:], chosen)

        walk(list(kn), {})
        out.sort(key=lambda dk: dk[0])
        return [(d, knobs) for d, knobs in out if d > 0]

    def next_candidate(self, taken: set):
        """The next plan to count, as ``(family, plan)``, or None when the spaces are exhausted."""
        options = []
        for fam in self.task.families:
            best = self.best(fam)
            level = best[0] if best is not None else float("inf")
            for dist, knobs in self._ranked(fam):
                plan = self.plan(fam, knobs)
                if plan is None or plan in self.counts[fam] or plan in self.invalid[fam] or (fam, plan) in taken:
                    continue
                if not self._builds(fam, plan):
                    self.invalid[fam].add(plan)
                    continue
                # Nearer the best first; the kernel whose best is lower first, at equal distance.
                options.append((level * (1.0 + 0.1 * (dist - 1)), fam, plan))
                break
        if not options:
            return None
        _, fam, plan = min(options, key=lambda o: o[0])
        return fam, plan

    def _builds(self, family, plan) -> bool:
        try:
            self.kernel_func(family, plan)
        except (ValueError, AssertionError) as err:
            logger.info("%s: %s plan %s is not valid (%s)", self.task.name, family, plan, err)
            return False
        return True

    def _schedules(self, family, plan):
        return type(self.base).for_target(self.base_target, plans=_FixedPlans(
            plan if family == "sparks" else None, plan if family == "dense" else None))

    def kernel_func(self, family, plan):
        """The scheduled kernel of ``plan``, built the way compile builds it (``ArmSchedules``)."""
        sched = self._schedules(family, plan)
        if family == "sparks":
            return sched.schedule_sparks_conv2d(self.task.geom, self.task.k, self.task.mode)
        return sched.schedule_binary_conv2d(self.task.geom, self.task.mode)

    def kernel(self, tag, family, plan):
        args = self.inputs.sparks_args
        if family != "sparks":  # the dense kernel's weights are laid out for its plan
            sched = self._schedules(family, plan)
            pack = getattr(sched, "binary_weights", None)
            args = self.inputs.dense_args if pack is None else \
                [self.inputs.x, pack(self.task.geom, self.task.mode, self.inputs.signs)]
        shape = self.inputs.out_shape(family)
        return emulated_pi.Kernel(tag, f"{self.task.name} {family} {plan}", self.kernel_func(family, plan), args,
                                  shape, expected=self.inputs.expected.reshape(shape))


def _count_batch(items, tgt, counter):
    """Count ``[(search, family, plan)]`` in one launch; a failed launch is retried kernel by kernel."""
    kernels = [s.kernel(i, fam, plan) for i, (s, fam, plan) in enumerate(items)]
    try:
        return counter(kernels, tgt), None
    except RuntimeError as err:
        if len(kernels) == 1:
            return {}, str(err)[-500:]
        out, errors = {}, []
        for kern in kernels:
            try:
                out.update(counter([kern], tgt))
            except RuntimeError as one:
                errors.append(f"{kern.label}: {str(one)[-300:]}")
        return out, "; ".join(errors) or None


def _record(search, fam, plan, counted, trial, default):
    if counted is None or counted.exact is False:
        search.counts[fam][plan] = None
        if counted is not None:
            logger.warning("%s: %s plan %s gave %d outputs that differ from the reference: never chosen",
                           search.task.name, fam, plan, counted.mismatches)
    else:
        search.counts[fam][plan] = counted.count
    return {"task": search.task.name, "family": fam, "plan": plan_json(plan), "default": default, "trial": trial,
            "count": None if counted is None else counted.count, "exact": None if counted is None else counted.exact}


def _summary(search) -> dict:
    task = search.task
    rec = {"geom": geom_key(task.geom), "k": task.k, "mode": task.mode, "layers": task.layers,
           "trials": search.trials, "default": {}, "best": {}}
    for fam in task.families:
        d = search.counts[fam].get(search.defaults[fam])
        rec["default"][fam] = {"plan": plan_json(search.defaults[fam]), "count": d}
        best = search.best(fam)
        rec["best"][fam] = None if best is None else {"plan": plan_json(best[1]), "count": best[0]}
    bests = {f: b["count"] for f, b in rec["best"].items() if b}
    rec["choice"] = min(bests, key=bests.get) if bests else None
    if task.k is not None and len(task.families) == 2:
        rec["default_choice"] = "sparks" if search.base.sparks_is_cheaper(task.geom, task.k) else "dense"
    else:
        rec["default_choice"] = task.families[0]
    return rec


def tune_arm_tasks(tasks, tgt, work_dir, trials: int, *, batch: int = 8, seed: int = 0, progress: bool | None = None,
                   counter=None, wait: bool = False, t_start: float | None = None) -> ArmTuneResult:
    """Search the NEON plans of ``tasks`` (:class:`ArmTask`) on the emulated Pi; records to ``work_dir``.

    ``trials``: candidates counted over all tasks beyond their defaults (a rerun counts the
    ones already recorded). ``counter(kernels, target) -> {tag: Counted}``: default
    :func:`.emulated_pi.count_checked`.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    if not is_aarch64(tgt):
        raise TuningError(f"the {EMULATED_PI} runner counts aarch64 instructions: tune an ARM target "
                          f"(--target arm_cpu), not {target_json(tgt)}")
    if counter is None:
        emulated_pi.require()  # before any work: a clear error if the emulated Pi is not set up
        counter = emulated_pi.count_checked
    progress = sys.stderr.isatty() if progress is None else progress
    work_dir = prepare_work_dir(work_dir)
    with lock_work_dir(work_dir, wait=wait):
        meta = read_meta(work_dir)
        check_target(work_dir, tgt, meta)
        old = read_plans(work_dir)
        if old is not None and old.get("target") != target_json(tgt):
            check_target(work_dir, tgt, {"target": old.get("target")})
        if meta is None:  # the target check of later runs and of compile reads it
            write_meta(work_dir, {"target": target_json(tgt), "runner": EMULATED_PI, "tasks": {}})
        base = schedules.for_target(tgt)
        searches = []
        for task in tasks:
            searches.append(_Search(task, base, tgt, seed))
        by_name = {s.task.name: s for s in searches}
        done = _resume(work_dir, by_name)

        def write():
            data = {"target": target_json(tgt), "runner": EMULATED_PI, "cost": "aarch64 instructions, one call, "
                    "one thread, emulated Raspberry Pi 4 (qemu-user + counting plugin)",
                    # Another model's tasks tuned into this work dir earlier stay.
                    "tasks": {**(old or {}).get("tasks", {}), **{s.task.name: _summary(s) for s in searches}}}
            write_plans(work_dir, data)

        errors = []
        if _count_defaults(searches, tgt, counter, work_dir, errors):
            write()
        run_trials = 0
        # 2. Rounds of `batch` candidates, slots by each task's share of the model's instructions.
        while done < trials:
            items = _next_round(searches, min(batch, trials - done), done)
            if not items:
                break  # every space exhausted
            counted, err = _count_batch(items, tgt, counter)
            if err:
                errors.append(err)
            rows = []
            for i, (s, fam, plan) in enumerate(items):
                s.trials += 1
                done += 1
                run_trials += 1
                rows.append(_record(s, fam, plan, counted.get(i), s.trials, False))
            append_trials(work_dir, rows)
            write()
            if progress:
                total = sum(_chosen_count(s) * s.task.layers for s in searches)
                sys.stderr.write(f"\rtrials {done}/{trials}  tuned {total / 1e6:.2f} M instructions "
                                 f"({time.perf_counter() - t_start:.0f} s)")
                sys.stderr.flush()
        if progress:
            sys.stderr.write("\n")
        write()
        return _result(searches, work_dir, tgt, run_trials, time.perf_counter() - t_start, errors)


def _resume(work_dir, by_name) -> int:
    """Load what earlier runs counted into the searches; the trials (not defaults) done."""
    done = 0
    for row in read_trials(work_dir):
        s = by_name.get(row["task"])
        if s is None or row["family"] not in s.counts:
            continue
        s.counts[row["family"]][_plan_of(row)] = row["count"] if row.get("exact") is not False else None
        if not row["default"]:
            s.trials += 1
            done += 1
    return done


def _count_defaults(searches, tgt, counter, work_dir, errors) -> bool:
    """Step 1: every task's default plans not yet counted, in one launch (whether any were)."""
    items = [(s, fam, s.defaults[fam]) for s in searches for fam in s.task.families
             if s.defaults[fam] not in s.counts[fam]]
    if not items:
        return False
    counted, err = _count_batch(items, tgt, counter)
    if err:
        errors.append(err)
    append_trials(work_dir, [_record(s, fam, plan, counted.get(i), 0, True) for i, (s, fam, plan) in enumerate(items)])
    for s in searches:
        if all(s.counts[f].get(s.defaults[f]) is None for f in s.task.families):
            raise TuningError(f"task {s.task.name}: its default kernel could not be counted on the emulated "
                              f"Pi ({err or 'inexact output'})")
    return True


def _next_round(searches, size: int, done: int) -> list:
    """Step 2: up to ``size`` candidates ``(search, family, plan)``, slots by each task's share."""
    taken, items = set(), []
    active = list(searches)
    while len(items) < size and active:
        total_w = sum(s.weight() for s in active)
        alloc = done + len(items) + 1
        # The task furthest below its share of the trials takes the slot.
        s = max(active, key=lambda s: s.weight() / total_w * alloc - s.trials - sum(1 for it in items if it[0] is s))
        cand = s.next_candidate(taken)
        if cand is None:
            active.remove(s)
            continue
        taken.add(cand)
        items.append((s, *cand))
    return items


def _result(searches, work_dir, tgt, run_trials, seconds, errors) -> ArmTuneResult:
    result = ArmTuneResult(work_dir=work_dir, target=target_json(tgt), trials_run=run_trials, seconds=seconds,
                           errors=errors)
    for s in searches:
        rec = _summary(s)
        dfam = rec["default_choice"]
        result.tasks.append(ArmTaskResult(
            s.task.name, s.task.layers, s.trials, default_kernel=dfam,
            default_count=rec["default"][dfam]["count"] if rec["default"].get(dfam) else None,
            chosen_kernel=rec["choice"], best_count=rec["best"][rec["choice"]]["count"] if rec["choice"] else None,
            plan=rec["best"][rec["choice"]]["plan"] if rec["choice"] else None))
    return result


def _plan_of(row):
    return (NeonSparksPlan if row["family"] == "sparks" else NeonBinaryPlan)(**row["plan"])


def _chosen_count(s) -> float:
    bests = [b[0] for b in (s.best(f) for f in s.task.families) if b is not None]
    return min(bests) if bests else 0.0


def tune_arm(model, tgt, work_dir, trials: int, *, shapes=None, strict: bool = True, force_kind=None, batch: int = 8,
             seed: int = 0, progress=None, wait: bool = False, counter=None) -> ArmTuneResult:
    """:func:`sparks_tvm.tune` with ``runner="emulated-pi"``: a model's NEON plans (see the module doc)."""
    t_start = time.perf_counter()
    if not is_aarch64(tgt):
        raise TuningError(f"the {EMULATED_PI} runner counts aarch64 instructions: tune an ARM target "
                          f"(--target arm_cpu), not {target_json(tgt)}")
    proto = frontend.load_onnx(model)
    frontend.check_supported_ops(proto)
    specs = frontend.input_specs(proto, shapes)
    tasks = extract_arm_tasks(proto, specs, tgt, strict=strict, force_kind=force_kind)
    if not tasks:
        raise TuningError("the model has no binary convolution on a NEON kernel to tune (see `sparks-tvm inspect`)")
    return tune_arm_tasks(tasks, tgt, work_dir, trials, batch=batch, seed=seed, progress=progress, counter=counter,
                          wait=wait, t_start=t_start)


__all__ = ["EMULATED_PI", "ArmTask", "extract_arm_tasks", "tune_arm", "tune_arm_tasks"]
