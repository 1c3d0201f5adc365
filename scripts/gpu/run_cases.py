#!/usr/bin/env python3
"""Run prebuilt TVM libraries ("cases") with a runtime-only TVM and write a results JSON.

Runs on the GPU machine (python3 + the .gpu bundle, see setup_device.sh) and here against
CPU-built libraries (``--device cpu``). Needs only tvm's runtime: no tvm.relax, no compiler.

A case is ``<cases>/**/<name>.json`` next to its files::

    {"name": str, "kind": "kernel" | "vm", "lib": "file.so", "func": "main",
     "inputs": ["x.npy", ...],
     "outputs": [{"shape": [...], "dtype": "int32", "expected": "y.npy" or null}],
     "compare": "exact" | {"rtol": float, "atol": float},
     "time": {"number": int, "repeat": int} or null,
     "meta": {...}}

kernel: ``lib[func](*inputs, *outputs)`` (destination passing, outputs allocated from the spec).
vm: ``VirtualMachine(lib, dev)[func](*inputs)`` returns a tensor or a (nested) tuple, flattened
and compared in order with ``outputs``.

Exit status 1 if any case failed (error or mismatch); one failing case never stops the run.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cuda_prebuild (stdlib-only at import)


# --------------------------------------------------------------------------- runtime setup
def _preload_cudart() -> str | None:
    """Make libcudart.so.13 resolvable for libtvm_runtime_cuda.so (dlopen matches by SONAME)."""
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        return "libcudart.so.13 (default search path)"
    except OSError:
        pass
    import site
    import sysconfig

    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    roots += list(getattr(site, "getsitepackages", lambda: [])())
    pats = [os.path.join(r, "nvidia", "*", "lib", "libcudart.so.13") for r in dict.fromkeys(roots)]
    pats += ["/usr/local/cuda*/lib64/libcudart.so.13", os.path.join(ROOT, ".gpu", "cuda", "libcudart.so.13")]
    for pat in pats:
        for path in sorted(glob.glob(pat)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


def load_runtime(device: str) -> dict:
    """Import tvm (runtime only) and, for CUDA, load libtvm_runtime_cuda.so."""
    info: dict = {}
    import tvm  # noqa: F401  (TVM_USE_RUNTIME_LIB=1 keeps libtvm_compiler.so out)

    info["tvm_file"] = tvm.__file__
    info["tvm_version"] = getattr(tvm, "__version__", None)
    info["runtime_only"] = bool(getattr(tvm, "_RUNTIME_ONLY", False))
    if device == "cuda":
        from tvm.base import _LOADED_LIBS

        if "tvm_runtime_cuda" not in _LOADED_LIBS:
            info["cudart"] = _preload_cudart()
            lib_dir = os.path.dirname(os.path.realpath(_LOADED_LIBS["tvm_runtime"]._name))
            path = os.path.join(lib_dir, "libtvm_runtime_cuda.so")
            # RTLD_LOCAL like tvm.backend.cuda.register_backend: only its registrations matter.
            _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        info["loaded_libs"] = sorted(_LOADED_LIBS)
    else:
        from tvm.base import _LOADED_LIBS

        info["loaded_libs"] = sorted(_LOADED_LIBS)
    return info


def tvm_device(device: str):
    import tvm

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if not dev.exist:
        raise RuntimeError(f"TVM sees no {device} device (driver / libcuda.so.1 missing?)")
    return dev


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def environment(device: str, dev) -> dict:
    import tvm_ffi

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
           "tvm_ffi": getattr(tvm_ffi, "__version__", None), "host": platform.node()}
    try:
        import ml_dtypes

        env["ml_dtypes"] = ml_dtypes.__version__
    except ImportError:
        env["ml_dtypes"] = None
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            env["torch_device_name"] = torch.cuda.get_device_name(0)
    except Exception as err:  # noqa: BLE001
        env["torch"] = f"unavailable: {err.__class__.__name__}: {err}"
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
    if smi:
        env["nvidia_smi"] = smi.splitlines()
    if dev is not None:
        d = {"str": str(dev)}
        for attr in ("device_name", "compute_version", "multi_processor_count", "max_clock_rate",
                     "total_global_memory", "driver_version"):
            try:
                d[attr] = getattr(dev, attr)
            except Exception:  # noqa: BLE001
                pass
        env["tvm_device"] = d
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as fh:
                env["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    name = (env.get("nvidia_smi") or [None])[0] if device == "cuda" else env.get("cpu_model")
    name = name.split(",")[0].strip() if name else None
    env["device_name"] = name or env.get("torch_device_name") or env.get("tvm_device", {}).get("device_name") \
        or (platform.processor() or platform.machine())
    return env


# --------------------------------------------------------------------------- cases
class NativeStderr:
    """Send fd 2 (TVM's C++ LOG(WARNING) lines, e.g. one per VM function) to a log file."""

    def __init__(self, path: str | None):
        self.path = path
        self.text = ""

    def __enter__(self):
        if self.path:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._fh = open(self.path, "ab")
            self._start = self._fh.tell()
            os.dup2(self._fh.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.path:
            sys.stderr.flush()
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._fh.close()
            with open(self.path, "rb") as fh:
                fh.seek(self._start)
                self.text = fh.read().decode(errors="replace")
        return False

    def summary(self) -> dict | None:
        lines = [ln for ln in self.text.splitlines() if ln.strip()]
        if not lines:
            return None
        noisy = ("Scope Loaded", "Scope Saving")
        keep = [ln for ln in lines if not any(k in ln for k in noisy)]
        return {"lines": len(lines), "tail": keep[-20:]}


_HINTS = (
    (("tvm_callback_cuda_compile", "cuda-bindings", "NVRTC"),
     "the library holds CUDA *source* (built where libtvm_runtime_cuda could not load): rebuild it "
     "after scripts/gpu/cuda_prebuild.enable(arch) so the kernels are compiled at build time"),
    (("no kernel image", "NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_IMAGE"),
     "the kernels were compiled for another GPU architecture: rebuild with the device's arch (H100/H200: sm_90)"),
    (("cannot find file",), "a file named by the case is missing (was .gpu/cases carried?)"),
)


def _hint(text: str) -> str | None:
    for keys, hint in _HINTS:
        if any(k in text for k in keys):
            return hint
    return None


def find_cases(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True))
    out = []
    for f in files:
        try:
            with open(f) as fh:
                spec = json.load(fh)
        except Exception:  # noqa: BLE001
            out.append(f)  # broken JSON: report it as a failing case
            continue
        if isinstance(spec, dict) and "kind" in spec and "lib" in spec:
            out.append(f)
    return out


def _load_npy(path: str):
    return np.load(path, allow_pickle=False)


def _to_numpy(t) -> np.ndarray:
    return t.numpy()


def _flatten(value) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    try:
        items = list(value)
    except TypeError:
        return [value]  # a scalar / shape / other object
    out = []
    for item in items:
        out.extend(_flatten(item))
    return out


def compare(got: np.ndarray, spec: dict, expected: np.ndarray | None, mode) -> dict:
    rec = {"shape": list(got.shape), "dtype": str(got.dtype)}
    if spec.get("shape") is not None and list(spec["shape"]) != list(got.shape):
        rec["ok"] = False
        rec["problem"] = f"shape {list(got.shape)} != spec {list(spec['shape'])}"
        return rec
    if spec.get("dtype") is not None and str(spec["dtype"]) != str(got.dtype):
        rec["ok"] = False
        rec["problem"] = f"dtype {got.dtype} != spec {spec['dtype']}"
        return rec
    if expected is None:
        rec["ok"] = True
        rec["checked"] = False
        g = got.astype(np.float64)
        rec["summary"] = {"sum": float(g.sum()), "abs_max": float(np.abs(g).max()) if g.size else 0.0,
                          "finite": bool(np.isfinite(g).all())}
        return rec
    rec["checked"] = True
    if expected.shape != got.shape:
        rec["ok"] = False
        rec["problem"] = f"shape {list(got.shape)} != expected {list(expected.shape)}"
        return rec
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(g - e)
    with np.errstate(all="ignore"):
        rec["max_abs_diff"] = float(np.nanmax(diff)) if diff.size else 0.0
    if mode == "exact" or mode is None:
        bad = got != expected
        rec["mismatches"] = int(np.count_nonzero(bad))
        rec["ok"] = bool(np.array_equal(got, expected))
    else:
        rtol, atol = float(mode.get("rtol", 1e-5)), float(mode.get("atol", 1e-8))
        close = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
        rec["mismatches"] = int(close.size - np.count_nonzero(close))
        rec["ok"] = rec["mismatches"] == 0
        with np.errstate(all="ignore"):
            rel = diff / np.maximum(np.abs(e), 1e-30)
            rec["max_rel_diff"] = float(np.nanmax(rel)) if rel.size else 0.0
    rec["size"] = int(got.size)
    return rec


def _timing(res, number: int, repeat: int) -> dict:
    ms = np.array(list(res.results), dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "std_ms": float(ms.std()), "number": number, "repeat": repeat,
            "results_ms": [float(x) for x in ms]}


def run_case(path: str, dev, device: str) -> dict:
    import tvm

    rec: dict = {"file": os.path.relpath(path), "status": "error"}
    t0 = time.perf_counter()
    try:
        with open(path) as fh:
            spec = json.load(fh)
        base = os.path.dirname(os.path.abspath(path))
        rec.update({"name": spec.get("name", os.path.splitext(os.path.basename(path))[0]), "kind": spec["kind"],
                    "func": spec.get("func", "main"), "meta": spec.get("meta")})
        func_name = rec["func"]
        lib_path = os.path.join(base, spec["lib"])
        if device == "cuda" and os.path.exists(lib_path):
            try:  # "cuda" = CUDA source (needs a compiler here), "cubin" = compiled kernels
                from cuda_prebuild import library_cuda_formats

                rec["cuda_formats"] = library_cuda_formats(lib_path)
            except Exception:  # noqa: BLE001
                pass
        lib = tvm.runtime.load_module(lib_path)
        rec["load_s"] = round(time.perf_counter() - t0, 4)
        inputs = [_load_npy(os.path.join(base, p)) for p in spec.get("inputs", [])]
        rec["inputs"] = [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in inputs]
        ins = [tvm.runtime.tensor(a, dev) for a in inputs]
        out_specs = spec.get("outputs", [])
        tm = spec.get("time")
        t1 = time.perf_counter()
        if spec["kind"] == "kernel":
            f = lib[func_name]
            outs = [tvm.runtime.empty(tuple(o["shape"]), o["dtype"], dev) for o in out_specs]
            f(*ins, *outs)
            dev.sync()
            rec["run_s"] = round(time.perf_counter() - t1, 4)
            got = [_to_numpy(o) for o in outs]
            if tm:
                number, repeat = int(tm.get("number", 10)), int(tm.get("repeat", 3))
                ev = lib.time_evaluator(func_name, dev, number=number, repeat=repeat,
                                        min_repeat_ms=int(tm.get("min_repeat_ms", 0)))
                rec["time"] = _timing(ev(*ins, *outs), number, repeat)
        elif spec["kind"] == "vm":
            from tvm.runtime.vm import VirtualMachine  # runtime-level VM, no tvm.relax import

            vm = VirtualMachine(lib, dev, memory_cfg=spec.get("memory_cfg"))
            result = vm[func_name](*ins)
            dev.sync()
            rec["run_s"] = round(time.perf_counter() - t1, 4)
            got = [_to_numpy(t) if isinstance(t, tvm.runtime.Tensor) else np.asarray(t) for t in _flatten(result)]
            if tm:
                number, repeat = int(tm.get("number", 10)), int(tm.get("repeat", 3))
                vm.set_input(func_name, *ins)
                ev = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat,
                                       min_repeat_ms=int(tm.get("min_repeat_ms", 0)))
                rec["time"] = _timing(ev(func_name), number, repeat)
        else:
            raise ValueError(f"unknown kind {spec['kind']!r} (expected 'kernel' or 'vm')")
        if len(got) != len(out_specs):
            raise ValueError(f"function returned {len(got)} output(s), the case lists {len(out_specs)}")
        mode = spec.get("compare", "exact")
        rec["compare"] = mode
        rec["outputs"] = []
        for arr, o in zip(got, out_specs):
            exp = _load_npy(os.path.join(base, o["expected"])) if o.get("expected") else None
            rec["outputs"].append(compare(arr, o, exp, mode))
        rec["status"] = "ok" if all(o["ok"] for o in rec["outputs"]) else "mismatch"
    except Exception as err:  # noqa: BLE001
        rec["error"] = f"{err.__class__.__name__}: {err}"[:4000]
        rec["traceback"] = traceback.format_exc(limit=8)[-4000:]
        hint = _hint(str(err))
        if hint:
            rec["hint"] = hint
    rec["wall_s"] = round(time.perf_counter() - t0, 4)
    return rec


