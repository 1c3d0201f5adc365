"""Bad input, fuzz style: every case gives a named ``sparks_tvm`` error or a correct result.

Never a crash, a hang, a bare TVM/protobuf exception or a silent float fallback. Mutated
files (truncated, bit-flipped, garbage-overwritten) go through a child process with a
timeout, because a corrupt model that gets past the checks could take TVM down with it; the
child reports one line per case and is restarted after the case that killed it.

Semantics checked here (and documented in the README):

- NaN or +-inf in a run-time input: :class:`~sparks_tvm.errors.InputValueError` (a one-bit
  activation cannot carry NaN; onnxruntime's Sign would propagate it).
- NaN/inf in a weight: :class:`~sparks_tvm.errors.ModelLoadError` (a corrupt checkpoint).
- -0.0 is 0: ``Sign(-0.0) = 0``; ``x >= 0`` forms give +1 (IEEE: -0.0 >= 0).
- A weight must be exactly +-alpha (bit-identical magnitudes per output channel, as every
  float32 scale or BatchNorm fold gives). One ulp off is not binary: strict compile names the
  node and channel, lenient compile keeps the conv in float (equal to onnxruntime). Rounding
  it to alpha would change the conv's output slightly and could flip a later binarizer.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm import models
from sparks_tvm.errors import (InputValueError, ModelLoadError, NonBinaryWeightsError, ShapeError,
                               UnsupportedOpsError)
from sparks_tvm.reference import binarize, binary_conv2d_ref, sparks_conv2d_ref

CHILD = textwrap.dedent(r'''
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import numpy as np
    import onnxruntime as ort
    import sparks_tvm
    from sparks_tvm.errors import SparksError
    ort.set_default_logger_severity(4)
    cases = json.load(open(sys.argv[1]))[int(sys.argv[2]):]
    for case in cases:
        print("START", case["name"], flush=True)
        data = open(case["path"], "rb").read()
        try:
            model = sparks_tvm.compile(data, tuning_db=case.get("tuning_db"))
        except SparksError as err:
            print("RESULT", case["name"], "error:" + type(err).__name__, flush=True)
            continue
        except Exception as err:
            print("RESULT", case["name"], "unexpected:" + type(err).__name__ + ": " + str(err)[:200].replace("\n", " "), flush=True)
            continue
        rng = np.random.default_rng(0)
        xs = [rng.integers(-4, 5, size=d["shape"]).astype(d["dtype"]) for d in model.inputs]
        got = model.run(*xs)
        try:
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            ref = sess.run(None, {d["name"]: x for d, x in zip(model.inputs, xs)})
        except Exception as err:
            print("RESULT", case["name"], "ok-no-reference", flush=True)
            continue
        outcome = "ok"
        for g, r in zip(got, ref):
            if not np.all(np.isfinite(r)):
                outcome = "reference-nonfinite"
            elif g.shape != r.shape or not np.allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max()))):
                outcome = "mismatch"
                break
        print("RESULT", case["name"], outcome, flush=True)
''')


def run_cases(tmp_path, cases, timeout=240):
    """Run ``cases`` ({name, path}) in child processes; return {name: outcome}."""
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps(cases))
    outcomes, start = {}, 0
    # The parent's thread count (its TVM_NUM_THREADS): compile's target follows it, and
    # tuning records are refused for another core count.
    env = dict(os.environ)
    while start < len(cases):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(manifest), str(start)], capture_output=True,
                              text=True, timeout=timeout, env=env)
        current = None
        for line in proc.stdout.splitlines():
            parts = line.split(" ", 2)
            if parts[0] == "START":
                current = parts[1]
            elif parts[0] == "RESULT":
                outcomes[parts[1]] = parts[2]
                current = None
        if current is None:  # the child finished every case it was given
            break
        outcomes[current] = f"crash (exit {proc.returncode}): {proc.stderr[-300:]}"
        start = [c["name"] for c in cases].index(current) + 1
    return outcomes


@pytest.fixture(scope="module")
def tiny_bytes():
    return models.export_onnx(models.sparks_resnet_tiny(k=3, widths=(5, 7)), (1, 3, 6, 5))


def _write(tmp_path, name, data):
    p = tmp_path / f"{name}.onnx"
    p.write_bytes(data)
    return {"name": name, "path": str(p)}


def test_mutated_files(tmp_path, tiny_bytes):
    """Truncations, single-bit flips and garbage overwrites at seeded positions."""
    rng = np.random.default_rng(2024)
    n = len(tiny_bytes)
    cases = []
    for frac in (0.0005, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        cases.append(_write(tmp_path, f"trunc{frac}", tiny_bytes[: int(n * frac)]))
    cases.append(_write(tmp_path, "trunc-1", tiny_bytes[:-1]))
    for i, pos in enumerate(rng.integers(0, n, size=10)):
        data = bytearray(tiny_bytes)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        cases.append(_write(tmp_path, f"flip{i}@{pos}", bytes(data)))
    for i, pos in enumerate(rng.integers(0, n - 16, size=3)):
        data = bytearray(tiny_bytes)
        data[pos:pos + 16] = rng.integers(0, 256, size=16, dtype=np.uint8).tobytes()
        cases.append(_write(tmp_path, f"garbage{i}@{pos}", bytes(data)))
    outcomes = run_cases(tmp_path, cases)
    assert len(outcomes) == len(cases), outcomes
    bad = {k: v for k, v in outcomes.items() if not (v == "ok" or v.startswith("error:"))}
    assert not bad, bad
    for frac in (0.0005, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        assert outcomes[f"trunc{frac}"] == "error:ModelLoadError", outcomes
    assert outcomes["trunc-1"] == "error:ModelLoadError"


def _conv_model(w, x_shape, binarize_op="Sign", pads=(1, 1, 1, 1), strides=(1, 1), extra_nodes=(), opset=17):
    nodes = [helper.make_node(binarize_op, ["x"], ["b"]),
             helper.make_node("Conv", ["b", "w"], ["y"], name="conv", pads=list(pads), strides=list(strides))]
    g = helper.make_graph(nodes + list(extra_nodes), "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "o", "h", "w"])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_structural_garbage(tmp_path):
    """Empty or malformed graphs, cycles, duplicate outputs, missing external weights."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])
    opset = [helper.make_opsetid("", 17)]
    no_graph = onnx.ModelProto(ir_version=8)
    empty = helper.make_model(helper.make_graph([], "g", [x], [y]), opset_imports=opset)
    cycle = helper.make_model(helper.make_graph([helper.make_node("Relu", ["b"], ["a"]),
                                                 helper.make_node("Relu", ["a"], ["b"]),
                                                 helper.make_node("Relu", ["b"], ["y"])], "g", [x], [y]),
                              opset_imports=opset)
    dup = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"]),
                                               helper.make_node("Sign", ["x"], ["y"])], "g", [x], [y]),
                            opset_imports=opset)
    dangling = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "nowhere"], ["y"])], "g", [x], [y]),
                                 opset_imports=opset)
    ext = _conv_model(np.ones((2, 2, 3, 3), np.float32), (1, 2, 3, 3))
    w = ext.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="weights_not_shipped.bin")
    cases = [_write(tmp_path, name, m.SerializeToString()) for name, m in
             (("no_graph", no_graph), ("empty", empty), ("cycle", cycle), ("dup", dup), ("dangling", dangling),
              ("external", ext))]
    outcomes = run_cases(tmp_path, cases)
    assert {k: v for k, v in outcomes.items()} == {
        "no_graph": "error:ModelLoadError", "empty": "error:ModelLoadError", "cycle": "error:ModelLoadError",
        "dup": "error:ModelLoadError", "dangling": "error:ModelLoadError", "external": "error:ModelLoadError",
    }, outcomes


