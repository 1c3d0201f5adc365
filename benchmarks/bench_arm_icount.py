"""aarch64 instruction counts of the binary kernels on an emulated Raspberry Pi 4 (qemu + TCG plugin).

Timings under emulation mean nothing; the number of aarch64 instructions a kernel executes
does, and it is exact and repeatable. For each ResNet-18 binary layer shape (the same seven
shapes as ``bench.py``) and K in {16, 32, 64}, this counts, for one batch-1 call:

- the Sparks op (our kernel, ARM schedule, cross-compiled for ``arm_cpu``),
- the dense binary conv (our XOR-popcount kernel, same schedule family),
- TVM's float32 conv (``topi.nn.conv2d_nchw`` as ``tvm.compile`` builds it for the same target,
  untuned: what a float layer of a Relax model becomes without tuning records): the goal's
  float baseline,
- and, as an extra column, the project's own scheduled float conv (what the float parts of a
  compiled model use), a much stronger float baseline.

Each kernel is a separate cross-linked ``.so``; on the device (``scripts/emulated_pi/icount_guest.py``,
one thread) the plugin counts only instructions executed inside that library's code segment,
between a reset and a dump around the call (libc/TVM runtime code outside the library is not
counted; the kernels call none in their loops). Outputs of the binary kernels are checked
against the numpy references.

    python benchmarks/bench_arm_icount.py --out benchmarks/results          # all shapes, K=16,32,64
    python benchmarks/bench_arm_icount.py --shapes 0 6 --k 16 --repeat 2    # quick, checks determinism
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "emulated_pi"))
sys.path.insert(0, str(ROOT))

from sparks_tvm.cost import RESNET18_BINARY_LAYERS as SHAPES  # noqa: E402
GUEST = ROOT / "scripts" / "emulated_pi" / "icount_guest.py"


@dataclass
class Kernel:
    """One kernel to count: a PrimFunc, its input arrays and its output's shape/dtype."""

    tag: int
    label: str
    func: object
    args: list
    out_shape: tuple
    out_dtype: str = "int32"
    calls: int = 1
    expected: np.ndarray | None = field(default=None, repr=False)


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
    func = schedules.for_target(target).schedule_binary_conv2d(geom, mode)
    expected = ref.binary_conv2d_ref(ref.binarize(x, mode), signs, geom.stride, geom.padding)
    shape = out_shape_of("binary", geom)
    return Kernel(tag, "dense binary", func, [x, pack_binary_weights(signs)], shape,
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


def export(func, target, path):
    """Compile a PrimFunc for the ARM target and cross-link it into a shared library."""
    import tvm
    from tvm.support import cc

    ex = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
    ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))


