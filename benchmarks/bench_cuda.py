"""GPU benchmark: the Sparks op and our dense binary conv against cuDNN float32, checked exact.

Two halves, because the GPU machine has no TVM compiler (only the runtime, see
``scripts/gpu/README.md``) and the development machine has no GPU:

``build`` (here, full TVM): for every ResNet-18 binary 3x3 layer shape (224x224 input) at
each batch size, compile our Sparks kernel (K codewords) and our dense binary kernel for a
CUDA target, export the libraries and write the layer weights and a manifest::

    python benchmarks/bench_cuda.py build --target nvidia/nvidia-h100 --batch 1 64 --k 16 --dir .gpu/bench

``run`` (on the GPU machine: TVM runtime + torch): random activations (20% exact zeros, so
the ``Sign(0) = 0`` rule is exercised), then per layer and batch size

- exactness: both our kernels' int32 outputs must equal cuDNN's convolution of the binarized
  input with the +-1 kernels ``codebook[idx]`` (a float conv of small integers with TF32 off
  is exact: every partial sum is an integer below 2^24). That reference is itself checked
  against the numpy reference on the small random layers of ``tests/test_cuda.py``;
- timing: each library through TVM's ``time_evaluator`` (the whole op: index unpacking,
  patch packing, the fused kernel), torch ``conv2d`` float32 with TF32 off (cuDNN's true
  fp32) and with TF32 allowed, all with the same warm-up and median of repeats::

    python benchmarks/bench_cuda.py run --dir .gpu/bench --out benchmarks/results

``build --mma`` also builds the binary tensor-core kernels (issue 24, sm_80+ targets):
``sparks@mma`` (stage 1 on ``mma.m16n8k128.b1.xor.popc``) and ``binary@mma`` (the dense conv
on ``mma.m16n8k256``); ``run`` checks and times them like the others. Not yet run on a GPU.

Results: ``cuda_layers.json`` and ``cuda_layers.md`` (card name, versions, command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: (cin, cout, input side, stride) of ResNet-18's binary 3x3 convs; kept in step with
#: sparks_tvm.cost.RESNET18_BINARY_LAYERS (not imported: the run side has no TVM compiler).
SHAPES = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2),
          (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1)]
MODE = "sign"
#: Schedule knobs tried beside the default at the --variants-batch sizes (schedules.cuda.GpuSparksParams).
VARIANTS = [{"vec": 1}, {"vec": 2}, {"out_regs": 4}, {"out_regs": 16}, {"out_threads": 16},
            {"out_threads": 16, "out_regs": 16}, {"group": 4}, {"group": 2}, {"threads_x": 16}, {"threads_x": 32},
            {"vec": 2, "out_regs": 4}, {"vec": 2, "out_threads": 16, "out_regs": 4}, {"vec": 2, "threads_x": 8},
            {"vec": 4, "threads_x": 8, "out_regs": 4}, {"threads_x": 8},
            # Fewer output channels or pixels per block: more blocks for batch-1 grids.
            {"out_regs": 1}, {"out_regs": 2}, {"out_threads": 16, "out_regs": 1}, {"out_threads": 16, "out_regs": 2},
            {"out_threads": 32, "out_regs": 1}, {"out_threads": 4, "out_regs": 2}, {"out_regs": 2, "group": 4},
            {"threads_x": 8, "vec": 1, "out_regs": 2}, {"threads_x": 8, "vec": 1, "out_regs": 4},
            {"threads_x": 8, "vec": 2, "out_regs": 2},
            # Split-K: the input channels shared among 2, 4 or 8 blocks per output tile.
            {"splits": 2}, {"splits": 4}, {"splits": 8}, {"splits": 4, "out_regs": 4}, {"splits": 8, "out_regs": 4}]


def _name(cin, cout, side, stride, batch, k):
    return f"c{cin}_o{cout}_s{side}_st{stride}_b{batch}_k{k}"


# ---------------------------------------------------------------------------------- build
def build(args) -> None:
    import numpy as np

    sys.path.insert(0, ROOT)
    import tvm

    from schedules.cuda import CudaSchedules
    from sparks_tvm import reference as ref
    from sparks_tvm.cost import RESNET18_BINARY_LAYERS
    from sparks_tvm.kernels import ConvGeometry, pack_binary_weights, pack_indices
    from sparks_tvm.models import random_codebook

    assert [tuple(s) for s in RESNET18_BINARY_LAYERS] == SHAPES, "SHAPES out of step with sparks_tvm.cost"
    # Kernels compiled here (nvcc) into the libraries: the GPU machine has only TVM's runtime.
    sys.path.insert(0, os.path.join(ROOT, "scripts", "gpu"))
    from cuda_prebuild import build_target

    target = build_target(args.target)
    sched = CudaSchedules(target)
    mma = CudaSchedules(target, binary_mma=True) if args.mma else None
    os.makedirs(args.dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    entries = []
    for cin, cout, side, stride in SHAPES:
        for k in args.k:
            codebook = random_codebook(rng, k).astype(np.int8)
            idx = rng.integers(0, k, size=(cout, cin))
            wname = f"w_c{cin}_o{cout}_k{k}.npz"
            np.savez_compressed(os.path.join(args.dir, wname), codes=ref.codes_to_bits(codebook),
                                idx=pack_indices(idx, k), wbits=pack_binary_weights(codebook[idx]),
                                kernels=codebook[idx].astype(np.int8))
            for batch in args.batch:
                geom = ConvGeometry(batch, cin, side, side, cout, stride=(stride, stride))
                name = _name(cin, cout, side, stride, batch, k)
                t0 = time.perf_counter()
                libs = {}
                kernels = [("sparks", sched.schedule_sparks_conv2d(geom, k, MODE))]
                if k == args.k[0]:  # the dense conv does not depend on K
                    kernels.append(("binary", sched.schedule_binary_conv2d(geom, MODE)))
                kernels += _mma_kernels(mma, geom, k, k == args.k[0])
                if batch in args.variants_batch:
                    default = sched.sparks_params(geom, k)
                    if args.batch64_knobs:
                        big = sched.sparks_params(dataclasses.replace(geom, batch=64), k)
                        if big != default:
                            kernels.append(("sparks@batch64_knobs", sched.schedule_sparks_conv2d(geom, k, MODE, big)))
                    for change in VARIANTS if args.variants is None else args.variants:
                        params = dataclasses.replace(default, **change)
                        if params == default:
                            continue
                        try:  # over a limit, or splits that do not divide the channel groups
                            params.validate(k)
                            func = sched.schedule_sparks_conv2d(geom, k, MODE, params)
                        except ValueError:
                            continue
                        tag = "sparks@" + ",".join(f"{key}={val}" for key, val in sorted(change.items()))
                        kernels.append((tag, func))
                for kind, func in kernels:
                    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
                    libs[kind] = f"{name}_{kind.replace('@', '_').replace(',', '_').replace('=', '')}.so"
                    lib.export_library(os.path.join(args.dir, libs[kind]))
                entries.append({"name": name, "cin": cin, "cout": cout, "side": side, "stride": stride,
                                "batch": batch, "k": k, "mode": MODE, "weights": wname, "libs": libs,
                                "in_shape": list(geom.in_shape), "out_shape": list(geom.out_shape)})
                print(f"built {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    with open(os.path.join(args.dir, "manifest.json"), "w") as fh:
        json.dump({"target": str(target), "seed": args.seed, "entries": entries}, fh, indent=1)


def _mma_kernels(mma, geom, k: int, dense: bool) -> list:
    """``[(kind, PrimFunc)]`` of the tensor-core kernels the target and the layer take (none
    without ``--mma``, or on a target older than sm_80)."""
    if mma is None or not mma.binary_mma:
        return []
    out = []
    if mma.mma_sparks_params(geom, k) is not None:
        out.append(("sparks@mma", mma.schedule_sparks_conv2d(geom, k, MODE)))
    if dense:
        out.append(("binary@mma", mma.schedule_binary_conv2d(geom, MODE)))
    return out


# ------------------------------------------------------------------------------------ run
def _torch_ms(fn, warmup, repeat, number):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        stop.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(stop) / number)
    runs.sort()
    return runs[len(runs) // 2]


def _tvm_ms(lib, dev, tensors, warmup, repeat, number):
    for _ in range(warmup):
        lib["main"](*tensors)
    dev.sync()
    timer = lib.time_evaluator("main", dev, number=number, repeat=repeat)
    res = sorted(timer(*tensors).results)
    return res[len(res) // 2] * 1e3


def run(args) -> int:
    import numpy as np
    import torch

    # The GPU machine's TVM is runtime-only (scripts/gpu/setup_device.sh): its CUDA backend
    # library is loaded explicitly, as scripts/gpu/run_cases.py does.
    sys.path.insert(0, os.path.join(ROOT, "scripts", "gpu"))
    from run_cases import load_runtime

    load_runtime("cuda")
    import tvm

    with open(os.path.join(args.dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    dev = tvm.cuda(0)
    if not dev.exist or not torch.cuda.is_available():
        raise SystemExit("run needs a CUDA GPU visible to both TVM and torch")
    torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(args.seed)
    rows, failures = [], 0
    for e in manifest["entries"]:
        row = {key: e[key] for key in ("name", "cin", "cout", "side", "stride", "batch", "k")}
        try:
            w = np.load(os.path.join(args.dir, e["weights"]))
            x = rng.standard_normal(e["in_shape"]).astype(np.float32)
            x[rng.random(x.shape) < 0.2] = 0.0
            xt = torch.from_numpy(x).cuda()
            kern = torch.from_numpy(w["kernels"].astype(np.float32)).cuda()
            wf = torch.randn(kern.shape, device="cuda")
            stride = e["stride"]
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            want_f = torch.nn.functional.conv2d(torch.sign(xt), kern, stride=stride, padding=1)
            row["ref_integral"] = bool(torch.equal(want_f, want_f.round()))
            want = want_f.round().to(torch.int32).cpu().numpy()
            xd = tvm.runtime.tensor(x, dev)
            shape = tuple(e["out_shape"])  # both kernels store NCHW
            for kind, so in e["libs"].items():
                lib = tvm.runtime.load_module(os.path.join(args.dir, so))
                if kind.startswith("sparks"):
                    args_ = [xd, tvm.runtime.tensor(w["codes"], dev), tvm.runtime.tensor(w["idx"], dev)]
                else:
                    args_ = [xd, tvm.runtime.tensor(w["wbits"], dev)]
                out = tvm.runtime.tensor(np.zeros(shape, np.int32), dev)
                lib["main"](*args_, out)
                got = out.numpy().reshape(e["out_shape"])
                row[f"{kind}_exact"] = bool(np.array_equal(got, want))
                row[f"{kind}_mismatches"] = int((got != want).sum())
                row[f"{kind}_ms"] = _tvm_ms(lib, dev, args_ + [out], args.warmup, args.repeat, args.number)
            row["cudnn_fp32_ms"] = _torch_ms(lambda: torch.nn.functional.conv2d(xt, wf, stride=stride, padding=1),
                                             args.warmup, args.repeat, args.number)
            torch.backends.cudnn.allow_tf32 = True
            row["cudnn_tf32_ms"] = _torch_ms(lambda: torch.nn.functional.conv2d(xt, wf, stride=stride, padding=1),
                                             args.warmup, args.repeat, args.number)
            torch.backends.cudnn.allow_tf32 = False
            row["speedup_vs_fp32"] = row["cudnn_fp32_ms"] / row["sparks_ms"]
            row["speedup_vs_tf32"] = row["cudnn_tf32_ms"] / row["sparks_ms"]
            if "binary_ms" in row:
                row["speedup_vs_binary"] = row["binary_ms"] / row["sparks_ms"]
            if not all(v for key, v in row.items() if key.endswith("_exact")):
                failures += 1
        except Exception as exc:  # noqa: BLE001 - one broken layer must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            failures += 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "tvm_target": manifest["target"], "python": platform.python_version(),
        "command": "python benchmarks/bench_cuda.py run " + " ".join(sys.argv[2:]),
        "build_command": "python benchmarks/bench_cuda.py build (see module docstring)",
        "timing": {"warmup": args.warmup, "repeat": args.repeat, "number": args.number, "stat": "median"},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda_layers.json"), "w") as fh:
        json.dump({"info": info, "rows": rows}, fh, indent=1)
    with open(os.path.join(args.out, "cuda_layers.md"), "w") as fh:
        fh.write(markdown(info, rows))
    print(markdown(info, rows))
    return 1 if failures else 0


def markdown(info, rows) -> str:
    lines = [f"# Sparks op on {info['card']} vs cuDNN float32", "",
             f"torch {info['torch']}, cuDNN {info['cudnn']}, TVM target `{info['tvm_target']}`; "
             f"median of {info['timing']['repeat']} x {info['timing']['number']} runs after "
             f"{info['timing']['warmup']} warm-up. Command: `{info['command']}`.", "",
             "| layer (cin-cout, side, stride) | batch | K | exact | Sparks ms | dense binary ms | "
             "cuDNN fp32 ms | cuDNN TF32 ms | vs fp32 | vs TF32 | vs dense binary |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cin']}-{r['cout']}, {r['side']}, s{r['stride']} | {r['batch']} | {r['k']} | "
                         f"ERROR: {r['error'][:80]} | | | | | | | |")
            continue
        exact = "yes" if all(v for key, v in r.items() if key.endswith("_exact")) else "NO"
        fmt = lambda key: f"{r[key]:.4f}" if key in r else "-"  # noqa: E731
        ratio = lambda key: f"{r[key]:.2f}x" if key in r else "-"  # noqa: E731
        lines.append(f"| {r['cin']}-{r['cout']}, {r['side']}, s{r['stride']} | {r['batch']} | {r['k']} | {exact} | "
                     f"{fmt('sparks_ms')} | {fmt('binary_ms')} | {fmt('cudnn_fp32_ms')} | {fmt('cudnn_tf32_ms')} | "
                     f"{ratio('speedup_vs_fp32')} | {ratio('speedup_vs_tf32')} | {ratio('speedup_vs_binary')} |")
    variants = [r for r in rows if any(key.startswith("sparks@") and key.endswith("_ms") for key in r)]
    if variants:
        lines += ["", "Schedule variants (GpuSparksParams changes from the default), Sparks ms:", "",
                  "| layer | batch | default | best variant | best ms | default / best |", "|---|---|---|---|---|---|"]
        for r in variants:
            times = {key[:-3]: val for key, val in r.items() if key.startswith("sparks") and key.endswith("_ms")}
            best = min(times, key=times.get)
            lines.append(f"| {r['cin']}-{r['cout']}, {r['side']}, s{r['stride']} | {r['batch']} | {times['sparks']:.4f} | "
                         f"{best} | {times[best]:.4f} | {times['sparks'] / times[best]:.2f}x |")
    lines += _mma_markdown(rows)
    return "\n".join(lines) + "\n"


def _mma_markdown(rows) -> list:
    """The tensor-core kernels beside the SIMT ones and cuDNN TF32 (rows built with ``--mma``)."""
    rows = [r for r in rows if "sparks@mma_ms" in r or "binary@mma_ms" in r]
    if not rows:
        return []
    lines = ["", "Binary tensor-core kernels (build --mma), ms:", "",
             "| layer | batch | K | exact | Sparks | Sparks MMA | dense | dense MMA | cuDNN TF32 | TF32 / Sparks MMA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda key: f"{r[key]:.4f}" if key in r else "-"  # noqa: E731
        exact = "yes" if all(r.get(f"{kind}_exact", True) for kind in ("sparks@mma", "binary@mma")) else "NO"
        ratio = f"{r['cudnn_tf32_ms'] / r['sparks@mma_ms']:.2f}x" if "sparks@mma_ms" in r else "-"
        lines.append(f"| {r['cin']}-{r['cout']}, {r['side']}, s{r['stride']} | {r['batch']} | {r['k']} | {exact} | "
                     f"{fmt('sparks_ms')} | {fmt('sparks@mma_ms')} | {fmt('binary_ms')} | {fmt('binary@mma_ms')} | "
                     f"{fmt('cudnn_tf32_ms')} | {ratio} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the kernels for a CUDA target (needs full TVM)")
    b.add_argument("--target", default="nvidia/nvidia-h100")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    b.add_argument("--k", type=int, nargs="+", default=[16])
    b.add_argument("--dir", default=os.path.join(ROOT, ".gpu", "bench"))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--variants-batch", type=int, nargs="*", default=[64],
                   help="batch sizes at which the schedule variants (VARIANTS) are built too")
    b.add_argument("--variants", type=json.loads, default=None, metavar="JSON",
                   help='a JSON list of knob changes to build instead of VARIANTS, e.g. \'[{"splits": 4}]\'')
    b.add_argument("--batch64-knobs", action="store_true",
                   help="at the --variants-batch sizes, also build the kernel with the knobs batch 64 gets "
                        "(variant sparks@batch64_knobs): the small-grid rule against no rule")
    b.add_argument("--mma", action="store_true",
                   help="also build the binary tensor-core kernels (sparks@mma, binary@mma; sm_80+ targets)")
    r = sub.add_parser("run", help="check and time the built kernels on the GPU (TVM runtime + torch)")
    r.add_argument("--dir", default=os.path.join(ROOT, ".gpu", "bench"))
    r.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--repeat", type=int, default=7)
    r.add_argument("--number", type=int, default=10)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
