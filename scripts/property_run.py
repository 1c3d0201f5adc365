"""Exactness at scale: random binary conv layers, compiled end to end, compared bit for bit.

Each configuration is one binarized convolution with random geometry (batch, channels not
multiples of 32, odd sizes, 1x1/3x3/5x5/3x1 kernels, stride 1-3, asymmetric padding),
a random binarizer idiom (Sign, Where >= / >, Cast*2-1, STE residue, sign(sign(x)+c),
QONNX BipolarQuant, Where(x >= t) with a per-channel threshold, Sign times a scale,
an integer Where cast to float), random Sparks weights (K codewords, per-channel +-alpha with sign
flips) and inputs with exact zeros and -0.0. Several configurations share one ONNX model
(independent branches) so that one ``sparks_tvm.compile`` checks many; the kernel choice
(cost model, forced Sparks, forced dense binary) is drawn per model. Every output must
equal ``int_conv(binarize(x), sign(W)) * alpha`` computed in numpy, exactly.

    python scripts/property_run.py --configs 1000 --seed 0 --out benchmarks/results/property_run

writes ``property_run.json`` (every configuration and its outcome) and ``property_run.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

#: Binarizer idioms: name -> (zero rule, builder of ONNX nodes mapping ``x`` to ``b``).
FORMS = ("sign", "where_ge", "where_gt", "cast_affine", "ste_detach", "sign_sign_c", "qonnx_bipolar",
         "where_threshold", "scaled_sign", "int_where_cast")
FORM_MODE = {"sign": "sign", "where_ge": "ge", "where_gt": "gt", "cast_affine": "ge", "ste_detach": "sign",
             "sign_sign_c": "ge", "qonnx_bipolar": "ge", "where_threshold": "ge", "scaled_sign": "sign",
             "int_where_cast": "ge"}
#: The activation scale of ``scaled_sign`` (dyadic: the folded alpha stays exact).
ACT_SCALE = 0.5
KERNELS = ((3, 3),) * 6 + ((1, 1), (5, 5), (3, 1), (2, 2))


def random_config(rng: np.random.Generator, i: int) -> dict:
    """One layer: geometry, idiom, K; resampled until the output is non-empty."""
    while True:
        kh, kw = KERNELS[rng.integers(len(KERNELS))]
        cfg = {
            "id": i,
            "batch": int(rng.integers(1, 4)),
            "cin": int(rng.choice([1, 2, 3, 5, 8, 13, 31, 32, 33, 64, 67, 100])),
            "cout": int(rng.choice([1, 2, 4, 7, 16, 31, 33, 64, 70])),
            "h": int(rng.integers(1, 18)),
            "w": int(rng.integers(1, 18)),
            "kernel": [int(kh), int(kw)],
            "stride": [int(rng.integers(1, 4)), int(rng.integers(1, 4))],
            "pads": [int(p) for p in rng.integers(0, 3, size=4)],  # top, left, bottom, right
            "form": str(rng.choice(FORMS)),
            "k": int(rng.choice([1, 2, 3, 4, 8, 16, 32, 64])),
            "zero_frac": float(rng.choice([0.0, 0.2, 0.5])),
        }
        oh = (cfg["h"] + cfg["pads"][0] + cfg["pads"][2] - kh) // cfg["stride"][0] + 1
        ow = (cfg["w"] + cfg["pads"][1] + cfg["pads"][3] - kw) // cfg["stride"][1] + 1
        if oh >= 1 and ow >= 1 and cfg["pads"][0] < kh and cfg["pads"][2] < kh and cfg["pads"][1] < kw and cfg["pads"][3] < kw:
            cfg["out_hw"] = [oh, ow]
            return cfg


def layer_weights(rng, cfg):
    """``(W float32, signs int8, alpha float32)`` with W = alpha_o * signs (K codewords if 3x3)."""
    from sparks_tvm.models import random_codebook

    kh, kw = cfg["kernel"]
    o, c = cfg["cout"], cfg["cin"]
    if (kh, kw) == (3, 3):
        k = min(cfg["k"], 256)
        codebook = random_codebook(rng, k)
        idx = rng.integers(0, k, size=(o, c))
        signs = codebook[idx]
    else:
        signs = np.where(rng.random((o, c, kh, kw)) < 0.5, -1.0, 1.0)
    # Dyadic alphas keep int * alpha exact in float32; a negative alpha is a folded BN flip.
    alpha = rng.choice([0.125, 0.25, 0.5, 1.0, 2.0], size=o) * np.where(rng.random(o) < 0.25, -1.0, 1.0)
    w = (signs * alpha.reshape(-1, 1, 1, 1)).astype(np.float32)
    return w, signs.astype(np.int8), alpha.astype(np.float32)


def binarizer_nodes(form: str, x: str, b: str, p: str):
    """ONNX nodes computing ``b`` from ``x`` with the idiom ``form``; names prefixed ``p``."""
    mk = helper.make_node
    if form == "sign":
        return [mk("Sign", [x], [b])], []
    if form in ("where_ge", "where_gt"):
        cmp = "GreaterOrEqual" if form == "where_ge" else "Greater"
        return [mk(cmp, [x, "zero"], [p + "m"]), mk("Where", [p + "m", "one", "mone"], [b])], []
    if form == "cast_affine":
        return [mk("GreaterOrEqual", [x, "zero"], [p + "m"]), mk("Cast", [p + "m"], [p + "f"], to=TensorProto.FLOAT),
                mk("Mul", [p + "f", "two"], [p + "d"]), mk("Sub", [p + "d", "one"], [b])], []
    if form == "ste_detach":
        return [mk("Sign", [x], [p + "s"]), mk("Sub", [p + "s", x], [p + "r"]), mk("Add", [x, p + "r"], [b])], []
    if form == "sign_sign_c":
        return [mk("Sign", [x], [p + "s"]), mk("Add", [p + "s", "half"], [p + "t"]), mk("Sign", [p + "t"], [b])], []
    if form == "qonnx_bipolar":
        return [mk("BipolarQuant", [x, "one"], [b], domain="qonnx.custom_op.general")], ["qonnx"]
    if form == "where_threshold":  # per-input-channel threshold p + "t", an initializer
        return [mk("GreaterOrEqual", [x, p + "t"], [p + "m"]), mk("Where", [p + "m", "one", "mone"], [b])], []
    if form == "scaled_sign":
        return [mk("Sign", [x], [p + "s"]), mk("Mul", [p + "s", "act_scale"], [b])], []
    if form == "int_where_cast":
        return [mk("GreaterOrEqual", [x, "zero"], [p + "m"]), mk("Where", [p + "m", "one_i", "mone_i"], [p + "i"]),
                mk("Cast", [p + "i"], [b], to=TensorProto.FLOAT)], []
    raise ValueError(form)


def threshold(cfg):
    """The per-input-channel threshold of ``where_threshold`` (multiples of 0.25: ties occur)."""
    return ((np.arange(cfg["cin"]) % 5 - 2) * 0.25).astype(np.float32).reshape(1, -1, 1, 1)


def build_model(rng, cfgs):
    """One ONNX model with an independent binarize -> conv branch per configuration."""
    nodes, inits, inputs, outputs, refs, domains = [], [], [], [], [], set()
    for v, n in (("zero", 0.0), ("one", 1.0), ("mone", -1.0), ("two", 2.0), ("half", 0.5), ("act_scale", ACT_SCALE)):
        inits.append(numpy_helper.from_array(np.array(n, np.float32), v))
    inits += [numpy_helper.from_array(np.array(1, np.int64), "one_i"),
              numpy_helper.from_array(np.array(-1, np.int64), "mone_i")]
    for j, cfg in enumerate(cfgs):
        p = f"l{j}_"
        w, signs, alpha = layer_weights(rng, cfg)
        bn, extra = binarizer_nodes(cfg["form"], f"x{j}", p + "b", p)
        domains.update(extra)
        nodes += bn
        nodes.append(helper.make_node("Conv", [p + "b", p + "w"], [f"y{j}"], name=f"conv{j}", pads=cfg["pads"],
                                      strides=cfg["stride"]))
        inits.append(numpy_helper.from_array(w, p + "w"))
        if cfg["form"] == "where_threshold":
            inits.append(numpy_helper.from_array(threshold(cfg), p + "t"))
        shape = [cfg["batch"], cfg["cin"], cfg["h"], cfg["w"]]
        inputs.append(helper.make_tensor_value_info(f"x{j}", TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT,
                                                     [cfg["batch"], cfg["cout"]] + cfg["out_hw"]))
        refs.append((signs, alpha))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid("qonnx.custom_op.general", 1) for _ in domains]
    model = helper.make_model(helper.make_graph(nodes, "property", inputs, outputs, inits), opset_imports=opsets)
    return model, refs


def reference(cfg, x, signs, alpha):
    from sparks_tvm.reference import binarize, binary_conv2d_ref

    src = x - threshold(cfg) if cfg["form"] == "where_threshold" else x
    ints = binary_conv2d_ref(binarize(src, FORM_MODE[cfg["form"]]), signs, tuple(cfg["stride"]), tuple(cfg["pads"]))
    if cfg["form"] == "scaled_sign":
        alpha = (alpha * np.float32(ACT_SCALE)).astype(np.float32)
    return ints.astype(np.float32) * alpha.reshape(1, -1, 1, 1)


def run(configs: int, per_model: int, seed: int, log=print) -> dict:
    """Compile and check ``configs`` layers; return the summary with every record."""
    import sparks_tvm

    rng = np.random.default_rng(seed)
    records, t0 = [], time.time()
    cfg_id = 0
    model_i = 0
    while cfg_id < configs:
        cfgs = [random_config(rng, cfg_id + j) for j in range(min(per_model, configs - cfg_id))]
        cfg_id += len(cfgs)
        force = [None, None, "sparks", "binary"][model_i % 4]
        model, refs = build_model(rng, cfgs)
        xs = []
        for cfg in cfgs:
            shape = (cfg["batch"], cfg["cin"], cfg["h"], cfg["w"])
            x = (rng.integers(-8, 9, size=shape) * 0.25).astype(np.float32)
            x[rng.random(shape) < cfg["zero_frac"]] = 0.0
            x[rng.random(shape) < 0.05] = -0.0
            xs.append(x)
        try:
            compiled = sparks_tvm.compile(model, force_kind=force)
            outs = compiled.run(*xs)
            kinds = [r.kind for r in compiled.report]
            ks = [r.codewords for r in compiled.report]
            error = None
        except Exception as err:  # recorded as a failure of every layer of the model
            outs, kinds, ks, error = [None] * len(cfgs), ["?"] * len(cfgs), [None] * len(cfgs), repr(err)[:300]
        for cfg, x, (signs, alpha), out, kind, k in zip(cfgs, xs, refs, outs, kinds, ks):
            rec = dict(cfg, model=model_i, force=force, kind=kind, codewords=k)
            if error is not None:
                rec.update(ok=False, error=error)
            else:
                ref = reference(cfg, x, signs, alpha)
                ok = out.shape == ref.shape and np.array_equal(out, ref)
                rec.update(ok=bool(ok))
                if not ok:
                    rec["max_abs_diff"] = float(np.abs(out - ref).max()) if out.shape == ref.shape else None
            records.append(rec)
        model_i += 1
        if model_i % 10 == 0:
            bad = sum(not r["ok"] for r in records)
            log(f"{len(records)}/{configs} layers, {bad} failures, {time.time() - t0:.0f} s")
    summary = {
        "configs": len(records),
        "models": model_i,
        "failures": sum(not r["ok"] for r in records),
        "by_kind": {k: sum(r["kind"] == k for r in records) for k in ("sparks", "binary", "float", "?")},
        "by_form": {f: sum(r["form"] == f for r in records) for f in FORMS},
        "seconds": round(time.time() - t0, 1),
        "seed": seed,
        "per_model": per_model,
        "records": records,
    }
    return summary


def _commit() -> str:
    """HEAD, plus ``+dirty`` if the kernels, schedules or passes have uncommitted changes."""
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparks_tvm/kernels", "schedules", "relay_passes",
                                "sparks_tvm/compiler.py", "sparks_tvm/frontend.py"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=1000)
    ap.add_argument("--per-model", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    summary = run(args.configs, args.per_model, args.seed)
    fails = [r for r in summary["records"] if not r["ok"]]
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
    for r in fails[:20]:
        print("FAIL", json.dumps(r))
    if args.out:
        cmd = "python scripts/property_run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        summary["command"] = cmd
        summary["machine"] = " ".join(v for v in (platform.machine(), platform.processor(), f"{os.cpu_count()} cpus") if v)
        summary["commit"] = _commit()
        with open(args.out + ".json", "w") as fh:
            json.dump(summary, fh, indent=0)
        kinds = ", ".join(f"{k}: {v}" for k, v in summary["by_kind"].items() if v)
        forms = ", ".join(f"{k}: {v}" for k, v in summary["by_form"].items())
        with open(args.out + ".md", "w") as fh:
            fh.write(
                "# Property run: random binary conv layers, compiled, compared exactly\n\n"
                f"Command: `{cmd}`\n\n"
                f"- {summary['configs']} layer configurations in {summary['models']} compiled models "
                f"({summary['per_model']} per model), seed {summary['seed']}, {summary['seconds']} s "
                f"on {summary['machine']}, commit {summary['commit']}\n"
                f"- **failures: {summary['failures']}** (output not bit-identical to the numpy reference, "
                "or an error)\n"
                f"- kernels: {kinds}\n- binarizer idioms: {forms}\n\n"
                "Each layer: random batch 1-3, Cin/Cout incl. non-multiples of 32, H, W in 1..17, kernel "
                "3x3/1x1/5x5/3x1/2x2, stride 1-3 per axis, padding 0-2 per side, K in 1..64 codewords, "
                "per-channel dyadic alpha with sign flips, inputs with exact zeros and -0.0. Every 4th model "
                "forces the Sparks op, every 4th the dense binary op; the others use the cost model. "
                "Per-layer records are in `property_run.json`.\n"
            )
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
