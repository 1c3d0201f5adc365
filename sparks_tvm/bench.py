"""Latency of a compiled model: percentiles, throughput and a per-kernel time table.

Used by ``sparks-tvm bench`` and the benchmark harness in ``benchmarks/``.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import tvm
import tvm_ffi

from . import frontend


def latency_stats(times_ms, batch: int = 1) -> dict:
    """Summary of per-run latencies in milliseconds."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed runs")
    median = float(np.median(t))
    return {
        "runs": int(t.size),
        "mean_ms": float(t.mean()),
        "median_ms": median,
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "throughput_per_s": 1e3 * batch / median,
    }


def time_calls(fn, warmup: int, repeat: int) -> list:
    """Wall time of ``repeat`` calls of ``fn()`` after ``warmup`` untimed ones, in ms."""
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def benchmark_model(model, arrays, warmup: int = 5, repeat: int = 50) -> dict:
    """Latency statistics of ``model.run`` on fixed inputs (a CompiledModel or RemoteModel)."""
    arrays = frontend.as_input_arrays(model._specs(), arrays)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    main = model.vm["main"]
    stats = latency_stats(time_calls(lambda: main(*tensors), warmup, repeat), batch=int(arrays[0].shape[0]))
    stats["warmup"] = warmup
    return stats


def layer_times(model, arrays, repeat: int = 10) -> list:
    """Per-kernel time inside a whole-model run (the VM's call instrumentation).

    Returns one dict per kernel symbol, slowest first: calls per run, median ms per run,
    share of the total. Instrumentation adds a few microseconds per call.
    """
    arrays = frontend.as_input_arrays(model._specs(), arrays)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    vm = model.vm
    vm["main"](*tensors)
    per_run = collections.defaultdict(lambda: [0.0] * repeat)
    calls = collections.Counter()
    state = {"run": 0, "t": 0.0}

    def instrument(_func, symbol, before, _ret, *_args):
        if before:
            state["t"] = time.perf_counter()
        else:
            per_run[symbol][state["run"]] += (time.perf_counter() - state["t"]) * 1e3
            calls[symbol] += 1
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        for i in range(repeat):
            state["run"] = i
            vm["main"](*tensors)
    finally:
        vm.set_instrument(tvm_ffi.convert(lambda *a: 0))
    rows = [{"kernel": sym, "calls": calls[sym] // repeat, "median_ms": float(np.median(ts))} for sym, ts in per_run.items()]
    total = sum(r["median_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["median_ms"] / total
    return sorted(rows, key=lambda r: -r["median_ms"])


def format_layer_table(rows, top: int | None = None) -> str:
    lines = [f"{'kernel':<48} {'calls':>5} {'median ms':>10} {'share':>7}"]
    for r in rows[:top] if top else rows:
        lines.append(f"{r['kernel'][:48]:<48} {r['calls']:>5} {r['median_ms']:>10.3f} {100 * r['share']:>6.1f}%")
    lines.append(f"{'total':<48} {'':>5} {sum(r['median_ms'] for r in rows):>10.3f}")
    return "\n".join(lines)


def interleaved_times(funcs, args, dev, rounds: int, seconds_per_call: float = 0.02) -> tuple:
    """Seconds per call of each packed function, timed in alternating rounds (same process).

    ``funcs`` are TVM runtime modules with a ``main`` function, called on ``args``. Each
    measurement runs about ``seconds_per_call`` of calls, so a timer tick or a context switch
    is noise; the order alternates round by round so that neither side always runs warm.
    Returns ``(times, number)``: one list of per-round times per function, and the calls per
    measurement.
    """
    probe = funcs[0].time_evaluator("main", dev, number=3, repeat=1)(*args).mean
    number = max(1, int(seconds_per_call / max(probe, 1e-7)))
    evals = [f.time_evaluator("main", dev, number=number, repeat=1) for f in funcs]
    times = [[] for _ in funcs]
    for r in range(rounds):
        for i in (range(len(funcs)) if r % 2 == 0 else reversed(range(len(funcs)))):
            times[i].append(float(evals[i](*args).mean))
    return times, number
