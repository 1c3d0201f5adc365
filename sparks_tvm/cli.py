"""``sparks-tvm``: compile and run Sparks models from the shell (tvmc/trtexec style).

    sparks-tvm compile model.onnx --target llvm --shapes input:1x3x224x224 -o model.so
    sparks-tvm run model.so --inputs x.npz [--outputs y.npz]
    sparks-tvm inspect model.onnx [--json]
    sparks-tvm bench model.so [--warmup 5] [--repeat 50] [--layers] [--json]
    sparks-tvm tune model.onnx --target llvm --trials 64 --work-dir tune-host [--wait]
    sparks-tvm tune model.onnx --target arm_cpu --runner emulated-pi --trials 64 --work-dir tune-arm

Every failure is one line on stderr naming the bad thing, exit status 2 for bad input (a
``SparksError``, a bad argument) and 1 for anything else (a full disk, an internal error);
``--debug`` adds the traceback. docs/errors.md lists the errors and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
import traceback

import numpy as np

from . import __version__, library
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


def default_output(model_path: str) -> str:
    """``nets/resnet.onnx`` -> ``resnet.so`` (in the working directory, like ``cc -o``'s a.out)."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0] or "model"
    return stem + ".so"


def _cmd_compile(args) -> int:
    import sparks_tvm

    from .compiler import check_writable
    from .target import target_json

    output = args.output or default_output(args.model)
    check_writable(output)  # before minutes of compiling, not after

    def phase(name, secs):
        if not args.quiet:
            print(f"{name:<7} {secs:7.2f} s", flush=True)

    model = sparks_tvm.compile(args.model, target=args.target, shapes=parse_shapes(args.shapes),
                               strict=not args.allow_float, tuning_db=args.tuning_db, progress=phase)
    replacing = os.path.exists(output)
    model.export_library(output, cross_compiler=args.cross_compiler)
    phase("link", model.phase_times["link"])
    if not args.quiet:
        print(f"target: {target_json(model.target)}")
        print(f"threads: {model.num_threads} ({model.threads_source})")
        print(model.report)
    print(f"{'replaced' if replacing else 'wrote'} {output} (+{output}.sparks.json)")
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
    if args.outputs:
        check_output_file(args.outputs)
    if args.inputs:
        arrays = library.read_inputs(args.inputs, names)
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
        with named_write(args.outputs, "wb") as fh:  # a file object: np.savez would append .npz to the name
            np.savez(fh, **dict(zip(onames, outputs)))
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
        check_output_file(args.output)
        with named_write(args.output, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_bench(args) -> int:
    import sparks_tvm

    from . import bench

    model = sparks_tvm.load(args.library)
    if args.inputs:
        arrays = library.read_inputs(args.inputs, [d["name"] for d in model.inputs])
    else:
        # Latency does not depend on the values: a fixed random input of the recorded shape.
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(d["shape"]).astype(d["dtype"]) for d in model.inputs]
    target = model._meta.get("target")
    try:
        target = json.loads(target) if isinstance(target, str) else target  # an object, not a string of one
    except ValueError:
        pass
    result = {"library": args.library, "target": target,
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
    import sparks_tvm

    from . import tune as tune_mod
    from .target import resolve_target, with_cores

    if bool(args.tracker) != bool(args.key):
        raise SparksError("--rpc-tracker and --rpc-key go together (the device key registered with the tracker)")
    target = args.target
    if args.threads:
        # Measure with this many threads: TVM's pool reads the variable when it first starts.
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        target = with_cores(resolve_target(target), args.threads)
    runner = args.runner or ("rpc" if args.tracker else "local")
    if runner == tune_mod.EMULATED_PI and args.tracker:
        raise SparksError("--runner emulated-pi counts instructions on this machine's emulated Pi: drop "
                          "--rpc-tracker/--rpc-key (or use --runner rpc)")
    if runner == "rpc":
        if not args.tracker:
            raise SparksError("--runner rpc needs the device's tracker: --rpc-tracker HOST:PORT --rpc-key KEY")
        runner = tune_mod.rpc_runner(args.tracker, args.key)
    result = sparks_tvm.tune(args.model, target=target, work_dir=args.work_dir, trials=args.trials,
                             runner=runner, shapes=parse_shapes(args.shapes), strict=not args.allow_float,
                             batch=args.batch, seed=args.seed, wait=args.wait)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(result.table())
        if result.curve_png:
            print(f"tuning curve: {result.curve_png}")
        print(f"use the records: sparks-tvm compile {args.model} --target ... --tuning-db {args.work_dir}")
    return 0


@contextlib.contextmanager
def named_write(path: str, mode: str):
    """``open(path, mode)`` whose write and close errors (a full disk) name ``path``."""
    try:
        with open(path, mode) as fh:
            yield fh
    except OSError as err:
        raise OSError(err.errno, err.strerror, err.filename or path) from None


def check_output_file(path: str) -> None:
    """A one-line :class:`SparksError` if ``path`` cannot be written (before any work is done)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SparksError(f"{path}: is a directory, expected a file name")
    if not os.path.isdir(folder):
        raise SparksError(f"{path}: the folder {folder} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK) or not os.access(folder, os.W_OK):
        raise SparksError(f"{path}: not writable")


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse then reports the flag and value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage block stays behind ``--help``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _rpc_flags(p, direct: bool) -> None:
    """The RPC flags, one spelling for run and tune (the older short spellings are aliases)."""
    if direct:
        p.add_argument("--rpc", metavar="HOST:PORT", help="run on a remote device's tvm.exec.rpc_server (e.g. a Raspberry Pi)")
    p.add_argument("--rpc-tracker", "--tracker", dest="tracker", metavar="HOST:PORT",
                   help="get the remote device from this RPC tracker (with --rpc-key)")
    p.add_argument("--rpc-key", "--key", dest="key", metavar="KEY", help="device key registered with the tracker, e.g. rpi4b")
    if direct:
        p.add_argument("--rpc-timeout", type=float, default=60.0, help="seconds to wait for the device (default 60)")


def _compile_parser(sub, common) -> None:
    c = sub.add_parser("compile", parents=[common], help="compile an ONNX model to a shared library")
    c.add_argument("model", help="ONNX file")
    c.add_argument("--target", default="llvm",
                   help="llvm (this CPU, default), arm_cpu (Raspberry Pi 4, aarch64; also rpi3, rpi5, aarch64), "
                        "a TVM tag, or a target JSON")
    c.add_argument("--shapes", help="input shapes, e.g. input:1x3x224x224[,other:1x10]")
    c.add_argument("-o", "--output", help="output library (default: the model's name with .so, here)")
    c.add_argument("--allow-float", action="store_true",
                   help="compile binarized convs with non-binary weights in float instead of failing")
    c.add_argument("--tuning-db", metavar="DIR", help="apply the tuning records of 'sparks-tvm tune' in DIR")
    c.add_argument("--cross-compiler", metavar="CC",
                   help="linker for the library (default for ARM targets: aarch64-linux-gnu-gcc if on PATH, "
                        "else zig from pip install 'sparks-tvm[arm]')")
    c.add_argument("-q", "--quiet", action="store_true", help="print only the line naming the written library")
    c.set_defaults(func=_cmd_compile)


def _tune_parser(sub, common) -> None:
    t = sub.add_parser("tune", parents=[common],
                       help="autotune the binary kernels with MetaSchedule (XGBoost); resumable records")
    t.add_argument("model", help="ONNX file")
    t.add_argument("--target", default="llvm", help="as for compile (one work dir per target)")
    t.add_argument("--trials", type=_int_at_least(0), default=64, help="measured candidates over all kernels (default 64)")
    t.add_argument("--work-dir", required=True, help="records, logs, curve; rerun with it to resume")
    t.add_argument("--shapes", help="input shapes, e.g. input:1x3x224x224[,other:1x10]")
    t.add_argument("--batch", type=_int_at_least(1), default=8, help="candidates per search round (default 8)")
    t.add_argument("--seed", type=int, default=0, help="search seed")
    t.add_argument("--threads", type=_int_at_least(1),
                   help="threads to measure with (default: all cores); tune with the count you will run with")
    t.add_argument("--wait", action="store_true",
                   help="if another tune holds the work dir, wait for it to end (default: fail at once)")
    t.add_argument("--runner", choices=("local", "rpc", "emulated-pi"),
                   help="where candidates are measured: local (this machine; default), rpc (a device behind "
                        "--rpc-tracker; the default when it is given), emulated-pi (ARM targets: NEON plans "
                        "costed in aarch64 instructions on the emulated Pi of scripts/emulated_pi, not time)")
    _rpc_flags(t, direct=False)
    t.add_argument("--allow-float", action="store_true", help="as for compile")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=_cmd_tune)


def _run_parsers(sub, common) -> None:
    i = sub.add_parser("inspect", parents=[common], help="per conv: binary or not and why, codewords, bits/weight, "
                                                        "BOPs, what will be lowered (nothing is built)")
    i.add_argument("model", help="ONNX file")
    i.add_argument("--shapes", help="input shapes, e.g. input:1x3x224x224[,other:1x10]")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("-o", "--output", help="write the table/JSON to this file")
    i.set_defaults(func=_cmd_inspect)
    r = sub.add_parser("run", parents=[common], help="run a compiled library")
    r.add_argument("library", help="library written by 'sparks-tvm compile'")
    r.add_argument("--inputs", help=".npz with one array per model input, by name")
    r.add_argument("--outputs", help="write outputs to this .npz")
    r.add_argument("--repeat", type=_int_at_least(0), default=0, help="also time this many runs")
    _rpc_flags(r, direct=True)
    r.set_defaults(func=_cmd_run)
    b = sub.add_parser("bench", parents=[common], help="latency (mean, median, p90/p99), throughput, per-kernel times")
    b.add_argument("library", help="library written by 'sparks-tvm compile'")
    b.add_argument("--inputs", help=".npz inputs (default: random, of the recorded shapes)")
    b.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed runs first (default 5)")
    b.add_argument("--repeat", type=_int_at_least(1), default=50, help="timed runs (default 50)")
    b.add_argument("--layers", action="store_true", help="also a per-kernel time table")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="sparks-tvm", description="TVM compiler for Sparks sub-bit BNNs")
    ap.add_argument("--version", action="version", version=f"sparks-tvm {__version__}")
    ap.add_argument("--debug", action="store_true", help="on an error, also print the Python traceback")
    # --debug after the command too; SUPPRESS keeps a subcommand's default from hiding the global flag.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _compile_parser(sub, common)
    _tune_parser(sub, common)
    _run_parsers(sub, common)
    return ap


def parse_target(text):
    """A ``--target`` value starting with ``{`` is JSON: a typo is a one-line error."""
    if not (isinstance(text, str) and text.lstrip().startswith("{")):
        return text
    try:
        return json.loads(text)
    except ValueError as err:
        raise SparksError(f"--target {text!r} is not valid JSON ({err}); e.g. --target "
                          '\'{"kind": "llvm", "mcpu": "cortex-a72"}\'') from None


def main(argv=None) -> int:
    """The CLI: one line per error, exit 2 for bad input, 1 for anything else (see the module doc)."""
    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version, or a bad argument (already printed, one line)
            status = done.code if isinstance(done.code, int) else 2
        else:
            if getattr(args, "target", None):
                args.target = parse_target(args.target)
            status = args.func(args)
        sys.stdout.flush()  # a full disk or closed pipe must fail here, in our hands, not at exit
        return status
    except SparksError as err:
        return _fail(args, str(err), 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except OSError as err:  # a full disk, a folder that vanished, a closed pipe
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        if err.errno in (errno.ENOSPC, errno.EPIPE):
            where = where or "writing standard output: "  # our own files' errors carry their names
            _silence_stdout()
        return _fail(args, f"{where}{err.strerror or err}", 1)
    except Exception as err:  # noqa: BLE001 - the last guard: one line, traceback with --debug
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return _fail(args, f"internal error: {err.__class__.__name__}: {first} (rerun with --debug for the "
                           "traceback, and please report it)", 1)


def _fail(args, message: str, status: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    # One line: multi-line errors (the unsupported-ops list) are joined.
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    try:
        sys.stderr.write(f"sparks-tvm: error: {text}\n")
        sys.stderr.flush()
    except OSError:
        pass
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a full stdout says nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
