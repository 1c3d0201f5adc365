"""Build the GPU exactness cases (run on the GPU machine by ``scripts/gpu/run_cases.py``).

Here, with the full TVM compiler and no GPU: compile random binary layers (odd sizes,
stride 2, batch > 1, channel counts that are not multiples of 32, zeros in the activations,
asymmetric padding, every binarizer mode, K from 2 to 64) with the CUDA schedules, and
store each layer's inputs with the numpy reference's output; compile the tiny test network
and the example ResNet-18 for CUDA as Relax VM libraries, with the host (LLVM) build's
outputs as the expected values::

    python scripts/gpu/make_cases.py --target nvidia/nvidia-h100 --out .gpu/cases

Kernel cases compare exactly (int32 dot products). Model cases compare the float logits
with a tolerance: the float parts (stem, BatchNorm, classifier) are stock TVM kernels whose
summation order differs between the CPU and the GPU builds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: (N, C, H, W, O, stride, padding, K, mode)
SPARKS_LAYERS = [
    (1, 3, 7, 9, 5, 1, (1, 1, 1, 1), 2, "sign"),
    (2, 17, 11, 13, 9, 2, (1, 1, 1, 1), 16, "sign"),
    (3, 40, 9, 8, 33, 1, (0, 1, 1, 0), 32, "ge"),
    (1, 70, 15, 15, 70, 2, (1, 0, 1, 0), 64, "gt"),
    (2, 64, 14, 14, 64, 1, (1, 1, 1, 1), 16, "sign"),
    (1, 96, 28, 28, 40, 2, (1, 1, 1, 1), 8, "sign"),
    (4, 33, 5, 5, 100, 1, (0, 0, 0, 0), 4, "ge"),
    (1, 130, 7, 7, 65, 1, (1, 1, 1, 1), 16, "sign"),
    (2, 8, 56, 56, 16, 1, (1, 1, 1, 1), 16, "gt"),
    (1, 200, 3, 3, 12, 1, (1, 1, 1, 1), 64, "sign"),
    (1, 1, 3, 3, 1, 1, (0, 0, 0, 0), 2, "sign"),
    (2, 513, 6, 5, 17, 2, (1, 1, 1, 1), 16, "ge"),
    (1, 8, 9, 70, 4, 1, (1, 1, 1, 1), 16, "sign"),   # rows wider than 64: byte-code patch path
    (2, 5, 7, 71, 6, 2, (0, 1, 1, 0), 4, "gt"),
    # Batch-1 deep layers: input channels split among blocks (GpuSparksParams.for_small_grid).
    (1, 256, 14, 14, 256, 1, (1, 1, 1, 1), 16, "sign"),
    (1, 512, 7, 7, 512, 1, (1, 1, 1, 1), 16, "ge"),
    (1, 144, 9, 11, 40, 2, (0, 1, 1, 0), 32, "gt"),
]
#: (N, C, H, W, O, stride, padding, mode)
BINARY_LAYERS = [
    (1, 3, 7, 9, 5, 1, (1, 1, 1, 1), "sign"),
    (2, 40, 11, 13, 33, 2, (1, 1, 1, 1), "ge"),
    (1, 70, 14, 14, 64, 1, (0, 1, 1, 0), "gt"),
]


def _save(out, name, arrays):
    files = []
    for i, a in enumerate(arrays):
        fname = f"{name}_{i}.npy"
        np.save(os.path.join(out, fname), a)
        files.append(fname)
    return files


def _case(out, name, kind, lib, inputs, outputs, compare, meta, time=None):
    spec = {"name": name, "kind": kind, "lib": lib, "func": "main", "inputs": inputs, "outputs": outputs,
            "compare": compare, "time": time, "meta": meta}
    with open(os.path.join(out, name + ".json"), "w") as fh:
        json.dump(spec, fh, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="nvidia/nvidia-h100")
    p.add_argument("--out", default=os.path.join(ROOT, ".gpu", "cases"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resnet18", action="store_true", help="skip the 224x224 ResNet-18 case")
    args = p.parse_args(argv)

    import tvm

    import sparks_tvm
    from kernel_utils import random_activations, random_layer
    from schedules.cuda import CudaSchedules
    from sparks_tvm import models
    from sparks_tvm import reference as ref
    from sparks_tvm.kernels import ConvGeometry, pack_binary_weights, pack_indices, sparks_out_shape

    # Kernels compiled here (nvcc) into the libraries: the GPU machine has only TVM's runtime.
    from cuda_prebuild import build_target

    target = build_target(args.target)
    sched = CudaSchedules(target)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    for i, (n, c, h, w, o, s, pad, k, mode) in enumerate(SPARKS_LAYERS):
        geom = ConvGeometry(n, c, h, w, o, stride=(s, s), padding=pad)
        codebook, idx = random_layer(rng, geom, k)
        x = random_activations(rng, geom.in_shape)
        want = ref.sparks_conv2d_ref(ref.binarize(x, mode), codebook, idx, geom.stride, geom.padding)
        name = f"sparks_{i:02d}"
        lib = tvm.compile(sched.schedule_sparks_conv2d(geom, k, mode).with_attr("global_symbol", "main"), target=target)
        lib.export_library(os.path.join(args.out, name + ".so"))
        inputs = _save(args.out, name + "_in", [x, ref.codes_to_bits(codebook), pack_indices(idx, k)])
        np.save(os.path.join(args.out, name + "_want.npy"), want.reshape(sparks_out_shape(geom)).astype(np.int32))
        _case(args.out, name, "kernel", name + ".so", inputs,
              [{"shape": list(sparks_out_shape(geom)), "dtype": "int32", "expected": name + "_want.npy"}], "exact",
              {"op": "sparks", "geometry": repr(geom), "k": k, "mode": mode})
        print("built", name, geom, k, mode, flush=True)

    for i, (n, c, h, w, o, s, pad, mode) in enumerate(BINARY_LAYERS):
        geom = ConvGeometry(n, c, h, w, o, stride=(s, s), padding=pad)
        signs = np.where(rng.random((o, c, 3, 3)) < 0.5, -1, 1).astype(np.int8)
        x = random_activations(rng, geom.in_shape)
        want = ref.binary_conv2d_ref(ref.binarize(x, mode), signs, geom.stride, geom.padding).astype(np.int32)
        name = f"binary_{i:02d}"
        lib = tvm.compile(sched.schedule_binary_conv2d(geom, mode).with_attr("global_symbol", "main"), target=target)
        lib.export_library(os.path.join(args.out, name + ".so"))
        inputs = _save(args.out, name + "_in", [x, pack_binary_weights(signs)])
        np.save(os.path.join(args.out, name + "_want.npy"), want)
        _case(args.out, name, "kernel", name + ".so", inputs,
              [{"shape": list(geom.out_shape), "dtype": "int32", "expected": name + "_want.npy"}], "exact",
              {"op": "binary", "geometry": repr(geom), "mode": mode})
        print("built", name, geom, mode, flush=True)

    nets = [("model_tiny", models.sparks_resnet_tiny(k=4, widths=(8, 12)), (2, 3, 9, 9))]
    if not args.no_resnet18:
        nets.append(("model_resnet18", models.sparks_resnet18(k=16), (1, 3, 224, 224)))
    for name, net, shape in nets:
        onnx_path = os.path.join(args.out, name + ".onnx")
        models.export_onnx(net, shape, onnx_path)
        x = models.example_input(shape, seed=3)
        gpu = sparks_tvm.compile(onnx_path, target=target)
        host = sparks_tvm.compile(onnx_path, target="llvm")
        want = host.run(x)
        gpu.export_library(os.path.join(args.out, name + ".so"))
        inputs = _save(args.out, name + "_in", [x])
        outs = []
        for j, y in enumerate(want):
            np.save(os.path.join(args.out, f"{name}_want{j}.npy"), y)
            outs.append({"shape": list(y.shape), "dtype": str(y.dtype), "expected": f"{name}_want{j}.npy"})
        _case(args.out, name, "vm", name + ".so", inputs, outs, {"rtol": 1e-4, "atol": 1e-3},
              {"op": "model", "report": gpu.report.count("sparks"), "input_shape": list(shape)},
              time={"number": 10, "repeat": 5})
        os.remove(onnx_path)
        print("built", name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
