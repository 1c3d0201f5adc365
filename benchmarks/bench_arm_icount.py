"""aarch64 instruction counts of whole compiled layers and models on an emulated Raspberry Pi 4.

Timings under emulation mean nothing; the number of aarch64 instructions executed does, and
it is exact and repeatable. For each ResNet-18 binary layer shape (``sparks_tvm.cost``) this
compiles, with ``sparks_tvm.compile(..., target="arm_cpu")``, the ONNX graph a user exports
for one layer (``benchmarks/arm_layers.py``): ``Sign -> Conv 3x3 -> BatchNormalization`` as a
Sparks layer (K in ``--k``) and as a dense binary layer, and ``Conv -> BatchNormalization`` in
float; then the whole example Sparks ResNet-18 (K=16, 224x224). Each runs on the emulated Pi
(``scripts/emulated_pi``) through a Relax VirtualMachine, one call, batch 1, one thread; the
TCG plugin counts every instruction executed inside the compiled library (all the layer's
kernels: binarization, conv, epilogue; not the VM interpreter, libc or TVM's runtime), with a
per-kernel breakdown. Outputs are checked against onnxruntime.

The Larq Compute Engine column is derived, not measured here: LCE 0.16 built for aarch64
(-O3 -mcpu=cortex-a72, ruy), its optimized BGEMM layer at 56x56 64->64 (binarize and output
transform included) executes 4.51 M instructions counted the same way (../shared/STACK.md);
its cost follows the binary MACs, equal for every stride-1 ResNet-18 layer and half at
stride 2: 4.51 M (stride 1) and 2.26 M (stride 2) per layer.

    python benchmarks/bench_arm_icount.py --out benchmarks/results              # all, ~10 min
    python benchmarks/bench_arm_icount.py --shapes 0 --k 16 --no-model          # one layer, quick

The kernel-level helpers (:class:`Kernel`, :func:`count`) count single PrimFuncs; the tests use them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "emulated_pi"))
sys.path.insert(0, str(ROOT))

from sparks_tvm.cost import RESNET18_BINARY_LAYERS as SHAPES  # noqa: E402
# The counting core lives in the package (the ARM tuning runner uses it); re-exported here.
from sparks_tvm.tune.emulated_pi import GUEST, Kernel, count, export  # noqa: E402,F401


def arm_target():
    from sparks_tvm.target import resolve_target

    return resolve_target("arm_cpu")


def sparks_kernel(tag, geom, k, rng, target, mode="sign"):
    """The Sparks op with random codewords/indices and its numpy reference output."""
    import schedules
    from sparks_tvm import reference as ref
    from sparks_tvm.models import random_codebook

    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    codebook = random_codebook(rng, k).astype(np.int8)
    from sparks_tvm.kernels import pack_indices

    idx = rng.integers(0, k, size=(geom.out_channels, geom.in_channels))
    func = schedules.for_target(target).schedule_sparks_conv2d(geom, k, mode)
    expected = ref.sparks_conv2d_ref(ref.binarize(x, mode), codebook, idx, geom.stride, geom.padding)
    shape = out_shape_of("sparks", geom)
    return Kernel(tag, f"sparks K={k}", func, [x, ref.codes_to_bits(codebook), pack_indices(idx, k)], shape,
                  expected=expected.reshape(shape))


def out_shape_of(kind: str, geom) -> tuple:
    """Shape of a kernel's output buffer, whatever layout the kernels module chose.

    ``sparks_tvm.kernels.<kind>_out_shape(geom)`` when the kernel writes another layout
    than NCHW (e.g. flattened pixels ``(N, O, OH*OW)``); NCHW otherwise. The values are the
    same either way: the reference is reshaped to it.
    """
    from sparks_tvm import kernels

    fn = getattr(kernels, f"{kind}_out_shape", None)
    return tuple(int(d) for d in fn(geom)) if fn is not None else tuple(geom.out_shape)


def dense_kernel(tag, geom, rng, target, mode="sign"):
    """The dense binary conv with random +-1 weights and its numpy reference output."""
    import schedules
    from sparks_tvm import reference as ref
    from sparks_tvm.kernels import pack_binary_weights

    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    signs = np.where(rng.random((geom.out_channels, geom.in_channels, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    sched = schedules.for_target(target)
    func = sched.schedule_binary_conv2d(geom, mode)
    expected = ref.binary_conv2d_ref(ref.binarize(x, mode), signs, geom.stride, geom.padding)
    shape = out_shape_of("binary", geom)
    wbits = sched.binary_weights(geom, mode, signs) if hasattr(sched, "binary_weights") else pack_binary_weights(signs)
    return Kernel(tag, "dense binary", func, [x, wbits], shape,
                  expected=expected.reshape(shape))


def float_kernel(tag, geom, rng):
    """TVM's float32 NCHW conv (topi compute, no schedule: what tvm.compile gives untuned)."""
    from tvm import te, topi

    data = te.placeholder(geom.in_shape, "float32", name="data")
    weight = te.placeholder((geom.out_channels, geom.in_channels, 3, 3), "float32", name="weight")
    out = topi.nn.conv2d_nchw(data, weight, list(geom.stride), list(geom.padding), [1, 1])
    func = te.create_prim_func([data, weight, out])
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    w = rng.standard_normal((geom.out_channels, geom.in_channels, 3, 3)).astype(np.float32)
    return Kernel(tag, "TVM float32", func, [x, w], geom.out_shape, out_dtype="float32")


