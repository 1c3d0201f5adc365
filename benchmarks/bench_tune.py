"""Tuned Sparks op vs its default schedule on ResNet-18's binary layer shapes; tuning throughput.

Layers mode (default): tune the Sparks kernel of each ResNet-18 binary 3x3 shape (K=16, batch
1, ONNX Sign binarizer) with :func:`sparks_tvm.tune.tune_kernels`, then, in the same process,
time the default schedule (``schedules.host``) and the best tuned one *interleaved* (rounds
alternating default/tuned, medians over rounds: the machine is shared and noisy), after
checking that both give identical outputs.

    python benchmarks/bench_tune.py --trials-per-task 32 --out benchmarks/results

Throughput mode: trials per minute of one tuning run of a small layer, with MetaSchedule's
stock builder (``LocalBuilder``: fresh worker processes per batch, each importing every
tensor intrinsic; time-out raised to 600 s so builds can finish at all) vs this project's
set-up (in-process builder, no tensor-intrinsic import):

    python benchmarks/bench_tune.py --throughput --trials 16 --out benchmarks/results

ARM mode: the whole example Sparks ResNet-18 (K=16, 224x224) tuned for ``arm_cpu`` on the
emulated Pi (``runner="emulated-pi"``: NEON plans and the Sparks-vs-dense choice per layer, cost
= aarch64 instructions, exact), then compiled with and without the records and both whole
models counted on the emulated Pi (one call, batch 1, one thread), outputs checked against
onnxruntime. What is optimised and reported is instructions, not time:

    python benchmarks/bench_tune.py --arm --trials 64 --out benchmarks/results
    python benchmarks/bench_tune.py --arm-space --shapes 0 6 --batch 16 --out benchmarks/results   # whole space

Writes ``tune_layers.{json,md}`` + ``tune_curve.png`` (layers), ``tune_throughput.{json,md}``,
``tune_arm.{json,md}`` or ``tune_arm.space.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts", "emulated_pi"))
sys.path.insert(0, HERE)

from sparks_tvm.cost import RESNET18_BINARY_LAYERS as SHAPES  # noqa: E402


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def _geom(cin, cout, side, stride):
    from sparks_tvm.kernels import ConvGeometry

    return ConvGeometry(1, cin, side, side, cout, stride=(stride, stride))


def _interleaved(funcs, args_np, target, rounds: int, seconds_per_call: float = 0.02):
    """Median seconds per call of each function, timed in alternating rounds (same process)."""
    import numpy as np
    import tvm

    from sparks_tvm.bench import interleaved_times

    dev = tvm.cpu()
    libs = [tvm.compile(f.with_attr("global_symbol", "main"), target=target).jit() for f in funcs]
    outs = []
    for lib in libs:
        args = [tvm.runtime.tensor(a, dev) for a in args_np]
        lib["main"](*args)
        outs.append(args[-1].numpy())
    args = [tvm.runtime.tensor(a, dev) for a in args_np]
    times, number = interleaved_times(libs, args, dev, rounds, seconds_per_call)
    return [(float(np.median(t)), float(np.min(t))) for t in times], outs, number


def bench_layers(args):
    import numpy as np

    from schedules import tuning
    from schedules.host import HostSchedules
    from sparks_tvm import reference as ref
    from sparks_tvm.kernels import pack_indices, sparks_out_shape
    from sparks_tvm.models import random_codebook
    from sparks_tvm.target import host_target, target_json
    from sparks_tvm.tune import open_database, tune_kernels, tuned_schedules

    target = host_target()
    if args.threads:
        import tvm

        # One thread count for everything: the kernels' knobs (num-cores), the tuner's worker
        # processes and this process (TVM_NUM_THREADS, set in main before TVM starts).
        target = tvm.target.Target(dict(target.export(), **{"num-cores": args.threads}))
    base = HostSchedules.for_target(target)
    k = args.codewords
    work = args.work_dir or tempfile.mkdtemp(prefix="sparks_bench_tune_")
    geoms = [_geom(*s) for s in SHAPES]
    pairs = [(tuning.make_task(base, "sparks", g, k, "sign"), 1) for g in geoms]
    t0 = time.perf_counter()
    res = tune_kernels(pairs, target, work, trials=args.trials_per_task * len(pairs), batch=args.batch,
                       max_trials_per_task=args.trials_per_task, progress=sys.stderr.isatty())
    tune_s = time.perf_counter() - t0
    print(res.table(), flush=True)
    db = open_database(work)
    rng = np.random.default_rng(0)
    rows = []
    for (task, _), geom, (cin, cout, side, stride) in zip(pairs, geoms, SHAPES):
        sch = db.query_schedule(task.mod, target, "main")
        # What compile(tuning_db=work) uses: the best record, unless the end-of-run check kept the default.
        chooser = tuned_schedules(work, target)
        tuned = chooser.schedule_sparks_conv2d(geom, k, "sign")
        default = base.schedule_sparks_conv2d(geom, k, "sign")
        codebook = random_codebook(rng, k).astype(np.int8)
        idx = rng.integers(0, k, size=(cout, cin))
        x = rng.standard_normal(geom.in_shape).astype(np.float32)
        args_np = [x, ref.codes_to_bits(codebook), pack_indices(idx, k), np.zeros(sparks_out_shape(geom), np.int32)]
        # A third, separately built copy of the default: the default-vs-itself ratio is the noise floor.
        ((t_def, m_def), (t_tun, m_tun), (t_aa, m_aa)), (o_def, o_tun, _), number = _interleaved(
            [default, tuned, base.schedule_sparks_conv2d(geom, k, "sign")], args_np, target, args.rounds)
        expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
        exact = bool(np.array_equal(o_tun.reshape(geom.out_shape), expect) and np.array_equal(o_def, o_tun))
        # Sampled knob values in trace order (candidates[decision]); [] = the default schedule's trace.
        decisions = [int(inst.attrs[0][int(v)]) for inst, v in sch.trace.decisions.items()
                     if inst.kind.name == "SampleCategorical"]
        structure = tuning.describe_trace(sch.trace)
        if chooser.kept_default:
            structure = f"default kept (best record {structure} was not faster when re-measured)"
        task_res = next(t for t in res.tasks if t.name == task.name)
        rows.append({
            "layer": f"{cin}->{cout} {side}x{side} s{stride}", "task": task.name, "trials": task_res.trials,
            "default_ms": t_def * 1e3, "tuned_ms": t_tun * 1e3, "speedup": t_def / t_tun, "exact": exact,
            "default_min_ms": m_def * 1e3, "tuned_min_ms": m_tun * 1e3, "speedup_min": m_def / m_tun,
            "default_copy_ms": t_aa * 1e3, "noise_ratio": t_def / t_aa, "noise_ratio_min": m_def / m_aa,
            "tuner_default_ms": task_res.default_ms, "tuner_best_ms": task_res.best_ms, "calls_per_sample": number,
            "compile_uses": "default" if chooser.kept_default else "tuned",
            "tuned_trace": str(sch.trace), "decisions": decisions, "schedule": structure,
        })
        print(f"{rows[-1]['layer']:<22} default {t_def * 1e3:8.4f} ms  tuned {t_tun * 1e3:8.4f} ms  "
              f"{t_def / t_tun:5.2f}x (min {m_def / m_tun:5.2f}x; default vs its copy {t_def / t_aa:5.2f}x)  "
              f"exact={exact}", flush=True)
    geo = float(np.exp(np.mean([np.log(r["speedup"]) for r in rows])))
    geo_min = float(np.exp(np.mean([np.log(r["speedup_min"]) for r in rows])))
    out = {
        "what": "tuned Sparks op vs its default schedule (schedules.host), same process, interleaved rounds",
        "command": " ".join(["python", "benchmarks/bench_tune.py"] + sys.argv[1:]),
        "target": target_json(target), "machine": platform.processor() or platform.machine(),
        "code_version": _code_version(), "codewords": k, "trials_per_task": args.trials_per_task,
        "rounds": args.rounds, "tuning_seconds": tune_s, "trials_per_minute": res.trials_per_minute,
        "geomean_speedup": geo, "geomean_speedup_min": geo_min, "layers": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_layers.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    lines = [
        f"# Tuned Sparks op vs default schedule (K={k}, batch 1, {target_json(target)})", "",
        f"`{out['command']}` at {out['code_version']}: {args.trials_per_task} MetaSchedule trials per layer "
        f"({tune_s / 60:.1f} min of tuning, {res.trials_per_minute:.1f} trials/min), then default and tuned "
        f"timed in {args.rounds} interleaved rounds in one process (medians). Outputs identical and equal to the "
        "numpy reference on every layer: " + str(all(r["exact"] for r in rows)) + ".", "",
        "Medians and minima over the rounds; *noise* is the default timed against a second, identical build "
        "of itself in the same rounds (1.00x on a quiet machine).", "",
        "| layer | trials | default ms | tuned ms | speed-up (median) | speed-up (min) | noise (median) | "
        "compile uses |", "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['trials']} | {r['default_ms']:.4f} | {r['tuned_ms']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_min']:.2f}x | {r['noise_ratio']:.2f}x | {r['schedule']} |")
    lines += ["", f"Geometric mean speed-up: {geo:.2f}x (medians), {geo_min:.2f}x (minima).", "",
              "`tune_curve.png` plots the tuner's own measurements (best so far per layer, trial 0 = the default "
              "schedule, measured first): on a shared machine its steps also follow the load, which is why the "
              "end-of-run check and this interleaved table, not the curve, decide what counts as faster."]
    with open(os.path.join(args.out, "tune_layers.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if res.curve_png:
        shutil.copy(res.curve_png, os.path.join(args.out, "tune_curve.png"))
    print("\n".join(lines))


def bench_arm(args):
    """ResNet-18 K on arm_cpu: tune on the emulated Pi, then count the default and tuned whole models."""
    import onnxruntime as ort

    import sparks_tvm
    from arm_layers import Model, count_models
    from bench_arm_icount import code_version
    from sparks_tvm import models as zoo
    from sparks_tvm.target import resolve_target, target_json

    k = args.codewords
    shape = (1, 3, 224, 224)
    data = zoo.export_onnx(zoo.sparks_resnet18(k=k), shape)
    x = zoo.example_input(shape, seed=0)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    work = args.work_dir or tempfile.mkdtemp(prefix="sparks_bench_tune_arm_")
    target = resolve_target("arm_cpu")
    t0 = time.perf_counter()
    res = sparks_tvm.tune(data, "arm_cpu", work, trials=args.trials, runner="emulated-pi", batch=args.batch,
                          progress=sys.stderr.isatty())
    tune_s = time.perf_counter() - t0
    print(res.table(), flush=True)
    default = sparks_tvm.compile(data, target="arm_cpu")
    tuned = sparks_tvm.compile(data, target="arm_cpu", tuning_db=work)
    t1 = time.perf_counter()
    counts = count_models([Model(0, "default", default, [x], want, atol=1e-4),
                           Model(1, "tuned", tuned, [x], want, atol=1e-4)])
    count_s = time.perf_counter() - t1
    (d_total, d_per), (t_total, t_per) = counts[0], counts[1]
    kinds = {"default": [r.kind for r in default.report], "tuned": [r.kind for r in tuned.report]}
    out = {
        "what": f"example Sparks ResNet-18 K={k} (224x224, batch 1) on arm_cpu: default vs tuned (runner "
                "emulated-pi), whole compiled model counted on the emulated Pi",
        "optimised": "aarch64 instructions executed (exact, one call after a warm-up, one thread; qemu-user "
                     "cortex-a72 + scripts/emulated_pi/icount.c), not time: nothing ran on a Pi",
        "command": " ".join(["python", "benchmarks/bench_tune.py"] + sys.argv[1:]),
        "target": target_json(target), "code_version": code_version(), "codewords": k, "trials": args.trials,
        "batch": args.batch, "tuning_seconds": tune_s, "counting_seconds": count_s,
        "model_default": d_total, "model_tuned": t_total, "model_ratio": t_total / d_total,
        "binary_default": res.default_total, "binary_tuned": res.tuned_total,
        "binary_ratio": res.tuned_total / res.default_total if res.default_total else None,
        "outputs_match_onnxruntime": True, "layer_kinds": kinds,
        "kernels_default": sorted(d_per.items(), key=lambda kv: -kv[1]),
        "kernels_tuned": sorted(t_per.items(), key=lambda kv: -kv[1]),
        "tasks": res.to_json()["tasks"], "goal": "tuned whole model <= 0.85x the default's instructions",
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_arm.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    binary_share = res.default_total / d_total
    lines = [
        f"# Tuning for arm_cpu on the emulated Pi: example ResNet-18 K={k}, instructions", "",
        f"`{out['command']}` at {out['code_version']}, target `{target_json(target)}`.", "",
        f"What is optimised: {out['optimised']}. {args.trials} trials (candidates counted beyond each task's "
        f"default plans) over {len(res.tasks)} tasks in {tune_s / 60:.1f} min; every candidate's int32 conv "
        "output compared bit for bit with the numpy reference; both whole models' outputs checked against "
        "onnxruntime.", "",
        f"**Whole model: default {d_total / 1e6:.2f} M, tuned {t_total / 1e6:.2f} M instructions "
        f"({t_total / d_total:.3f}x; goal <= 0.85x: {'met' if t_total <= 0.85 * d_total else 'not met'}).** "
        f"The tuned binary conv kernels (weighted by layers) are {res.default_total / 1e6:.2f} -> "
        f"{res.tuned_total / 1e6:.2f} M ({out['binary_ratio']:.3f}x), {100 * binary_share:.0f}% of the default "
        "model's instructions; the rest (float stem, shortcuts, pooling, classifier, binarization outside the "
        "kernels) is not tuned.", "",
        "| task | layers | trials | default M | tuned M | ratio | kernel (default->tuned) | tuned plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in res.tasks:
        kern = t.chosen_kernel if t.chosen_kernel == t.default_kernel else f"{t.default_kernel}->{t.chosen_kernel}"
        plan = ", ".join(f"{a}={b}" for a, b in (t.plan or {}).items())
        lines.append(f"| `{t.name}` | {t.layers} | {t.trials} | {t.default_count / 1e6:.3f} | "
                     f"{t.best_count / 1e6:.3f} | {t.ratio:.3f} | {kern} | {plan} |")
    lines += ["", "Largest kernels of the whole model (M instructions, default -> tuned):", "",
              "| kernel | default M | tuned M |", "|---|---|---|"]
    tuned_map = dict(t_per)
    for name, c in sorted(d_per.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| `{name}` | {c / 1e6:.2f} | {tuned_map.get(name, 0) / 1e6:.2f} |")
    with open(os.path.join(args.out, "tune_arm.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def bench_arm_space(args):
    """Every plan of the NEON Sparks kernel's space on some ResNet-18 layers: how far is the default from the best?"""
    from bench_arm_icount import code_version
    from sparks_tvm.target import resolve_target, target_json
    from sparks_tvm.tune import ArmTask, tune_arm_tasks

    target = resolve_target("arm_cpu")
    work = args.work_dir or tempfile.mkdtemp(prefix="sparks_bench_tune_arm_space_")
    tasks = [ArmTask(_geom(*SHAPES[i]), args.codewords, "sign", 1, ("sparks",)) for i in args.shapes]
    t0 = time.perf_counter()
    # More trials than the spaces hold: the search stops when every plan is counted.
    res = tune_arm_tasks(tasks, target, work, trials=100000, batch=args.batch, progress=sys.stderr.isatty())
    rows = []
    from sparks_tvm.tune.arm_records import read_trials

    trials = read_trials(work)
    for t, i in zip(res.tasks, args.shapes):
        counts = sorted(r["count"] for r in trials if r["task"] == t.name and r["count"] is not None)
        rows.append({"layer": SHAPES[i], "task": t.name, "plans_counted": len(counts), "default": t.default_count,
                     "best": t.best_count, "best_plan": t.plan, "worst": counts[-1],
                     "default_rank": counts.index(t.default_count) + 1, "ratio": t.ratio})
    out = {"what": f"every valid plan of the NEON Sparks kernel (K={args.codewords}) counted on the emulated Pi",
           "command": " ".join(["python", "benchmarks/bench_tune.py"] + sys.argv[1:]),
           "target": target_json(target), "code_version": code_version(), "seconds": time.perf_counter() - t0,
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_arm.space.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    lines = [f"# The NEON Sparks kernel's whole plan space, K={args.codewords} (emulated Pi, instructions)", "",
             f"`{out['command']}` at {out['code_version']}: every valid plan (tile x chunk x channel block; "
             "o_chunks by the kernel's rule) of each layer counted, outputs bit-exact; "
             f"{out['seconds'] / 60:.1f} min.", "",
             "| layer (cin->cout, side, stride) | plans | default M | best M | best/default | default's rank | "
             "worst M | best plan |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cin, cout, side, stride = r["layer"]
        plan = ", ".join(f"{a}={b}" for a, b in r["best_plan"].items())
        lines.append(f"| {cin}->{cout}, {side}, s{stride} | {r['plans_counted']} | {r['default'] / 1e6:.3f} | "
                     f"{r['best'] / 1e6:.3f} | {r['ratio']:.3f} | {r['default_rank']} | {r['worst'] / 1e6:.3f} | "
                     f"{plan} |")
    with open(os.path.join(args.out, "tune_arm.space.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def bench_throughput(args):
    """Trials/min of the stock MetaSchedule builder vs the in-process one, each in a fresh process."""
    results = {}
    for mode in ("stock", "in_process"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_throughput-child", mode, "--trials", str(args.trials),
               "--batch", str(args.batch)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{mode} run failed")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        child["process_wall_s"] = wall
        child["trials_per_minute_incl_startup"] = 60.0 * child["trials_run"] / wall
        results[mode] = child
        print(mode, json.dumps(child), flush=True)
    out = {"command": " ".join(["python", "benchmarks/bench_tune.py"] + sys.argv[1:]), "code_version": _code_version(),
           "layer": "Sparks 1x64x28x28 -> 64, K=16", "trials": args.trials, "batch": args.batch, "results": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_throughput.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    md = ["# Tuning throughput on this machine (trials per minute)", "",
          f"`{out['command']}` at {out['code_version']}: {args.trials} trials in batches of {args.batch} on "
          f"{out['layer']}; each set-up in a fresh process (import and start-up included in the second column).", "",
          "| builder | trials measured | tuning s | trials/min (tuning) | process s | trials/min (whole process) |",
          "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        md.append(f"| {mode} | {r['measured']}/{r['trials_run']} | {r['seconds']:.0f} | {r['trials_per_minute']:.1f} | "
                  f"{r['process_wall_s']:.0f} | {r['trials_per_minute_incl_startup']:.1f} |")
    with open(os.path.join(args.out, "tune_throughput.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


def _throughput_child(mode, trials, batch):
    from tvm.s_tir import meta_schedule as ms

    from schedules import tuning
    from schedules.host import HostSchedules
    from sparks_tvm.target import host_target
    from sparks_tvm.tune import tune_kernels

    target = host_target()
    base = HostSchedules.for_target(target)
    task = tuning.make_task(base, "sparks", _geom(64, 64, 28, 1), 16, "sign")
    work = tempfile.mkdtemp(prefix="sparks_tput_")
    kwargs = {}
    if mode == "stock":
        kwargs = dict(builder=ms.builder.LocalBuilder(max_workers=2, timeout_sec=600), skip_intrinsics=False)
    res = tune_kernels([(task, 1)], target, work, trials=trials, batch=batch, plot=False, progress=False, **kwargs)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"trials_run": res.trials_run, "measured": res.measured, "seconds": res.seconds,
                      "trials_per_minute": res.trials_per_minute}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--trials-per-task", type=int, default=32)
    ap.add_argument("--codewords", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    ap.add_argument("--work-dir", help="tuning work dir (default: a fresh temporary one)")
    ap.add_argument("--throughput", action="store_true", help="trials/min: stock builder vs in-process")
    ap.add_argument("--arm", action="store_true", help="ResNet-18 on arm_cpu, emulated Pi, instructions")
    ap.add_argument("--arm-space", action="store_true",
                    help="count every NEON Sparks plan of the --shapes layers (how near the default is to the best)")
    ap.add_argument("--shapes", type=int, nargs="+", default=[0, 6], help="--arm-space: indices into the ResNet-18 "
                    "layer shapes (default 0 6)")
    ap.add_argument("--trials", type=int, default=16, help="trials of the throughput or --arm run")
    ap.add_argument("--threads", type=int, help="threads for tuning and timing (default: TVM's, all cores); "
                    "at 2 threads a process can land in a slow mode (bench_thread_modes.py)")
    ap.add_argument("--_throughput-child", dest="child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.child:
        _throughput_child(args.child, args.trials, args.batch)
    elif args.throughput:
        bench_throughput(args)
    elif args.arm:
        bench_arm(args)
    elif args.arm_space:
        bench_arm_space(args)
    else:
        bench_layers(args)


if __name__ == "__main__":
    main()
