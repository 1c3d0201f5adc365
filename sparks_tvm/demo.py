"""The main job: build the example Sparks ResNet-18, compile it for the host, run it,
check it against onnxruntime, and print the per-layer report and latencies.

    python -m sparks_tvm.demo [--k 16] [--repeat 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import sparks_tvm
from sparks_tvm import models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=16, help="codewords per Sparks layer (default 16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10, help="timed runs for each runtime")
    ap.add_argument("--out", default=None, help="directory for model.onnx and model.so (default: a temp dir)")
    args = ap.parse_args(argv)

    import onnxruntime as ort  # optional heavy package: only the demo's float reference needs it

    out_dir = args.out or tempfile.mkdtemp(prefix="sparks_demo_")
    os.makedirs(out_dir, exist_ok=True)
    shape = (args.batch, 3, 224, 224)
    print(f"[1/4] building the example Sparks ResNet-18 (K={args.k}) and exporting it to ONNX")
    net = models.sparks_resnet18(k=args.k)
    onnx_path = os.path.join(out_dir, "sparks_resnet18.onnx")
    models.export_onnx(net, shape, onnx_path)

    print("[2/4] compiling for the host CPU with sparks_tvm")
    t0 = time.perf_counter()
    compiled = sparks_tvm.compile(onnx_path, target="llvm")
    print(f"      compiled in {time.perf_counter() - t0:.1f} s for {compiled.target}")
    lib_path = compiled.export_library(os.path.join(out_dir, "sparks_resnet18.so"))
    print(compiled.report)

    print("[3/4] running one input and checking against onnxruntime")
    x = models.example_input(shape, seed=1)
    y = compiled.run(x)[0]
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x})[0]
    err = float(np.abs(y - ref).max())
    scale = float(np.abs(ref).max())
    top1 = np.argmax(y, axis=1).tolist()
    ok = err <= 1e-5 * max(scale, 1.0) and top1 == np.argmax(ref, axis=1).tolist()
    print(f"      max |sparks_tvm - onnxruntime| = {err:.3g} (output scale {scale:.3g}); top-1 {top1}: "
          f"{'MATCH' if ok else 'MISMATCH'}")

    print(f"[4/4] latency, median of {args.repeat} runs after warm-up, same process")
    tvm_ms = compiled.benchmark(x, repeat=args.repeat)["median_ms"]
    for _ in range(2):
        sess.run(None, {"input": x})
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append((time.perf_counter() - t) * 1e3)
    ort_ms = float(np.median(times))
    print(f"      sparks_tvm: {tvm_ms:.2f} ms   onnxruntime float32: {ort_ms:.2f} ms   "
          f"ratio {ort_ms / tvm_ms:.2f}x (threads: TVM {os.environ.get('TVM_NUM_THREADS')}, ORT default)")
    print(f"      files: {onnx_path}, {lib_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
