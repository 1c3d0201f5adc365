"""The same Sparks kernel timed in several fresh processes, to show run-to-run modes.

At 2 threads on the 2-core dev machine, the default Sparks op on the 14x14 and 7x7 ResNet-18
layers has two timing modes that depend on the process, not the code: the same compiled
kernel takes either about 0.14 or about 0.37 ms (256->256, K=16). This is a likely cause of
tuning decisions that do not carry over from the tuner's worker process to another process
(README, Tuning). Each process compiles the kernel, runs it once, and reports the median of
7 x 50 timed calls.

    python benchmarks/bench_thread_modes.py --threads 2 --processes 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {"64-64": (64, 64, 56), "256-256": (256, 256, 14), "512-512": (512, 512, 7)}


def child(threads: int) -> None:
    """Time each shape's default Sparks op (K=16) in this process; print one JSON line."""
    import numpy as np
    import tvm

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from schedules.host import HostSchedules, vector_bytes_of
    from sparks_tvm import reference as ref
    from sparks_tvm.kernels import ConvGeometry, pack_indices, sparks_out_shape
    from sparks_tvm.models import random_codebook
    from sparks_tvm.target import resolve_target

    target = resolve_target("llvm")
    sched = HostSchedules(cores=threads, vector_bytes=vector_bytes_of(target))
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    out = {}
    for name, (cin, cout, side) in SHAPES.items():
        geom = ConvGeometry(1, cin, side, side, cout)
        lib = tvm.compile(sched.schedule_sparks_conv2d(geom, 16, "sign").with_attr("global_symbol", "main"),
                          target=target).jit()
        codebook = random_codebook(rng, 16).astype(np.int8)
        idx = rng.integers(0, 16, size=(cout, cin))
        args = [tvm.runtime.tensor(rng.standard_normal(geom.in_shape).astype(np.float32), dev),
                tvm.runtime.tensor(ref.codes_to_bits(codebook), dev), tvm.runtime.tensor(pack_indices(idx, 16), dev),
                tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)]
        lib["main"](*args)
        ev = lib.time_evaluator("main", dev, number=50, repeat=7)
        out[name] = float(np.median(ev(*args).results) * 1e3)
    print(json.dumps(out), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.threads)
        return 0
    env = dict(os.environ, TVM_NUM_THREADS=str(args.threads))
    runs = []
    for i in range(args.processes):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--threads", str(args.threads)],
                              env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"process {i}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in runs[-1].items()), flush=True)
    for name in SHAPES:
        times = sorted(r[name] for r in runs)
        print(f"{name}: min {times[0]:.3f}  max {times[-1]:.3f} ms over {len(times)} processes "
              f"(max/min {times[-1] / times[0]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
