"""Side-by-side benchmark: Sparks op vs dense binary vs float convs, per layer and whole model.

One harness, one run, every number measured in the same process tree on the same machine:

- every ResNet-18 binary 3x3 layer shape (224x224 input, batch 1) at each K: our Sparks op,
  our dense binary conv, TVM's float conv (our packed schedule; stock ``tvm.compile`` has no
  CPU conv schedule), onnxruntime float32 and torch float32 convs of the same shape;
- the whole example ResNet-18 (K=16): sparks_tvm vs onnxruntime and torch float32;

for each thread count (each in its own process: TVM's thread pool size is fixed at start).
Medians of repeated runs after warm-up. The Sparks output is checked equal to the dense
binary conv's on the same weights, and the model's output against onnxruntime's.

    python benchmarks/bench.py --target llvm --threads 1 2 --k 16 32 64 --out benchmarks/results
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparks_tvm.cost import RESNET18_BINARY_LAYERS as SHAPES  # noqa: E402


def _clock_hz() -> float:
    """Nominal core clock from /proc/cpuinfo (for ops per cycle); 1 GHz if unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return 1e9


CLOCK_HZ = _clock_hz()
#: A 512-bit XNOR+popcount per cycle (AVX-512 VPOPCNTQ on one pipe): the dense binary peak.
PEAK_BOPS_PER_CYCLE = 512


#: Idle time before each measurement. The frameworks' thread pools spin-wait after their
#: last run (torch's OpenMP, onnxruntime's intra-op pool, TVM's pool); on a 2-core machine a
#: measurement started right after another framework's would share the cores with its
#: spinning threads. (Separately, a whole process can land in a slow 2-thread mode:
#: benchmarks/bench_thread_modes.py.)
SETTLE_S = 0.5


def _settle() -> None:
    time.sleep(SETTLE_S)


def _median_ms(fn, warmup: int, repeat: int, number: int) -> float:
    import numpy as np

    _settle()
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number * 1e3)
    return float(np.median(runs))


