"""Measuring schedules for a tuning run: the default's seed, and the final validation.

A search's best record is only used if it beats the default when both are re-measured
together, interleaved (:func:`validate`): a lone noisy measurement on a shared machine must
not pass for a speed-up.
"""

from __future__ import annotations

import os
import statistics

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from ..bench import interleaved_times
from ..errors import TuningError


def mean_secs(run_secs) -> float:
    vals = [float(s) for s in run_secs]
    return sum(vals) / len(vals)


def float_imm(v):
    return tirx.FloatImm("float32", float(v))


def device_name(target) -> str:
    return "cpu" if target.kind.name == "llvm" else str(target.kind.name)


def measure_schedule(task, sch, target, builder, runner, what: str = "default schedule"):
    """Build and run one schedule of ``task`` with the tuning builder/runner: ``(run secs, args info)``."""
    (b,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if b.error_msg is not None:
        raise TuningError(f"task {task.name}: the {what} does not build: {b.error_msg.strip()[:500]}")
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    (fut,) = runner.run([ms.runner.RunnerInput(b.artifact_path, device_name(target), args_info)])
    r = fut.result()
    try:
        os.remove(b.artifact_path)
    except OSError:
        pass
    if r.error_msg is not None or not r.run_secs:
        raise TuningError(f"task {task.name}: the {what} could not be measured: "
                          f"{str(r.error_msg).strip()[-800:]}")
    return [float(s) for s in r.run_secs], args_info

def measure_default(task, target, builder, runner):
    """Measure the default schedule and the record that stands for it in the database.

    Returns ``(default secs, seed schedule, args info, seed run secs)``: the seed is
    ``task.default_point()`` (see :class:`schedules.tuning.KernelTask`), measured itself when it
    is not the default schedule, so that its record's latency is its own.
    """
    default = task.default_schedule()
    secs, args_info = measure_schedule(task, default, target, builder, runner)
    point = task.default_point()
    seed_secs = secs
    if not tvm_ffi.structural_equal(point.mod, default.mod):
        seed_secs, _ = measure_schedule(task, point, target, builder, runner, "default schedule's seed point")
    return sum(secs) / len(secs), point, args_info, seed_secs

#: Fraction by which the best record must beat the default in :func:`validate` to be used.
VALIDATION_MARGIN = 0.03


def validate(task, trace, tgt, builder, runner, rounds: int = 5) -> dict:
    """Re-measure the default and the best record, alternating, ``rounds`` times each.

    Returns ``validated_default_s`` / ``validated_best_s`` (medians; the latter is the
    default's when the default is kept), ``use_default`` (the best record is not faster by
    :data:`VALIDATION_MARGIN`: compile keeps the default) and ``chosen_hash`` (structural
    hash of the validated schedule, so a later, unvalidated best record is not overruled).
    """
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
    dev = device_name(tgt)
    if isinstance(runner, ms.runner.LocalRunner) and tgt.kind.name == "llvm":
        # This machine's CPU: time both in this process, interleaved, as bench_tune.py does.
        # Through LocalRunner's worker, the default schedule measured 1.4-1.8x slower than in
        # any process of ours (64->64, 1 thread: 0.286 vs 0.197 ms) while the records did not,
        # so records 6-35% slower were chosen on every ResNet-18 layer (cause not found).
        times = time_in_process([b.artifact_path for b in built], args_info, rounds)
    else:
        times = ([], [])
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                (fut,) = runner.run([ms.runner.RunnerInput(built[i].artifact_path, dev, args_info)])
                res = fut.result()
                if res.error_msg is None and res.run_secs:
                    times[i].append(mean_secs(res.run_secs))
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


def time_in_process(paths, args_info, rounds: int) -> list:
    """Seconds per call of each library in ``paths``, timed interleaved in this process."""
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