# --------------------------------------------------------------------------- torch baseline
def torch_baseline(shapes_path: str, number: int, repeat: int, warmup: int) -> dict:
    out: dict = {"shapes_file": shapes_path, "number": number, "repeat": repeat, "warmup": warmup}
    try:
        with open(shapes_path) as fh:
            shapes = json.load(fh)
        import torch
        import torch.nn.functional as F
    except Exception as err:  # noqa: BLE001
        out["skipped"] = f"{err.__class__.__name__}: {err}"
        return out
    if not torch.cuda.is_available():
        out["skipped"] = "torch.cuda.is_available() is False"
        return out
    out["torch"] = torch.__version__
    out["device_name"] = torch.cuda.get_device_name(0)
    out["cudnn"] = torch.backends.cudnn.version()
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    results = []
    try:
        for s in shapes:
            rec = {"shape": s, "name": s.get("name")}
            try:
                b, cin, cout = int(s["batch"]), int(s["in_channels"]), int(s["out_channels"])
                h, w, stride = int(s["height"]), int(s["width"]), int(s.get("stride", 1))
                x = torch.randn(b, cin, h, w, device="cuda", dtype=torch.float32)
                wt = torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.float32)
                ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
                flops = 2.0 * b * cout * ho * wo * cin * 9
                rec["out_shape"] = [b, cout, ho, wo]
                rec["gflop"] = flops / 1e9
                for mode, tf32 in (("fp32", False), ("tf32", True)):
                    torch.backends.cudnn.allow_tf32 = tf32
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    with torch.no_grad():
                        for _ in range(warmup):
                            F.conv2d(x, wt, stride=stride, padding=1)
                        torch.cuda.synchronize()
                        per_iter = []
                        for _ in range(repeat):
                            start = torch.cuda.Event(enable_timing=True)
                            end = torch.cuda.Event(enable_timing=True)
                            start.record()
                            for _ in range(number):
                                F.conv2d(x, wt, stride=stride, padding=1)
                            end.record()
                            end.synchronize()
                            per_iter.append(start.elapsed_time(end) / number)
                    ms = np.array(per_iter)
                    med = float(np.median(ms))
                    rec[mode] = {"median_ms": med, "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
                                 "results_ms": [float(v) for v in ms], "tflops": flops / (med * 1e-3) / 1e12}
                rec["status"] = "ok"
            except Exception as err:  # noqa: BLE001
                rec["status"] = "error"
                rec["error"] = f"{err.__class__.__name__}: {err}"
            results.append(rec)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    out["results"] = results
    return out