def run_child(args) -> dict:
    """Measure everything at one thread count (TVM_NUM_THREADS is set by the parent)."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from onnx import TensorProto, helper, numpy_helper

    import schedules
    import sparks_tvm
    from sparks_tvm import bench, models
    from sparks_tvm.cost import dense_bops, sparks_bops
    from sparks_tvm.kernels import ConvGeometry, pack_binary_weights, pack_indices, pack_float_weights, sparks_out_shape
    from sparks_tvm.reference import codes_to_bits
    from sparks_tvm.target import resolve_target, target_json

    torch.set_num_threads(args.threads)
    target = resolve_target(args.target)
    if "num-cores" in target.attrs:
        # Compiled for the threads it runs on: schedules split work into num-cores parallel
        # tasks, and a 2-core split run on 1 thread recomputes stage 1 per output-channel
        # chunk for nothing (512->512 at 1 thread: 0.173 ms built for 2 cores, 0.147 for 1).
        target = tvm.target.Target(dict(target.export(), **{"num-cores": args.threads}))
    sched = schedules.for_target(target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)

    def tvm_ms(func, tensors):
        lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target).jit()
        lib["main"](*tensors)
        _settle()
        ev = lib.time_evaluator("main", dev, number=args.number, repeat=args.repeat, min_repeat_ms=30)
        return float(np.median(ev(*tensors).results) * 1e3), lib

    def ort_session(onnx_bytes):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])

    def ort_conv_ms(geom, x, w):
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=list(geom.stride))
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, "w")])
        sess = ort_session(helper.make_model(graph).SerializeToString())
        return _median_ms(lambda: sess.run(None, {"x": x}), 5, args.repeat, args.number)

    def torch_conv_ms(geom, x, w):
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        with torch.no_grad():
            return _median_ms(lambda: torch.nn.functional.conv2d(xt, wt, stride=geom.stride, padding=1), 5,
                              args.repeat, args.number)

    layers = []
    for cin, cout, side, stride in SHAPES:
        geom = ConvGeometry(1, cin, side, side, cout, stride=(stride, stride))
        x = rng.standard_normal(geom.in_shape).astype(np.float32)
        x[rng.random(x.shape) < 0.1] = 0.0
        w_float = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        xt = tvm.runtime.tensor(x, dev)
        fout = tvm.runtime.tensor(np.zeros(geom.out_shape, np.float32), dev)
        float_ms, _ = tvm_ms(sched.schedule_float_conv2d(geom),
                             [xt, tvm.runtime.tensor(pack_float_weights(w_float, sched.float_lanes), dev), fout])
        row_base = {"cin": cin, "cout": cout, "in_side": side, "stride": stride,
                    "tvm_float_ms": float_ms, "ort_fp32_ms": ort_conv_ms(geom, x, w_float),
                    "torch_fp32_ms": torch_conv_ms(geom, x, w_float)}
        dense_ms = None
        for k in args.k:
            codebook = models.random_codebook(rng, k).astype(np.int8)
            idx = rng.integers(0, k, size=(cout, cin))
            out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
            sparks_ms, _ = tvm_ms(sched.schedule_sparks_conv2d(geom, k, "sign"),
                                  [xt, tvm.runtime.tensor(codes_to_bits(codebook), dev),
                                   tvm.runtime.tensor(pack_indices(idx, k), dev), out])
            # Dense binary conv of the same binary weights: its time does not depend on K,
            # its output must equal the Sparks op's bit for bit.
            dout = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
            this_dense, _ = tvm_ms(sched.schedule_binary_conv2d(geom, "sign"),
                                   [xt, tvm.runtime.tensor(pack_binary_weights(codebook[idx]), dev), dout])
            dense_ms = this_dense if dense_ms is None else min(dense_ms, this_dense)
            exact = bool(np.array_equal(out.numpy().reshape(geom.out_shape), dout.numpy()))
            if not exact:
                raise SystemExit(f"Sparks op != dense binary conv at {cin}->{cout} {side} s{stride} K={k}")
            row = dict(row_base, k=k, sparks_ms=sparks_ms, dense_binary_ms=this_dense, exact_vs_dense=exact)
            # Binary ops per cycle at the nominal clock (one XNOR-popcount bit = one op).
            cycles = sparks_ms * 1e-3 * CLOCK_HZ
            pixels = geom.out_height * geom.out_width
            row["dense_bops"] = dense_bops(cin, cout, pixels)
            row["sparks_bops"] = sparks_bops(cin, cout, pixels, k)
            row["sparks_bops_per_cycle"] = row["sparks_bops"] / cycles
            row["dense_equiv_bops_per_cycle"] = row["dense_bops"] / cycles
            row["dense_kernel_bops_per_cycle"] = row["dense_bops"] / (this_dense * 1e-3 * CLOCK_HZ)
            for name in ("dense_binary", "tvm_float", "ort_fp32", "torch_fp32"):
                row[f"{name}_over_sparks"] = row[f"{name}_ms"] / sparks_ms
            layers.append(row)
            print(f"[t={args.threads}] K={k:2d} {cin:3d}->{cout:3d} {side:2d}x{side:<2d} s{stride}: sparks {sparks_ms:6.3f}  "
                  f"dense {this_dense:6.3f}  tvm-float {float_ms:6.3f}  ORT {row['ort_fp32_ms']:6.3f}  "
                  f"torch {row['torch_fp32_ms']:6.3f} ms", flush=True)

    model = None
    if not args.no_model:
        onnx_path = os.path.join(tempfile.gettempdir(), f"sparks_bench_resnet18_k{args.model_k}.onnx")
        net = models.sparks_resnet18(k=args.model_k)
        models.export_onnx(net, (1, 3, 224, 224), onnx_path)
        compiled = sparks_tvm.compile(onnx_path, target=target)
        x = models.example_input((1, 3, 224, 224), seed=1)
        _settle()
        ours = bench.benchmark_model(compiled, [x], warmup=5, repeat=max(20, args.repeat * 3))
        sess = ort_session(open(onnx_path, "rb").read())
        name = sess.get_inputs()[0].name
        ort_out = sess.run(None, {name: x})[0]
        ort_ms = _median_ms(lambda: sess.run(None, {name: x}), 3, max(20, args.repeat * 3), 1)
        net.eval()
        xt_torch = torch.from_numpy(x)
        with torch.no_grad():
            torch_ms = _median_ms(lambda: net(xt_torch), 3, max(20, args.repeat * 3), 1)
        y = compiled.run(x)[0]
        rel = float(np.abs(y - ort_out).max() / (np.abs(ort_out).max() or 1.0))
        model = {"k": args.model_k, "sparks_tvm_ms": ours["median_ms"], "ort_fp32_ms": ort_ms, "torch_fp32_ms": torch_ms,
                 "ort_over_sparks": ort_ms / ours["median_ms"], "torch_over_sparks": torch_ms / ours["median_ms"],
                 "max_rel_diff_vs_ort": rel, "same_top1": bool(np.argmax(y) == np.argmax(ort_out)),
                 "report": {"sparks": compiled.report.count("sparks"), "binary": compiled.report.count("binary"),
                            "float": compiled.report.count("float")},
                 "layers": bench.layer_times(compiled, [x], repeat=10)[:12]}
        print(f"[t={args.threads}] ResNet-18 K={args.model_k}: sparks_tvm {ours['median_ms']:.2f} ms  "
              f"ORT {ort_ms:.2f} ms ({ort_ms / ours['median_ms']:.2f}x)  torch {torch_ms:.2f} ms  rel diff {rel:.1e}",
              flush=True)
    return {"threads": args.threads, "target": target_json(target), "layers": layers, "model": model}


def write_outputs(results: list, meta: dict, out_dir: str, stem: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w") as fh:
        json.dump({"meta": meta, "runs": results}, fh, indent=1)
    lines = [f"# Sparks vs dense binary vs float, {meta['machine']}\n"]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    for res in results:
        lines.append(f"\n## {res['threads']} thread(s)\n")
        lines.append("| K | cin->cout | in | s | Sparks ms | dense bin ms | TVM float ms | ORT fp32 ms | torch fp32 ms "
                     "| dense/Sparks | ORT/Sparks | torch/Sparks | BOPs/cycle Sparks (dense-equiv.) | dense kernel |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["layers"]:
            lines.append(f"| {r['k']} | {r['cin']}->{r['cout']} | {r['in_side']} | {r['stride']} | {r['sparks_ms']:.3f} | "
                         f"{r['dense_binary_ms']:.3f} | {r['tvm_float_ms']:.3f} | {r['ort_fp32_ms']:.3f} | "
                         f"{r['torch_fp32_ms']:.3f} | {r['dense_binary_over_sparks']:.2f}x | "
                         f"{r['ort_fp32_over_sparks']:.2f}x | {r['torch_fp32_over_sparks']:.2f}x | "
                         f"{r['sparks_bops_per_cycle']:.0f} ({r['dense_equiv_bops_per_cycle']:.0f}) | "
                         f"{r['dense_kernel_bops_per_cycle']:.0f} |")
        m = res["model"]
        if m:
            lines.append(f"\nWhole example ResNet-18 (K={m['k']}, 224x224, batch 1): sparks_tvm **{m['sparks_tvm_ms']:.2f} ms**, "
                         f"onnxruntime fp32 {m['ort_fp32_ms']:.2f} ms (**{m['ort_over_sparks']:.2f}x**), torch fp32 "
                         f"{m['torch_fp32_ms']:.2f} ms ({m['torch_over_sparks']:.2f}x); output max rel. diff vs ORT "
                         f"{m['max_rel_diff_vs_ort']:.1e}, same top-1: {m['same_top1']}; convs {m['report']}.\n")
            lines.append("Where the time goes (per kernel, median per run):\n")
            lines.append("| kernel | calls | ms | share |\n|---|---|---|---|")
            for r in m["layers"]:
                lines.append(f"| {r['kernel']} | {r['calls']} | {r['median_ms']:.3f} | {100 * r['share']:.1f}% |")
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    written = [base + ".json", base + ".md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG chart")
        return written
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        ks = sorted({r["k"] for r in res["layers"]})
        labels = [f"{r['cin']}-{r['cout']}\n{r['in_side']} s{r['stride']}" for r in res["layers"] if r["k"] == ks[0]]
        width = 0.8 / (len(ks) + 1)
        for i, k in enumerate(ks):
            vals = [r["ort_fp32_over_sparks"] for r in res["layers"] if r["k"] == k]
            ax.bar([j + i * width for j in range(len(vals))], vals, width, label=f"ORT fp32 / Sparks K={k}")
        vals = [r["ort_fp32_over_sparks"] / r["dense_binary_over_sparks"] for r in res["layers"] if r["k"] == ks[0]]
        ax.bar([j + len(ks) * width for j in range(len(vals))], vals, width, label="ORT fp32 / dense binary", color="gray")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 for j in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("speed-up over onnxruntime fp32 (x)")
        title = f"{res['threads']} thread(s)"
        if res["model"]:
            title += f" - whole ResNet-18: {res['model']['ort_over_sparks']:.2f}x"
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    written.append(base + ".png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="llvm", help="a target this machine can run (default: this CPU)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--model-k", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=10)
    ap.add_argument("--no-model", action="store_true", help="layers only")
    ap.add_argument("--out", default=None, help="directory for bench_<target>.json/.md/.png")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.threads = args.threads[0]
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return 0
    results = []
    for threads in args.threads:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--threads", str(threads), "--target", args.target,
               "--k", *map(str, args.k), "--model-k", str(args.model_k), "--repeat", str(args.repeat),
               "--number", str(args.number)] + (["--no-model"] if args.no_model else [])
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        payload = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        for line in proc.stdout.splitlines():
            if not line.startswith("RESULT "):
                print(line)
        if proc.returncode != 0 or not payload:
            print(f"benchmark at {threads} thread(s) failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(payload[-1][len("RESULT "):]))
    import numpy
    import onnxruntime
    import torch
    import tvm

    meta = {"command": "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
            "target": results[0]["target"] + " (num-cores = the thread count of each run)",
            "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "schedules": "default sparks_tvm schedules (untuned)", "clock_mhz": round(CLOCK_HZ / 1e6),
            "peak_bops_per_cycle": f"{PEAK_BOPS_PER_CYCLE} (one 512-bit XNOR-popcount per cycle)", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        stem = "bench_" + ("host" if args.target in ("llvm", "host", "cpu") else str(args.target).replace("/", "_"))
        for path in write_outputs(results, meta, args.out, stem):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
