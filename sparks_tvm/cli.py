"""``sparks-tvm``: compile and run Sparks models from the shell (tvmc/trtexec style).

    sparks-tvm compile model.onnx --target llvm --shapes input:1x3x224x224 -o model.so
    sparks-tvm run model.so --inputs x.npz [--outputs y.npz]
    sparks-tvm inspect model.onnx [--json]
    sparks-tvm bench model.so [--warmup 5] [--repeat 50] [--layers] [--json]
    sparks-tvm tune model.onnx --target llvm --trials 64 --work-dir tune-host
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .errors import SparksError


def parse_shapes(text: str | None) -> dict | None:
    """``"input:1x3x224x224,mask:1x10"`` -> ``{"input": (1, 3, 224, 224), "mask": (1, 10)}``."""
    if not text:
        return None
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        if not sep or not name:
            raise SparksError(f"bad --shapes entry {item!r}: expected NAME:DxDxD, e.g. input:1x3x224x224")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise SparksError(f"bad --shapes entry {item!r}: dimensions must be integers joined by 'x'") from None
    return shapes


def _cmd_compile(args) -> int:
    import sparks_tvm

    model = sparks_tvm.compile(args.model, target=args.target, shapes=parse_shapes(args.shapes),
                               strict=not args.allow_float, tuning_db=args.tuning_db)
    model.export_library(args.output, cross_compiler=args.cross_compiler)
    from .target import target_json

    print(f"target: {target_json(model.target)}")
    print(model.report)
    print(f"wrote {args.output} (+{args.output}.sparks.json)")
    return 0


def _cmd_run(args) -> int:
    import sparks_tvm

    if args.rpc or args.tracker:
        # A library built for another machine (e.g. --target arm_cpu): run it on the device.
        from . import rpc

        model = rpc.deploy(args.library, args.rpc, tracker=args.tracker, key=args.key, timeout=args.rpc_timeout)
        print(f"running on the remote device {args.rpc or args.tracker + ' key ' + str(args.key)}")
    else:
        model = sparks_tvm.load(args.library)
    names = [d["name"] for d in model.inputs]
    arrays = []
    if args.inputs:
        try:
            data = np.load(args.inputs)
        except Exception as err:
            raise SparksError(f"{args.inputs}: cannot read inputs ({err})") from None
        missing = [n for n in names if n not in data]
        if missing:
            raise SparksError(f"{args.inputs} lacks input(s) {missing}; it has {sorted(data.keys())}")
        arrays = [data[n] for n in names]
    else:
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(d["shape"]).astype(d["dtype"]) for d in model.inputs]
        print(f"no --inputs: using random inputs for {names}")
    outputs = model.run(*arrays)
    onames = model.output_names
    for name, out in zip(onames, outputs):
        flat = out.reshape(out.shape[0], -1) if out.ndim > 1 else out.reshape(1, -1)
        print(f"{name}: shape {out.shape} dtype {out.dtype} argmax {np.argmax(flat, axis=1).tolist()}")
    if args.outputs:
        np.savez(args.outputs, **dict(zip(onames, outputs)))
        print(f"wrote {args.outputs}")
    if args.repeat:
        stats = model.benchmark(*arrays, repeat=args.repeat)
        print(f"latency: median {stats['median_ms']:.3f} ms, mean {stats['mean_ms']:.3f} ms over {args.repeat} runs")
    return 0


def _cmd_inspect(args) -> int:
    from .inspect import inspect_model

    result = inspect_model(args.model, shapes=parse_shapes(args.shapes))
    text = result.to_json() if args.json else str(result)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_bench(args) -> int:
    import json

    import sparks_tvm

    from . import bench

    model = sparks_tvm.load(args.library)
    if args.inputs:
        with np.load(args.inputs) as data:
            arrays = [data[d["name"]] for d in model.inputs]
    else:
        # Latency does not depend on the values: a fixed random input of the recorded shape.
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(d["shape"]).astype(d["dtype"]) for d in model.inputs]
    if args.warmup < 0 or args.repeat < 1:
        raise SparksError("--warmup must be >= 0 and --repeat >= 1")
    result = {"library": args.library, "target": model._meta.get("target"),
              "latency": bench.benchmark_model(model, arrays, args.warmup, args.repeat)}
    if args.layers:
        result["layers"] = bench.layer_times(model, arrays, repeat=min(args.repeat, 20))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    lat = result["latency"]
    print(f"{args.library}: {lat['runs']} runs after {lat['warmup']} warm-up")
    print(f"  latency ms: mean {lat['mean_ms']:.3f}  median {lat['median_ms']:.3f}  p90 {lat['p90_ms']:.3f}  "
          f"p99 {lat['p99_ms']:.3f}  min {lat['min_ms']:.3f}")
    print(f"  throughput: {lat['throughput_per_s']:.1f} samples/s")
    if args.layers:
        print(bench.format_layer_table(result["layers"]))
    return 0


def _cmd_tune(args) -> int:
    import json

    import sparks_tvm

    from . import tune as tune_mod

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise SparksError("--rpc-tracker and --rpc-key go together (the device key registered with the tracker)")
    runner = tune_mod.rpc_runner(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None
    result = sparks_tvm.tune(args.model, target=args.target, work_dir=args.work_dir, trials=args.trials,
                             runner=runner, shapes=parse_shapes(args.shapes), strict=not args.allow_float,
                             batch=args.batch, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(result.table())
        if result.curve_png:
            print(f"tuning curve: {result.curve_png}")
        print(f"use the records: sparks-tvm compile {args.model} --target ... --tuning-db {args.work_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparks-tvm", description="TVM compiler for Sparks sub-bit BNNs")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile an ONNX model to a shared library")
    c.add_argument("model", help="ONNX file")
    c.add_argument("--target", default="llvm",
                   help="llvm (this CPU, default), arm_cpu (Raspberry Pi 4, aarch64; also rpi3, rpi5, aarch64), "
                        "a TVM tag, or a target JSON")
    c.add_argument("--shapes", help="input shapes, e.g. input:1x3x224x224[,other:1x10]")
    c.add_argument("-o", "--output", default="model.so", help="output library (default model.so)")
    c.add_argument("--allow-float", action="store_true",
                   help="compile binarized convs with non-binary weights in float instead of failing")
    c.add_argument("--tuning-db", metavar="DIR", help="apply the tuning records of 'sparks-tvm tune' in DIR")
    c.add_argument("--cross-compiler", metavar="CC",
                   help="linker for the library (default for ARM targets: aarch64-linux-gnu-gcc if on PATH, "
                        "else zig from pip install 'sparks-tvm[arm]')")
    c.set_defaults(func=_cmd_compile)
    t = sub.add_parser("tune", help="autotune the binary kernels with MetaSchedule (XGBoost); resumable records")
    t.add_argument("model", help="ONNX file")
    t.add_argument("--target", default="llvm", help="as for compile (one work dir per target)")
    t.add_argument("--trials", type=int, default=64, help="measured candidates over all kernels (default 64)")
    t.add_argument("--work-dir", required=True, help="records, logs, curve; rerun with it to resume")
    t.add_argument("--shapes", help="input shapes, e.g. input:1x3x224x224[,other:1x10]")
    t.add_argument("--batch", type=int, default=8, help="candidates per search round (default 8)")
    t.add_argument("--seed", type=int, default=0, help="search seed")
    t.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a device of this RPC tracker (ARM)")
    t.add_argument("--rpc-key", metavar="KEY", help="device key registered with the tracker, e.g. rpi4b")
    t.add_argument("--allow-float", action="store_true", help="as for compile")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=_cmd_tune)
    i = sub.add_parser("inspect", help="per conv: binary or not and why, codewords, bits/weight, BOPs, "
                                       "what will be lowered (nothing is built)")
    i.add_argument("model", help="ONNX file")
    i.add_argument("--shapes", help="input shapes, e.g. input:1x3x224x224[,other:1x10]")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("-o", "--output", help="write the table/JSON to this file")
    i.set_defaults(func=_cmd_inspect)
    r = sub.add_parser("run", help="run a compiled library")
    r.add_argument("library", help="library written by 'sparks-tvm compile'")
    r.add_argument("--inputs", help=".npz with one array per model input, by name")
    r.add_argument("--outputs", help="write outputs to this .npz")
    r.add_argument("--repeat", type=int, default=0, help="also time this many runs")
    r.add_argument("--rpc", metavar="HOST:PORT", help="run on a remote device's tvm.exec.rpc_server (e.g. a Raspberry Pi)")
    r.add_argument("--tracker", metavar="HOST:PORT", help="get the remote device from this RPC tracker (with --key)")
    r.add_argument("--key", help="device key registered with the tracker, e.g. rpi4b")
    r.add_argument("--rpc-timeout", type=float, default=60.0, help="seconds to wait for the device (default 60)")
    r.set_defaults(func=_cmd_run)
    b = sub.add_parser("bench", help="latency (mean, median, p90/p99), throughput and per-kernel times")
    b.add_argument("library", help="library written by 'sparks-tvm compile'")
    b.add_argument("--inputs", help=".npz inputs (default: random, of the recorded shapes)")
    b.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    b.add_argument("--repeat", type=int, default=50, help="timed runs (default 50)")
    b.add_argument("--layers", action="store_true", help="also a per-kernel time table")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=_cmd_bench)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "target", None) and args.target.lstrip().startswith("{"):
        import json

        args.target = json.loads(args.target)
    try:
        return args.func(args)
    except SparksError as err:
        print(f"sparks-tvm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