def count(kernels: list, target, workdir=None, timeout: float = 1800.0) -> dict:
    """Count instructions of each kernel on the emulated Pi; returns ``{tag: count}``.

    Also checks each kernel's output against ``Kernel.expected`` when given (exact).
    """
    import pi

    pi.setup()
    tmp = tempfile.TemporaryDirectory(prefix="icount_") if workdir is None else None
    base = Path(workdir or tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    try:
        manifest = {"kernels": []}
        for kern in kernels:
            lib = f"k{kern.tag}.so"
            export(kern.func, target, base / lib)
            names = []
            for i, arr in enumerate(kern.args):
                names.append(f"a{kern.tag}_{i}.npy")
                np.save(base / names[-1], arr)
            manifest["kernels"].append({"tag": kern.tag, "library": lib, "function": "main", "args": names,
                                        "output": {"shape": list(kern.out_shape), "dtype": kern.out_dtype},
                                        "calls": kern.calls, "warmup": 1})
        (base / "manifest.json").write_text(json.dumps(manifest, indent=1))
        counts_file = base / "counts.txt"
        counts_file.unlink(missing_ok=True)
        env = {**os.environ, "QEMU_PLUGIN": f"{pi.plugin_path()},out={counts_file}", "TVM_NUM_THREADS": "1"}
        proc = subprocess.run([str(pi.python_launcher()), str(GUEST), str(base / "manifest.json")], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"counting on the emulated Pi failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        counts = {}
        for line in counts_file.read_text().split("\n"):
            if line.strip():
                tag, value = line.split()
                counts[int(tag)] = int(value)
        missing = [k.tag for k in kernels if k.tag not in counts]
        if missing:
            raise RuntimeError(f"no count for kernel tags {missing}")
        for kern in kernels:
            if kern.expected is not None:
                got = np.load(base / f"out_{kern.tag}.npy")
                if not np.array_equal(got, kern.expected):
                    bad = int((got != kern.expected).sum())
                    raise AssertionError(f"{kern.label} (tag {kern.tag}): {bad} outputs differ from the reference")
        return counts
    finally:
        if tmp is not None:
            tmp.cleanup()


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--shapes", type=int, nargs="+", default=None, help="indices into SHAPES (default all)")
    ap.add_argument("--repeat", type=int, default=1, help="count N times; fail unless all runs agree")
    ap.add_argument("--out", default=None, help="directory for arm_icount.json/.md")
    args = ap.parse_args(argv)

    import tvm

    from sparks_tvm.kernels import ConvGeometry
    from sparks_tvm.target import target_json

    target = arm_target()
    rng = np.random.default_rng(0)
    shape_ids = args.shapes if args.shapes is not None else list(range(len(SHAPES)))
    kernels, layout = [], []
    t0 = time.time()
    for si in shape_ids:
        cin, cout, side, stride = SHAPES[si]
        geom = ConvGeometry(1, cin, side, side, cout, stride=(stride, stride))
        entry = {"shape": si, "cin": cin, "cout": cout, "in_side": side, "stride": stride,
                 "out_side": geom.out_height, "dense": len(kernels), "float": len(kernels) + 1, "sparks": {}}
        kernels.append(dense_kernel(len(kernels), geom, rng, target))
        kernels.append(float_kernel(len(kernels), geom, rng))
        packed = packed_float_kernel(len(kernels), geom, rng, target)
        if packed is not None:
            entry["packed_float"] = packed.tag
            kernels.append(packed)
        for k in args.k:
            entry["sparks"][k] = len(kernels)
            kernels.append(sparks_kernel(len(kernels), geom, k, rng, target))
        layout.append(entry)
    runs = []
    for r in range(args.repeat):
        runs.append(count(kernels, target))
        print(f"run {r + 1}/{args.repeat}: counted {len(kernels)} kernels ({time.time() - t0:.0f} s)", flush=True)
    deterministic = all(run == runs[0] for run in runs)
    if not deterministic:
        print("counts differ between runs:", runs, file=sys.stderr)
        return 1
    counts = runs[0]

    rows = []
    for entry in layout:
        dense, flt = counts[entry["dense"]], counts[entry["float"]]
        for k, tag in entry["sparks"].items():
            sp = counts[tag]
            rows.append({"k": k, "cin": entry["cin"], "cout": entry["cout"], "in_side": entry["in_side"],
                         "stride": entry["stride"], "out_side": entry["out_side"], "sparks_insns": sp,
                         "dense_binary_insns": dense, "tvm_float_insns": flt, "dense_over_sparks": dense / sp,
                         "float_over_sparks": flt / sp})
            if "packed_float" in entry:
                pf = counts[entry["packed_float"]]
                rows[-1].update({"packed_float_insns": pf, "packed_float_over_sparks": pf / sp})
            print(f"K={k:3d} {entry['cin']:4d}->{entry['cout']:4d} {entry['in_side']:3d} s{entry['stride']}: "
                  f"sparks {sp / 1e6:9.2f} M  dense {dense / 1e6:9.2f} M  float {flt / 1e6:10.2f} M  "
                  f"dense/sparks {dense / sp:5.2f}x  float/sparks {flt / sp:6.1f}x", flush=True)

    def total(key, k):
        return sum(r[key] for r in rows if r["k"] == k)

    summary = {}
    for k in args.k:
        sp, dn, fl = total("sparks_insns", k), total("dense_binary_insns", k), total("tvm_float_insns", k)
        ks = [r for r in rows if r["k"] == k]
        summary[str(k)] = {"sparks_insns": sp, "dense_binary_insns": dn, "tvm_float_insns": fl,
                           "dense_over_sparks_total": dn / sp, "float_over_sparks_total": fl / sp,
                           "dense_over_sparks_min": min(r["dense_over_sparks"] for r in ks),
                           "float_over_sparks_min": min(r["float_over_sparks"] for r in ks)}
    goal = summary.get("16")
    goal_met = None if goal is None else {
        "sparks_2x_fewer_than_dense_every_shape": goal["dense_over_sparks_min"] >= 2.0,
        "sparks_10x_fewer_than_float_every_shape": goal["float_over_sparks_min"] >= 10.0}
    cmd = "python benchmarks/bench_arm_icount.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "target": target_json(target), "device": "qemu-user aarch64 -cpu cortex-a72",
            "qemu": qemu_version(), "counter": "scripts/emulated_pi/icount.c (TCG plugin, instructions executed "
            "inside the kernel library's code segment, one call, batch 1, TVM_NUM_THREADS=1)",
            "repeat_runs_identical": args.repeat if deterministic else 0, "tvm": tvm.__version__,
            "code": code_version(),
            "host": platform.machine(), "schedules": "schedules/arm.py over schedules/host.py (default, untuned)",
            "float_baseline": "topi.nn.conv2d_nchw compiled by tvm.compile for the same target, untuned",
            "sparks_tvm_float": "the project's packed float conv (schedule_float_conv2d: the model's float "
            "parts), an extra column, not the goal's baseline"}
    print(json.dumps({"summary": summary, "goal_k16": goal_met}, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, "arm_icount")
        with open(base + ".json", "w") as fh:
            json.dump({"meta": meta, "summary": summary, "goal_k16": goal_met, "rows": rows}, fh, indent=1)
        with open(base + ".md", "w") as fh:
            fh.write("# aarch64 instruction counts, ResNet-18 binary layers (emulated Raspberry Pi 4)\n\n")
            fh.write("".join(f"- {k}: `{v}`\n" for k, v in meta.items()) + "\n")
            fh.write("Counts are millions of aarch64 instructions per call (exact; identical across runs).\n\n")
            fh.write("| K | cin->cout | in | stride | Sparks M | dense binary M | TVM float M | dense/Sparks | "
                     "float/Sparks | sparks_tvm float M | its float/Sparks |\n")
            fh.write("|---|---|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                pf = (f"{r['packed_float_insns'] / 1e6:.2f} | {r['packed_float_over_sparks']:.1f}x"
                      if "packed_float_insns" in r else "- | -")
                fh.write(f"| {r['k']} | {r['cin']}->{r['cout']} | {r['in_side']} | {r['stride']} | "
                         f"{r['sparks_insns'] / 1e6:.2f} | {r['dense_binary_insns'] / 1e6:.2f} | "
                         f"{r['tvm_float_insns'] / 1e6:.2f} | {r['dense_over_sparks']:.2f}x | "
                         f"{r['float_over_sparks']:.1f}x | {pf} |\n")
            fh.write("\n| K | all 7 layers: Sparks M | dense M | float M | dense/Sparks | float/Sparks | "
                     "worst layer dense/Sparks | worst layer float/Sparks |\n|---|---|---|---|---|---|---|---|\n")
            for k, s in summary.items():
                fh.write(f"| {k} | {s['sparks_insns'] / 1e6:.1f} | {s['dense_binary_insns'] / 1e6:.1f} | "
                         f"{s['tvm_float_insns'] / 1e6:.1f} | {s['dense_over_sparks_total']:.2f}x | "
                         f"{s['float_over_sparks_total']:.1f}x | {s['dense_over_sparks_min']:.2f}x | "
                         f"{s['float_over_sparks_min']:.1f}x |\n")
            if goal_met is not None:
                fh.write(f"\nGoal at K=16 (>= 2x fewer than dense binary, >= 10x fewer than float, every shape): "
                         f"{goal_met}\n")
        print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
