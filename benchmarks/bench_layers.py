"""Per-layer benchmark on the ResNet-18 binary layer shapes, measured side by side.

For every shape: our Sparks op, our dense binary conv (both default host schedules, untuned)
and onnxruntime's float32 conv of the same shape, with the same thread count, in one process.
Reports medians and ratios (ORT time / ours), machine and versions.

    python benchmarks/bench_layers.py --threads 1 --k 16 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, nargs="+", default=[16])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None, help="directory for layers_t<threads>.json/.md")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM creates its thread pool

    import numpy as np
    import onnxruntime as ort
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    from schedules.host import HostSchedules
    from sparks_tvm.kernels import ConvGeometry, idx_dtype, pack_binary_weights, sparks_out_shape
    from sparks_tvm.models import random_codebook
    from sparks_tvm.reference import codes_to_bits
    from sparks_tvm.target import host_target

    # (cin, cout, input side, stride) of ResNet-18's binary 3x3 convs at 224x224.
    shapes = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2),
              (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1)]
    target = host_target()
    sched = HostSchedules.for_target(target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)

    def tvm_ms(func, tensors):
        lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target).jit()
        ev = lib.time_evaluator("main", dev, number=10, repeat=args.repeat, min_repeat_ms=50)
        return float(np.median(ev(*tensors).results) * 1e3)

    def ort_ms(geom, x):
        w = rng.standard_normal((geom.out_channels, geom.in_channels, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=list(geom.stride))
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, "w")])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(helper.make_model(graph).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess.run(None, {"x": x})
        meds = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _ in range(10):
                sess.run(None, {"x": x})
            meds.append((time.perf_counter() - t0) / 10 * 1e3)
        return float(np.median(meds))

    rows = []
    for k in args.k:
        for cin, cout, side, stride in shapes:
            geom = ConvGeometry(1, cin, side, side, cout, stride=(stride, stride))
            x = rng.standard_normal(geom.in_shape).astype(np.float32)
            codebook = random_codebook(rng, k).astype(np.int8)
            idx = rng.integers(0, k, size=(cout, cin)).astype(idx_dtype(k))
            out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
            out_dense = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
            xt = tvm.runtime.tensor(x, dev)
            sparks = tvm_ms(sched.schedule_sparks_conv2d(geom, k, "sign"),
                            [xt, tvm.runtime.tensor(codes_to_bits(codebook), dev), tvm.runtime.tensor(idx, dev), out])
            dense = tvm_ms(sched.schedule_binary_conv2d(geom, "sign"),
                           [xt, tvm.runtime.tensor(pack_binary_weights(codebook[idx]), dev), out_dense])
            onnxrt = ort_ms(geom, x)
            row = {"k": k, "cin": cin, "cout": cout, "in_side": side, "stride": stride, "sparks_ms": sparks,
                   "dense_binary_ms": dense, "ort_fp32_ms": onnxrt, "ort_over_sparks": onnxrt / sparks,
                   "dense_over_sparks": dense / sparks}
            rows.append(row)
            print(f"K={k:3d} {cin:4d}->{cout:4d} {side:3d}x{side:<3d} s{stride}: sparks {sparks:7.3f} ms  "
                  f"dense-binary {dense:7.3f} ms  ORT fp32 {onnxrt:7.3f} ms  ORT/sparks {onnxrt / sparks:5.2f}x  "
                  f"dense/sparks {dense / sparks:5.2f}x", flush=True)

    meta = {"command": "python benchmarks/bench_layers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads, "target": str(target), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "tvm": tvm.__version__, "onnxruntime": ort.__version__,
            "schedule": "default host schedules (untuned)"}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"layers_t{args.threads}")
        with open(base + ".json", "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        with open(base + ".md", "w") as fh:
            fh.write(f"# ResNet-18 binary layers, {args.threads} thread(s)\n\n")
            fh.write("".join(f"- {k}: `{v}`\n" for k, v in meta.items()) + "\n")
            fh.write("| K | cin->cout | in | stride | Sparks ms | dense binary ms | ORT fp32 ms | ORT/Sparks | dense/Sparks |\n")
            fh.write("|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                fh.write(f"| {r['k']} | {r['cin']}->{r['cout']} | {r['in_side']} | {r['stride']} | {r['sparks_ms']:.3f} | "
                         f"{r['dense_binary_ms']:.3f} | {r['ort_fp32_ms']:.3f} | {r['ort_over_sparks']:.2f}x | "
                         f"{r['dense_over_sparks']:.2f}x |\n")
        print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
