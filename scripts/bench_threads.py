#!/usr/bin/env python3
"""One model from many threads: one VM behind a lock vs a VM per thread (docs/errors.md, "Threads").

Usage: ``python scripts/bench_threads.py [--shape 1x3x16x16] [--threads 8] [--runs 100] [--rounds 2]``.
Prints ms per run for each way, and whether every output equals the single-thread one.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import sparks_tvm
from sparks_tvm import models


def locked_runner(model, x):
    """``run(i)``: ``model.run`` serialized by one lock (the alternative not taken: one VM
    behind a lock costs the same as this, since a thread's VM is created once)."""
    lock = threading.Lock()

    def run(_):
        with lock:
            return model.run(x)[0]

    return run


def timed(run, threads: int, runs: int, want) -> tuple:
    """(ms per run, all outputs equal to ``want``) of ``threads`` x ``runs`` calls of ``run``."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        outs = list(pool.map(run, range(threads * runs)))
    wall = time.perf_counter() - t0
    return wall / (threads * runs) * 1e3, all(np.array_equal(o, want) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1x3x16x16")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--runs", type=int, default=100, help="runs per thread")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x"))
    model = sparks_tvm.compile(models.export_onnx(models.sparks_resnet_tiny(k=8, widths=(16, 24)), shape))
    x = models.example_input(shape, seed=9)
    want = model.run(x)[0]
    t0 = time.perf_counter()
    for _ in range(200):
        model.run(x)
    print(f"input {shape}: one thread {(time.perf_counter() - t0) / 200 * 1e3:.3f} ms/run")
    for r in range(args.rounds):
        for name, run in (("lock", locked_runner(model, x)),
                          ("per-thread VM", lambda _: model.run(x)[0])):
            ms, equal = timed(run, args.threads, args.runs, want)
            print(f"round {r}  {name:<14} {args.threads} threads x {args.runs} runs: {ms:.3f} ms/run, equal {equal}")


if __name__ == "__main__":
    main()
