"""``CompiledModel.run``'s cost above the kernels, against onnxruntime's ``run`` (issue 22).

On a tiny Sparks ResNet (kernels of a few microseconds, so the per-call overhead dominates),
one process per thread count times, interleaved round by round:

- ``vm``: the VM's own ``time_evaluator`` of ``main`` on preallocated inputs (the kernels
  plus the VM's dispatch, no Python): the floor any ``run`` can reach;
- ``direct``: ``vm["main"](tensor)`` from Python with a preallocated input tensor;
- ``run``: ``model.run(x)`` on an ordinary numpy array; ``run_aligned``: on an array from
  ``model.empty_inputs()`` (read in place for inputs of 32 KiB and more); ``run_out``: with
  ``out=`` arrays;
- ``legacy``: the run path before issue 22 (checks, a new ``tvm.runtime.tensor`` per input,
  ``vm["main"]``, ``.numpy()`` per output), re-implemented here as the baseline;
- ``ort``: onnxruntime's ``InferenceSession.run`` on the same ONNX model, as many intra-op
  threads.

Each entry is the per-call time in microseconds: min and median over ``--rounds`` rounds of
``--number`` calls. Overhead = ``run`` - ``vm``. Every output is compared with the legacy
path's (exact) and onnxruntime's (close). Writes ``run_overhead.json`` and ``run_overhead.md``
to ``--out``.

    python benchmarks/bench_run_overhead.py [--threads 1,2] [--shapes 1x3x7x7,1x3x32x32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("vm", "direct", "run", "run_aligned", "run_out", "legacy", "ort")


def child(threads: int, shape: tuple, rounds: int, number: int) -> dict:
    """Time every method of :data:`METHODS` for one model in this process."""
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax

    sys.path.insert(0, ROOT)
    import sparks_tvm
    from sparks_tvm import frontend, models
    from sparks_tvm.vm_runner import flatten as _flatten

    data = models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), shape)
    model = sparks_tvm.compile(data)
    x = models.example_input(shape, seed=9)
    aligned = model.empty_inputs()[0]
    aligned[...] = x
    out = [np.empty_like(y) for y in model.run(x)]
    dev = tvm.cpu()

    def legacy():
        arrays = frontend.as_input_arrays(model._specs(), (x,))
        return _flatten(model.vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays]))

    # A VM of its own for the evaluator: set_input leaves state that run's VM must not carry.
    ev_vm = relax.VirtualMachine(model._ex, dev)
    ev_vm.set_input("main", tvm.runtime.tensor(x, dev))
    evaluator = ev_vm.time_evaluator("invoke_stateful", dev, number=number, repeat=1)
    main, tensor = model.vm["main"], tvm.runtime.tensor(x, dev)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}

    want = legacy()
    checks = {
        "run": model.run(x), "run_aligned": model.run(aligned), "run_out": model.run(x, out=out),
        "direct": _flatten(main(tensor)),
    }
    exact = all(all(np.array_equal(a, b) for a, b in zip(got, want)) for got in checks.values())
    ort_close = all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(sess.run(None, feed), want))

    calls = {
        "direct": lambda: main(tensor), "run": lambda: model.run(x), "run_aligned": lambda: model.run(aligned),
        "run_out": lambda: model.run(x, out=out), "legacy": legacy, "ort": lambda: sess.run(None, feed),
    }
    times = {m: [] for m in METHODS}
    for fn in calls.values():  # warm-up: each thread's VM, the pools, onnxruntime's arena
        for _ in range(50):
            fn()
    for _ in range(rounds):
        times["vm"].append(evaluator("main").results[0] * 1e6)
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - t0) / number * 1e6)
    stats = {m: {"min_us": float(np.min(v)), "median_us": float(np.median(v))} for m, v in times.items()}
    return {"threads": threads, "shape": list(shape), "num_threads": model.num_threads,
            "threads_source": model.threads_source, "target": str(model.target), "exact": exact,
            "ort_close": ort_close, "us": stats}


def _fmt(entry: dict) -> list:
    us = entry["us"]
    lines = []
    for stat in ("min_us", "median_us"):
        vm = us["vm"][stat]
        row = [f"{'x'.join(map(str, entry['shape']))}, {entry['threads']} thr", stat.split("_")[0]]
        row += [f"{us[m][stat]:.1f}" for m in METHODS]
        row += [f"{us['run'][stat] - vm:.1f}", f"{us['legacy'][stat] - vm:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated TVM_NUM_THREADS values, one process each")
    ap.add_argument("--shapes", default="1x3x7x7,1x3x32x32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=500, help="calls per round")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    if args.child:
        results = [child(int(os.environ["TVM_NUM_THREADS"]), s, args.rounds, args.number) for s in shapes]
        print(json.dumps(results), flush=True)
        return 0
    entries = []
    for threads in (int(t) for t in args.threads.split(",")):
        # A fresh process per count: TVM's pool reads TVM_NUM_THREADS once, and compile reads it too.
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shapes", args.shapes,
               "--rounds", str(args.rounds), "--number", str(args.number)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        for entry in json.loads(proc.stdout.strip().splitlines()[-1]):
            entries.append(entry)
            print("\n".join(_fmt(entry)), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = "python benchmarks/bench_run_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()
    meta = {"command": command.strip(), "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "loadavg": [round(v, 2) for v in load], "rounds": args.rounds, "number": args.number}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run_overhead.json"), "w") as fh:
        json.dump({"meta": meta, "results": entries}, fh, indent=1)
    header = ["model", "stat"] + [f"{m} us" for m in METHODS] + ["run - vm", "legacy - vm"]
    md = [f"# CompiledModel.run overhead (issue 22)", "",
          f"`{meta['command']}` at {commit}, {meta['date']}, {meta['machine']}, load average "
          f"{', '.join(map(str, meta['loadavg']))} at the end (a shared machine: the min is the better estimate).",
          "", "Per-call microseconds over rounds of calls (min and median of the rounds' means). "
          "`vm`: the VM's time_evaluator of main (kernels + VM dispatch, no Python); `direct`: vm['main'](t) "
          "with a preallocated tensor; `run`: model.run(x); `run_aligned`: x from empty_inputs(); `run_out`: "
          "with out=; `legacy`: the run path before issue 22; `ort`: onnxruntime's run, same threads. "
          "Every run output equals legacy's exactly: "
          f"{all(e['exact'] for e in entries)}; onnxruntime's is close: {all(e['ort_close'] for e in entries)}. "
          "Thread count compiled for: " + ", ".join(f"{e['threads']} -> num-cores {e['num_threads']} "
                                                     f"({e['threads_source']})" for e in entries[::len(shapes)]) + ".",
          "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        md.extend(_fmt(entry))
    with open(os.path.join(args.out, "run_overhead.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {args.out}/run_overhead.json and run_overhead.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
