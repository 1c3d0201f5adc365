#!/usr/bin/env python3
"""Build small smoke-test cases for run_cases.py (needs the full TVM: run with .venv/bin/python).

    .venv/bin/python scripts/gpu/make_test_cases.py --target llvm --dir /tmp/cases_cpu
    .venv/bin/python scripts/gpu/make_test_cases.py --target cuda --arch sm_90   # -> .gpu/cases/smoke_cuda

Cases: ``add_i32`` (te kernel, exact), ``matmul_f32`` (te kernel, rtol/atol, timed) and
``tiny_sparks`` (a Sparks ResNet compiled by sparks_tvm.compile, relax VM, timed). Expected
outputs come from numpy / the llvm build of the same model, so CUDA cases check the GPU
against the CPU. ``--bad`` adds a case with a wrong expected output (exercises the failure path).

CUDA libraries: kernels are compiled here (cuda_prebuild.enable: nvcc fatbin with SASS for
``--arch`` + PTX), so the GPU machine needs no compiler; build for the GPU that runs them
(H100/H200: sm_90). Host code is generic x86-64 (``llvm``, no mcpu): runs on any x86-64 CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_case(folder, name, kind, lib, func, inputs, outputs, compare="exact", time=None, meta=None):
    os.makedirs(folder, exist_ok=True)
    in_files = []
    for i, a in enumerate(inputs):
        f = f"{name}.in{i}.npy"
        np.save(os.path.join(folder, f), a)
        in_files.append(f)
    outs = []
    for i, (shape, dtype, expected) in enumerate(outputs):
        f = None
        if expected is not None:
            f = f"{name}.out{i}.npy"
            np.save(os.path.join(folder, f), expected)
        outs.append({"shape": list(shape), "dtype": dtype, "expected": f})
    spec = {"name": name, "kind": kind, "lib": lib, "func": func, "inputs": in_files, "outputs": outs,
            "compare": compare, "time": time, "meta": meta or {}}
    with open(os.path.join(folder, f"{name}.json"), "w") as fh:
        json.dump(spec, fh, indent=1)


def _bind_threads(func, tvm, block):
    """A trivial GPU mapping: fuse the block's spatial loops, split by 128, bind to blocks/threads."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock(block)
    loops = sch.get_loops(blk)
    spatial = loops[: sum(iv.iter_type == 0 for iv in sch.get(blk).iter_vars)]  # te puts reductions last
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, factors=[None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def build_kernels(folder, target, host, tvm, te, bad=False):
    rng = np.random.default_rng(0)
    n = 4096
    a = te.placeholder((n,), "int32", name="a")
    b = te.placeholder((n,), "int32", name="b")
    c = te.compute((n,), lambda i: a[i] + b[i], name="c")
    func = te.create_prim_func([a, b, c]).with_attr("global_symbol", "add_i32")
    if target.kind.name == "cuda":
        func = _bind_threads(func, tvm, "c")
    lib = tvm.build(func, target=tvm.target.Target(target, host=host))
    lib.export_library(os.path.join(folder, "add_i32.so"))
    x = rng.integers(-1000, 1000, n, dtype=np.int32)
    y = rng.integers(-1000, 1000, n, dtype=np.int32)
    _write_case(folder, "add_i32", "kernel", "add_i32.so", "add_i32", [x, y], [((n,), "int32", x + y)],
                time={"number": 20, "repeat": 3}, meta={"what": "te add, exact"})
    if bad:
        _write_case(folder, "add_i32_bad_expected", "kernel", "add_i32.so", "add_i32", [x, y],
                    [((n,), "int32", x + y + (np.arange(n) % 7 == 0))], meta={"what": "must report mismatches"})
        _write_case(folder, "missing_lib", "kernel", "nope.so", "add_i32", [x, y], [((n,), "int32", None)],
                    meta={"what": "must report an error"})

    m = k = nn = 128
    A = te.placeholder((m, k), "float32", name="A")
    B = te.placeholder((k, nn), "float32", name="B")
    r = te.reduce_axis((0, k), name="r")
    C = te.compute((m, nn), lambda i, j: te.sum(A[i, r] * B[r, j], axis=r), name="C")
    func = te.create_prim_func([A, B, C]).with_attr("global_symbol", "matmul_f32")
    if target.kind.name == "cuda":
        func = _bind_threads(func, tvm, "C")
    lib = tvm.build(func, target=tvm.target.Target(target, host=host))
    lib.export_library(os.path.join(folder, "matmul_f32.so"))
    xa = rng.standard_normal((m, k), dtype=np.float32)
    xb = rng.standard_normal((k, nn), dtype=np.float32)
    _write_case(folder, "matmul_f32", "kernel", "matmul_f32.so", "matmul_f32", [xa, xb],
                [((m, nn), "float32", xa @ xb)], compare={"rtol": 1e-4, "atol": 1e-4},
                time={"number": 20, "repeat": 3}, meta={"what": "te matmul 128^3, tolerance"})


def build_vm_model(folder, target, tmp):
    import sparks_tvm
    from sparks_tvm import models

    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    onnx_path = os.path.join(tmp, "tiny.onnx")
    models.export_onnx(net, (2, 3, 9, 9), onnx_path)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    ref = sparks_tvm.compile(onnx_path, target="llvm")
    expected = ref.run(x)
    compiled = ref if target == "llvm" else sparks_tvm.compile(onnx_path, target=target)
    compiled.export_library(os.path.join(folder, "tiny_sparks.so"))
    compare = "exact" if target == "llvm" else {"rtol": 1e-4, "atol": 1e-4}
    _write_case(folder, "tiny_sparks", "vm", "tiny_sparks.so", "main", [x],
                [(e.shape, str(e.dtype), e) for e in expected], compare=compare,
                time={"number": 10, "repeat": 3},
                meta={"what": "sparks_resnet_tiny(k=4, widths=(8,12)) via sparks_tvm.compile",
                      "report": [r.get("kind") if isinstance(r, dict) else str(r)
                                 for r in json.loads(compiled.report.to_json())]})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("llvm", "cuda"), default="llvm")
    ap.add_argument("--arch", default="sm_90", help="CUDA arch for --target cuda (H100/H200: sm_90)")
    ap.add_argument("--dir", help="output folder (default .gpu/cases/smoke_<target>)")
    ap.add_argument("--bad", action="store_true", help="also write two cases that must fail")
    ap.add_argument("--no-vm", action="store_true", help="skip the sparks_tvm model case")
    args = ap.parse_args(argv)

    import tvm
    from tvm import te

    if args.target == "cuda":
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import cuda_prebuild

        print("prebuilt CUDA kernels:", cuda_prebuild.enable(args.arch))

    folder = args.dir or os.path.join(ROOT, ".gpu", "cases", f"smoke_{args.target}")
    os.makedirs(folder, exist_ok=True)
    if args.target == "cuda":
        target = tvm.target.Target({"kind": "cuda", "arch": args.arch})
        host = tvm.target.Target("llvm")  # generic x86-64: runs on any x86-64 host CPU
        vm_target = tvm.target.Target({"kind": "cuda", "arch": args.arch}, host=host)
    else:
        from sparks_tvm.target import host_target

        target = host = host_target()
        vm_target = "llvm"
    build_kernels(folder, target, host, tvm, te, bad=args.bad)
    if not args.no_vm:
        tmp = tempfile.mkdtemp()
        try:
            build_vm_model(folder, vm_target, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.target == "cuda":
        for so in sorted(f for f in os.listdir(folder) if f.endswith(".so")):
            fmts = cuda_prebuild.library_cuda_formats(os.path.join(folder, so))
            print(f"  {so}: CUDA module formats {fmts}")
            if not fmts or "cuda" in fmts:
                raise SystemExit(f"{so} holds CUDA source, not a binary: the GPU machine cannot load it")
    print(f"cases in {folder}: {sorted(f for f in os.listdir(folder) if f.endswith('.json'))}")


if __name__ == "__main__":
    main()