def test_nan_and_inf(rng):
    w = np.where(rng.random((4, 3, 3, 3)) < 0.5, -0.5, 0.5).astype(np.float32)
    m = _conv_model(w, (1, 3, 5, 5), pads=(1, 1, 1, 1))
    compiled = sparks_tvm.compile(m)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((1, 3, 5, 5), np.float32)
        x[0, 2, 3, 1] = bad
        with pytest.raises(InputValueError, match=r"'x' holds 1 non-finite value.*\(0, 2, 3, 1\)"):
            compiled.run(x)
        with pytest.raises(InputValueError):
            compiled.benchmark(x, repeat=1)
    # Signed zeros and subnormals are finite: exact, and Sign(-0.0) = 0 as in onnxruntime.
    x = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -3.0] * 13, np.float32)[:75].reshape(1, 3, 5, 5)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(compiled.run(x)[0], ref)
    wn = w.copy()
    wn[1, 0, 0, 0] = np.nan
    with pytest.raises(ModelLoadError, match=r"weight 'w' of node 'conv' holds 1 NaN"):
        sparks_tvm.compile(_conv_model(wn, (1, 3, 5, 5)))


def test_nan_arising_inside_the_model(rng):
    """Documented, not hidden: a NaN made inside the model (sqrt of a negative) reaches the
    binary kernels as Sign -> 0 (no contribution), x >= 0 / x > 0 forms -> +1. onnxruntime
    gives NaN / -1 there; finite inputs cannot produce this in a well-formed BNN."""
    w = np.where(rng.random((3, 2, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    nan_nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Add", ["a", "p"], ["a1"]),
                 helper.make_node("Neg", ["a1"], ["d"]), helper.make_node("Sqrt", ["d"], ["n"])]
    branches = {
        "sign": [helper.make_node("Sign", ["n"], ["b_sign"])],
        "ge": [helper.make_node("GreaterOrEqual", ["n", "z"], ["m_ge"]), helper.make_node("Where", ["m_ge", "p", "q"], ["b_ge"])],
        "gt": [helper.make_node("Greater", ["n", "z"], ["m_gt"]), helper.make_node("Where", ["m_gt", "p", "q"], ["b_gt"])],
    }
    nodes = list(nan_nodes)
    for mode, bn in branches.items():
        nodes += bn + [helper.make_node("Conv", [f"b_{mode}", "w"], [f"y_{mode}"], name=f"conv_{mode}", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(np.float32(v), k)
                                                 for k, v in (("z", 0), ("p", 1), ("q", -1))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info(f"y_{m}", TensorProto.FLOAT, [1, 3, 4, 4]) for m in branches],
                          inits)
    compiled = sparks_tvm.compile(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [r.kind for r in compiled.report] == ["binary"] * 3
    y_sign, y_ge, y_gt = compiled.run(rng.standard_normal((1, 2, 4, 4)).astype(np.float32))
    plus = binary_conv2d_ref(np.ones((1, 2, 4, 4), np.int8), w.astype(np.int8), (1, 1), (1, 1, 1, 1))
    assert np.all(y_sign == 0) and np.array_equal(y_ge, plus) and np.array_equal(y_gt, plus)


def test_negative_zero_with_ge_rule(rng):
    """Where(x >= 0, 1, -1): -0.0 >= 0 is true, so -0.0 -> +1 (as onnxruntime)."""
    w = np.where(rng.random((5, 3, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    nodes = [helper.make_node("GreaterOrEqual", ["x", "z"], ["m"]), helper.make_node("Where", ["m", "p", "n"], ["b"]),
             helper.make_node("Conv", ["b", "w"], ["y"], name="conv", pads=[0, 1, 1, 0])]
    inits = [numpy_helper.from_array(np.float32(v), k) for k, v in (("z", 0), ("p", 1), ("n", -1))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "o", "h", "w"])],
                          inits + [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.where(rng.random((2, 3, 4, 6)) < 0.5, -0.0, 0.0).astype(np.float32)
    x[0, 0, 0, :3] = [-2.0, 1.0, -0.5]
    compiled = sparks_tvm.compile(m)
    assert compiled.report[0].binarizer == "ge"
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(compiled.run(x)[0], ref)


def test_wrong_shapes_and_types(rng):
    w = np.where(rng.random((4, 3, 3, 3)) < 0.5, -0.5, 0.5).astype(np.float32)
    m = _conv_model(w, (1, 3, 5, 5))
    for shapes, match in (({"x": (1, 3, 5)}, "rank 3"), ({"x": (1, 3, 5, 6)}, "contradicts"),
                          ({"x": (1, 3, 5, 5), "z": (1,)}, "unknown input"), ({"y": (1, 3, 5, 5)}, "unknown input")):
        with pytest.raises(ShapeError, match=match):
            sparks_tvm.compile(m, shapes=shapes)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    with pytest.raises(ShapeError, match="dynamic shape"):
        sparks_tvm.compile(m)
    for shapes in ({"x": (1, 3, 0, 5)}, {"x": (1, 3, -2, 5)}):
        with pytest.raises(ShapeError):
            sparks_tvm.compile(m, shapes=shapes)
    with pytest.raises(ShapeError, match=r"conv 'conv' produces an empty tensor of shape \(1, 4, 0, 0\)"):
        sparks_tvm.compile(_conv_model(w, (1, 3, 2, 2), pads=(0, 0, 0, 0)))
    compiled = sparks_tvm.compile(m, shapes={"x": (2, 3, 7, 5)})
    for arr in (np.zeros((2, 3, 5, 7), np.float32), np.zeros((2, 3, 7, 5, 1), np.float32)):
        with pytest.raises(ShapeError, match="expected shape"):
            compiled.run(arr)
    with pytest.raises(ShapeError, match="dtype"):
        compiled.run(np.full((2, 3, 7, 5), "a"))
    with pytest.raises(ShapeError, match="takes 1 input"):
        compiled.run(np.zeros((2, 3, 7, 5), np.float32), np.zeros((2, 3, 7, 5), np.float32))
    ints = rng.integers(-3, 4, size=(2, 3, 7, 5))  # int64 -> float32 is a safe, exact cast
    ref = binary_conv2d_ref(binarize(ints.astype(np.float32), "sign"), np.sign(w).astype(np.int8), (1, 1), (1, 1, 1, 1))
    assert np.array_equal(compiled.run(ints)[0], ref.astype(np.float32) * 0.5)


def test_unsupported_ops_standard_and_custom():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])
    nodes = [helper.make_node("Celu", ["x"], ["a"], name="celu0"), helper.make_node("Celu", ["a"], ["b"], name="celu1"),
             helper.make_node("LpNormalization", ["b"], ["c"], name="lpn"),
             helper.make_node("Mystery", ["c"], ["y"], name="myst", domain="com.example")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpsError) as err:
        sparks_tvm.compile(m)
    msg = str(err.value)
    assert "3 unsupported" in msg and "Celu: celu0, celu1" in msg and "lpn" in msg and "com.example::Mystery: myst" in msg
    assert "QONNX" not in msg


@pytest.mark.parametrize("kind, cin, cout", [("sparks", 1000, 6), ("binary", 999, 5), ("sparks", 3, 700)])
def test_huge_channel_counts(rng, kind, cin, cout):
    """Channel counts far from the usual (not multiples of 32, huge Cin or Cout): exact."""
    from sparks_tvm.models import random_codebook

    k = 2
    codebook = random_codebook(rng, k)
    idx = rng.integers(0, k, size=(cout, cin))
    idx[:k, 0] = np.arange(k)
    w = (codebook[idx] * 0.25).astype(np.float32)
    x_shape = (1, cin, 3, 4)
    compiled = sparks_tvm.compile(_conv_model(w, x_shape, strides=(2, 1)), force_kind=kind)
    assert compiled.report[0].kind == kind
    x = rng.integers(-2, 3, size=x_shape).astype(np.float32)
    ref = sparks_conv2d_ref(binarize(x, "sign"), codebook.astype(np.int8), idx, (2, 1), (1, 1, 1, 1))
    assert np.array_equal(compiled.run(x)[0], ref.astype(np.float32) * 0.25)


def test_weight_almost_alpha(rng):
    codebook_w = np.where(rng.random((6, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    w = codebook_w * np.float32(0.3)
    x = rng.integers(-2, 3, size=(2, 4, 5, 5)).astype(np.float32)
    exact = sparks_tvm.compile(_conv_model(w, x.shape))
    assert exact.report[0].kind != "float"
    for name, off in (("one ulp", np.nextafter(w[3, 2, 1, 1], np.float32(10))), ("0.1 %", w[3, 2, 1, 1] * 1.001)):
        near = w.copy()
        near[3, 2, 1, 1] = off
        m = _conv_model(near, x.shape)
        with pytest.raises(NonBinaryWeightsError, match=r"'conv'.*output channel 3.*2 distinct magnitudes"):
            sparks_tvm.compile(m)
        lenient = sparks_tvm.compile(m, strict=False)
        assert lenient.report[0].kind == "float" and "output channel 3" in lenient.report[0].reason, name
        ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        assert np.allclose(lenient.run(x)[0], ref, rtol=1e-6, atol=1e-6), name
    # The message tells the two magnitudes apart (9 significant digits).
    near = w.copy()
    near[0, 0, 0, 0] = np.nextafter(near[0, 0, 0, 0], np.float32(-10))
    with pytest.raises(NonBinaryWeightsError, match=r"\((0\.299999982, 0\.300000012|0\.300000012, 0\.300000042)\)"):
        sparks_tvm.compile(_conv_model(near, x.shape))


def test_property_sample():
    """The CI-sized sample of scripts/property_run.py (the long run's result is committed under
    benchmarks/results/property_run.*): 16 random layers in 2 models, every output exact."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "property_run.py"
    spec = importlib.util.spec_from_file_location("property_run", path)
    prop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prop)
    summary = prop.run(configs=16, per_model=8, seed=12345, log=lambda *_: None)
    fails = [r for r in summary["records"] if not r["ok"]]
    assert summary["configs"] == 16 and not fails, fails
    assert summary["by_kind"]["sparks"] > 0 and summary["by_kind"]["binary"] > 0


# ----------------------------------------------------------------------------- tuning work dirs


def _tuning_db(model_bytes, work, target):
    """A work dir as sparks_tvm.tune leaves it, with one default-schedule record per kernel
    (no measurement: the tests are about the files, not the schedules)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from sparks_tvm import frontend
    from sparks_tvm.target import target_json
    from sparks_tvm.tune import META_FILE, extract_tasks, open_database

    proto = frontend.load_onnx(model_bytes)
    db = open_database(work)
    for task, _ in extract_tasks(proto, frontend.input_specs(proto, None), target):
        sch = task.default_schedule()
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(task.mod), [tvm.tirx.FloatImm("float32", 1e-3)], target,
            ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
    with open(os.path.join(work, META_FILE), "w") as fh:
        json.dump({"target": target_json(target)}, fh)
    return work


def _db_model(c=20, o=24, k=5, seed=0):
    rng = np.random.default_rng(seed)
    from sparks_tvm.models import random_codebook

    cb = random_codebook(rng, k)
    w = (cb[rng.integers(0, k, size=(o, c))] * 0.5).astype(np.float32)
    return _conv_model(w, (2, c, 9, 7), strides=(2, 2)).SerializeToString()


def _snapshot(work):
    out = {}
    for root, _, files in os.walk(work):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), work)] = fh.read()
    return out


def test_parallel_compiles_share_a_tuning_work_dir(tmp_path, host):
    """Two compiles in separate processes read one work dir at once: both exact, the files
    byte-identical afterwards, the database still applies."""
    model = _db_model()
    work = _tuning_db(model, str(tmp_path / "work"), host)
    before = _snapshot(work)
    (tmp_path / "m.onnx").write_bytes(model)
    child = textwrap.dedent(r'''
        import sys, warnings
        warnings.simplefilter("ignore")
        import numpy as np, onnxruntime as ort, sparks_tvm
        data = open(sys.argv[1], "rb").read()
        m = sparks_tvm.compile(data, tuning_db=sys.argv[2])
        x = np.random.default_rng(int(sys.argv[3])).integers(-2, 3, size=(2, 20, 9, 7)).astype(np.float32)
        ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        print("EXACT" if np.array_equal(m.run(x)[0], ref) else "DIFF")
    ''')
    # The parent's thread count (its TVM_NUM_THREADS): compile's target follows it, and
    # tuning records are refused for another core count.
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "m.onnx"), work, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert [o[0].split()[-1] for o in outs] == ["EXACT"] * 2
    assert _snapshot(work) == before
    from sparks_tvm.compiler import build_relax
    from sparks_tvm.tune import tuned_schedules

    sched = tuned_schedules(work, host)
    proto = onnx.load_model_from_string(model)
    build_relax(proto, sparks_tvm.frontend.input_specs(proto), host, kernel_schedules=sched)
    assert len(sched.applied) == 1 and not sched.missed


@pytest.fixture(scope="module")
def db_cases(tmp_path_factory):
    from sparks_tvm.target import host_target

    root = tmp_path_factory.mktemp("dbs")
    model = _db_model()
    good = _tuning_db(model, str(root / "good"), host_target())
    return root, model, good


def test_corrupt_or_foreign_tuning_db_is_reported(db_cases, tmp_path):
    """Corrupt records/workloads/metadata: TuningError naming the work dir (checked in a child
    process: MetaSchedule's parser answers some garbage with bad_alloc). A work dir of another
    model compiles exactly with default schedules and a warning."""
    import shutil

    root, model, good = db_cases
    rec_name, wl_name, meta_name = "database_tuning_record.json", "database_workload.json", "sparks_tuning.json"
    with open(os.path.join(good, rec_name)) as fh:
        rec = fh.read()
    edits = {
        "garbage_line": (rec_name, "this is not json\n" + rec),
        "wrong_structure": (rec_name, '[0, "hello"]\n' + rec),
        "bad_workload_index": (rec_name, rec.replace("[0,", "[7,", 1)),
        "unknown_instruction": (rec_name, rec.replace('"Split"', '"Frobnicate"', 1)),
        "workload_garbage": (wl_name, '["123", "bm90IGEgd29ya2xvYWQ="]\n'),
        "workload_empty": (wl_name, ""),
        "meta_garbage": (meta_name, "{{{"),
        "meta_other_target": (meta_name, json.dumps({"target": json.dumps({"kind": "llvm", "mcpu": "cortex-a72"})})),
    }
    (tmp_path / "m.onnx").write_bytes(model)
    cases = []
    for name, (fname, text) in edits.items():
        work = str(tmp_path / name)
        shutil.copytree(good, work)
        with open(os.path.join(work, fname), "w") as fh:
            fh.write(text)
        cases.append({"name": name, "path": str(tmp_path / "m.onnx"), "tuning_db": work})
    from sparks_tvm.target import host_target

    foreign = _tuning_db(_db_model(c=12, o=16, k=3, seed=1), str(tmp_path / "foreign"), host_target())
    cases.append({"name": "foreign_model", "path": str(tmp_path / "m.onnx"), "tuning_db": foreign})
    outcomes = run_cases(tmp_path, cases)
    # TuningDatabaseError (a TuningError) names damage inside the database files.
    allowed = {"error:TuningError", "error:TuningDatabaseError"}
    assert outcomes.pop("foreign_model") == "ok"
    assert set(outcomes) == set(edits) and all(v in allowed for v in outcomes.values()), outcomes