# --------------------------------------------------------------------------- output
def _fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec)


def print_table(records: list[dict], torch_res: dict | None) -> None:
    rows = [("case", "kind", "status", "mism", "max|d|", "median_ms", "min_ms")]
    for r in records:
        outs = r.get("outputs") or []
        mism = sum(o.get("mismatches", 0) for o in outs) if outs else None
        mad = max((o.get("max_abs_diff", 0.0) for o in outs if "max_abs_diff" in o), default=None)
        t = r.get("time") or {}
        rows.append((str(r.get("name", r["file"])), str(r.get("kind", "?")), r["status"],
                     "-" if mism is None else str(mism), _fmt(mad), _fmt(t.get("median_ms")), _fmt(t.get("min_ms"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in records:
        if r["status"] == "error":
            print(f"  ! {r.get('name', r['file'])}: {r.get('error', '')[:300]}")
            if r.get("hint"):
                print(f"    hint: {r['hint']}")
        for o in r.get("outputs") or []:
            if o.get("problem"):
                print(f"  ! {r.get('name')}: {o['problem']}")
    if torch_res is not None:
        if torch_res.get("skipped"):
            print(f"torch baseline skipped: {torch_res['skipped']}")
        else:
            print(f"torch baseline ({torch_res.get('device_name')}, cudnn {torch_res.get('cudnn')}):")
            for r in torch_res.get("results", []):
                if r.get("status") != "ok":
                    print(f"  {r.get('name')}: {r.get('error')}")
                    continue
                print(f"  {str(r.get('name')):24s} fp32 {r['fp32']['median_ms']:.4f} ms ({r['fp32']['tflops']:.2f} TFLOP/s)"
                      f"  tf32 {r['tf32']['median_ms']:.4f} ms ({r['tf32']['tflops']:.2f} TFLOP/s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=os.path.join(ROOT, ".gpu", "cases"), help="cases folder (default .gpu/cases)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_results.json"),
                    help="results JSON (default $OUT/gpu_results.json)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--only", nargs="*", help="run only cases whose name/file contains one of these")
    ap.add_argument("--no-capture", action="store_true",
                    help="leave TVM's C++ log lines on stderr (default: <out dir>/native_stderr.log)")
    ap.add_argument("--torch-baseline", metavar="SHAPES_JSON", help="time torch conv2d 3x3 for these shapes")
    ap.add_argument("--torch-number", type=int, default=50)
    ap.add_argument("--torch-repeat", type=int, default=5)
    ap.add_argument("--torch-warmup", type=int, default=10)
    args = ap.parse_args(argv)

    results: dict = {"device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        os.replace(tmp, args.out)

    native_log = None if args.no_capture else os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                          "native_stderr.log")
    results["native_log"] = native_log
    failed = False
    dev = None
    try:
        results["runtime"] = load_runtime(args.device)
        dev = tvm_device(args.device)
    except Exception as err:  # noqa: BLE001
        results["runtime_error"] = f"{err.__class__.__name__}: {err}"
        results["runtime_traceback"] = traceback.format_exc(limit=8)
        print(f"runtime setup failed: {results['runtime_error']}", file=sys.stderr)
        failed = True
    try:
        results["env"] = environment(args.device, dev)
    except Exception as err:  # noqa: BLE001
        results["env"] = {"error": f"{err.__class__.__name__}: {err}"}
    results["device_name"] = results["env"].get("device_name")
    save()

    cases = find_cases(args.cases) if os.path.isdir(args.cases) else []
    if args.only:
        cases = [c for c in cases if any(k in c for k in args.only)]
    if not cases:
        print(f"no cases under {args.cases}")
    for path in cases:
        if dev is None:
            rec = {"file": os.path.relpath(path), "status": "error", "error": "runtime unavailable: "
                   + results.get("runtime_error", "?")}
        else:
            # mark as in progress so a hard crash (segfault) still leaves a trace in the JSON
            results["cases"].append({"file": os.path.relpath(path), "status": "crashed"})
            save()
            results["cases"].pop()
            with NativeStderr(native_log) as cap:
                rec = run_case(path, dev, args.device)
            if cap.summary():
                rec["native_log"] = cap.summary()
        results["cases"].append(rec)
        failed |= rec["status"] != "ok"
        save()
        print(f"[{rec['status']:8s}] {rec.get('name', path)}"
              + (f"  {rec['time']['median_ms']:.4f} ms" if rec.get("time") else "")
              + (f"  {rec['error'][:200]}" if rec.get("error") else ""), flush=True)

    torch_res = None
    if args.torch_baseline:
        torch_res = torch_baseline(args.torch_baseline, args.torch_number, args.torch_repeat, args.torch_warmup)
        results["torch"] = torch_res
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["failed"] = failed
    save()
    print(f"device: {results.get('device_name')}  ({len(cases)} case(s)) -> {args.out}")
    print_table(results["cases"], torch_res)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