def packed_float_kernel(tag, geom, rng, target):
    """The project's own scheduled float conv (the float parts of a model), when it exists."""
    import schedules

    sched = schedules.for_target(target)
    if not hasattr(sched, "schedule_float_conv2d"):
        return None
    from sparks_tvm.kernels.float_conv2d import pack_float_weights

    func = sched.schedule_float_conv2d(geom)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    w = rng.standard_normal((geom.out_channels, geom.in_channels, 3, 3)).astype(np.float32)
    return Kernel(tag, "sparks_tvm float32", func, [x, pack_float_weights(w, sched.float_lanes)], geom.out_shape,
                  out_dtype="float32")


def code_version() -> str:
    """Commit of the measured code, and whether the kernels/schedules differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "sparks_tvm/kernels", "schedules")
    return head + (" + uncommitted kernel/schedule edits" if dirty else "")


def qemu_version() -> str:
    try:
        return subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


#: LCE's per-layer reference (derived, see the module docstring), by stride.
LCE_REFERENCE = {1: 4.51e6, 2: 2.255e6}


def _layer_models(shape_ids, ks, target_alias="arm_cpu"):
    import onnxruntime as ort

    import sparks_tvm
    from arm_layers import Model, layer_onnx

    models, layout = [], []
    rng = np.random.default_rng(1)
    for si in shape_ids:
        cin, cout, side, stride = SHAPES[si]
        x = rng.standard_normal((1, cin, side, side)).astype(np.float32)
        entry = {"shape": si, "cin": cin, "cout": cout, "in_side": side, "stride": stride, "sparks": {}}
        for kind, k in [("sparks", k) for k in ks] + [("binary", 16), ("float", None)]:
            data = layer_onnx(cin, cout, side, stride, kind, k or 16, seed=si)
            compiled = sparks_tvm.compile(data, target=target_alias, force_kind=None if kind == "float" else kind)
            if kind != "float":
                assert [r.kind for r in compiled.report] == [kind], compiled.report
            want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            tag = len(models)
            models.append(Model(tag, f"{kind} K={k}" if k else kind, compiled, [x], want, atol=1e-4))
            if kind == "sparks":
                entry["sparks"][k] = tag
            else:
                entry[kind] = tag
        layout.append(entry)
    return models, layout


def _resnet_model(tag):
    import onnxruntime as ort

    import sparks_tvm
    from arm_layers import Model
    from sparks_tvm import models as zoo

    shape = (1, 3, 224, 224)
    data = zoo.export_onnx(zoo.sparks_resnet18(k=16), shape)
    x = zoo.example_input(shape, seed=0)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    compiled = sparks_tvm.compile(data, target="arm_cpu")
    return Model(tag, "ResNet-18 K=16", compiled, [x], want, atol=1e-4)


def _md_table(rows, summary, model_row, meta) -> str:
    lines = ["# aarch64 instructions of whole compiled layers (emulated Raspberry Pi 4)", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()] + [""]
    lines += ["Millions of aarch64 instructions per call (exact; identical across runs). LCE: derived "
              "reference (4.51 M at stride 1, 2.26 M at stride 2; see the command's docstring).", "",
              "| K | cin->cout | in | stride | Sparks layer M | its conv kernel M | vs LCE | dense binary M | "
              "dense vs LCE | float M | dense/Sparks | float/Sparks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['cin']}->{r['cout']} | {r['in_side']} | {r['stride']} | "
                     f"{r['sparks'] / 1e6:.2f} | {r['sparks_conv'] / 1e6:.2f} | {r['sparks_over_lce']:.2f}x | "
                     f"{r['dense'] / 1e6:.2f} | {r['dense_over_lce']:.2f}x | {r['float'] / 1e6:.2f} | "
                     f"{r['dense'] / r['sparks']:.2f}x | {r['float'] / r['sparks']:.1f}x |")
    lines += ["", "| K | all layers: Sparks M | LCE M | Sparks vs LCE | worst layer vs LCE | best layer vs LCE | "
              "dense M | dense vs LCE |", "|---|---|---|---|---|---|---|---|"]
    for k, sm in summary.items():
        lines.append(f"| {k} | {sm['sparks'] / 1e6:.1f} | {sm['lce'] / 1e6:.1f} | {sm['sparks_over_lce']:.2f}x | "
                     f"{sm['worst_over_lce']:.2f}x | {sm['best_over_lce']:.2f}x | {sm['dense'] / 1e6:.1f} | "
                     f"{sm['dense_over_lce']:.2f}x |")
    if model_row:
        lines += ["", f"## Whole example ResNet-18 (K=16, 224x224): {model_row['total'] / 1e6:.1f} M instructions",
                  "", "| kernel | M | share |", "|---|---|---|"]
        for name, c in model_row["kernels"][:25]:
            lines.append(f"| `{name}` | {c / 1e6:.2f} | {100 * c / model_row['total']:.1f}% |")
    return "\n".join(lines) + "\n"


def _chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k16 = [r for r in rows if r["k"] == 16] or rows
    labels = [f"{r['cin']}->{r['cout']}\n{r['in_side']} s{r['stride']}" for r in k16]
    xs = np.arange(len(k16))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (key, name) in enumerate([("sparks", f"sparks_tvm Sparks K={k16[0]['k']}"), ("lce", "LCE (derived)"),
                                     ("dense", "sparks_tvm dense binary")]):
        ax.bar(xs + (i - 1) * 0.27, [r[key] / 1e6 for r in k16], 0.27, label=name)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("M aarch64 instructions per layer")
    ax.set_title("Whole binary layers on an emulated Raspberry Pi 4 (one call, batch 1, 1 thread)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--shapes", type=int, nargs="+", default=None, help="indices into SHAPES (default all)")
    ap.add_argument("--repeat", type=int, default=1, help="count N times; fail unless all runs agree")
    ap.add_argument("--no-model", action="store_true", help="skip the whole ResNet-18")
    ap.add_argument("--out", default=None, help="directory for arm_icount.json/.md/.png")
    args = ap.parse_args(argv)

    import tvm

    from arm_layers import count_models
    from sparks_tvm.target import target_json

    shape_ids = args.shapes if args.shapes is not None else list(range(len(SHAPES)))
    t0 = time.time()
    models, layout = _layer_models(shape_ids, args.k)
    if not args.no_model:
        models.append(_resnet_model(len(models)))
    runs = []
    for r in range(args.repeat):
        runs.append(count_models(models))
        print(f"run {r + 1}/{args.repeat}: counted {len(models)} models ({time.time() - t0:.0f} s)", flush=True)
    if any(run != runs[0] for run in runs):
        print("counts differ between runs:", runs, file=sys.stderr)
        return 1
    counts = runs[0]

    def conv_part(tag):
        per = counts[tag][1]
        return max(v for name, v in per.items() if "conv2d" in name) if per else 0

    rows = []
    for e in layout:
        lce = LCE_REFERENCE[e["stride"]]
        dense, flt = counts[e["binary"]][0], counts[e["float"]][0]
        for k, tag in e["sparks"].items():
            sp = counts[tag][0]
            rows.append({"k": k, "cin": e["cin"], "cout": e["cout"], "in_side": e["in_side"], "stride": e["stride"],
                         "sparks": sp, "sparks_conv": conv_part(tag), "sparks_kernels": counts[tag][1],
                         "dense": dense, "dense_kernels": counts[e["binary"]][1], "float": flt, "lce": lce,
                         "sparks_over_lce": sp / lce, "dense_over_lce": dense / lce})
            print(f"K={k:3d} {e['cin']:4d}->{e['cout']:4d} {e['in_side']:3d} s{e['stride']}: sparks {sp / 1e6:6.2f} M "
                  f"({sp / lce:.2f}x LCE)  dense {dense / 1e6:6.2f} M ({dense / lce:.2f}x)  float {flt / 1e6:7.2f} M",
                  flush=True)
    summary = {}
    for k in args.k:
        ks = [r for r in rows if r["k"] == k]
        sp, lce, dn = (sum(r[key] for r in ks) for key in ("sparks", "lce", "dense"))
        summary[str(k)] = {"sparks": sp, "lce": lce, "dense": dn, "sparks_over_lce": sp / lce,
                           "dense_over_lce": dn / lce,
                           "worst_over_lce": max(r["sparks_over_lce"] for r in ks),
                           "best_over_lce": min(r["sparks_over_lce"] for r in ks),
                           "sparks_below_dense_every_shape": all(r["sparks"] < r["dense"] for r in ks)}
    model_row = None
    if not args.no_model:
        total, per = counts[models[-1].tag]
        model_row = {"total": total, "kernels": sorted(per.items(), key=lambda kv: -kv[1])}
        print(f"ResNet-18 K=16: {total / 1e6:.1f} M instructions", flush=True)
    cmd = "python benchmarks/bench_arm_icount.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "target": target_json(arm_target()), "device": "qemu-user aarch64 -cpu cortex-a72",
            "qemu": qemu_version(), "counter": "scripts/emulated_pi/icount.c: instructions executed inside the "
            "compiled library's code, one call after one warm-up, batch 1, TVM_NUM_THREADS=1",
            "repeat_runs_identical": args.repeat, "tvm": tvm.__version__, "code": code_version(),
            "layer": "ONNX Sign -> Conv 3x3 pad 1 -> BatchNormalization (float: Conv -> BatchNormalization), "
            "compiled by sparks_tvm.compile(target='arm_cpu'), outputs checked against onnxruntime"}
    print(json.dumps({"summary": summary}, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, "arm_icount")
        with open(base + ".json", "w") as fh:
            json.dump({"meta": meta, "summary": summary, "rows": rows, "resnet18": model_row}, fh, indent=1)
        with open(base + ".md", "w") as fh:
            fh.write(_md_table(rows, summary, model_row, meta))
        _chart(rows, base + ".png")
        print(f"wrote {base}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
