"""Issue 22 (host CPU): ``CompiledModel.run``'s fast path and ``compile``'s thread count.

``run`` binds aligned inputs in place, copies the others into per-thread buffers, and returns
views of the VM's output tensors: these tests check that every path gives the old path's
values, that no result is ever overwritten or shared, that threads stay independent, and that
bad inputs keep their named errors. Speed is measured in ``benchmarks/bench_run_overhead.py``.

Budget: about 20 s on a 2-core machine (six tiny compiles).
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm import models, vm_runner
from sparks_tvm.errors import InputValueError, ShapeError, SparksError
from sparks_tvm.target import host_cpu_count, host_target, host_threads

SHAPE = (1, 3, 7, 7)


@pytest.fixture(scope="module")
def tiny():
    """A compiled tiny Sparks ResNet (one input, one output)."""
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    return sparks_tvm.compile(models.export_onnx(net, SHAPE))


def legacy_run(model, x):
    """The values the run path before issue 22 returned: new tensors in, ``.numpy()`` out."""
    out = model.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), tvm.cpu()))
    return out.numpy()


def inputs(n, seed=0):
    return [models.example_input(SHAPE, seed=seed + i) for i in range(n)]


def unaligned(x):
    """A copy of ``x`` whose data is 4 bytes past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data % 64) + 4
    y = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    y[...] = x
    return y


def test_every_input_path_gives_the_old_values(tiny, monkeypatch):
    xs = inputs(3)
    want = [legacy_run(tiny, x) for x in xs]
    assert not np.array_equal(want[0], want[1])  # distinct inputs give distinct outputs
    aligned = tiny.empty_inputs()[0]
    assert aligned.shape == SHAPE and aligned.dtype == np.float32 and aligned.ctypes.data % 64 == 0
    bound = []
    real = tvm.runtime.from_dlpack
    monkeypatch.setattr(tvm.runtime, "from_dlpack", lambda a: bound.append(a) or real(a))
    for force_zero_copy in (False, True):
        if force_zero_copy:  # a 588-byte input is copied by default; read it in place here
            monkeypatch.setattr(vm_runner, "ZERO_COPY_MIN_BYTES", 0)
        for x, w in zip(xs, want):
            aligned[...] = x
            readonly = x.copy()
            readonly.flags.writeable = False
            variants = {"plain": x, "aligned": aligned, "unaligned": unaligned(x), "fortran": np.asfortranarray(x),
                        "float64": x.astype(np.float64), "readonly": readonly, "list": x.tolist()}
            for name, arr in variants.items():
                bound.clear()
                got = tiny.run(arr)
                assert len(got) == 1 and np.array_equal(got[0], w), name
                # Only an aligned, contiguous, writeable float32 array of the caller's is read in
                # place ("plain" may be aligned by chance; a converted copy may be bound too).
                in_place = (force_zero_copy and isinstance(arr, np.ndarray) and arr.dtype == np.float32
                            and arr.flags.c_contiguous and arr.flags.writeable and arr.ctypes.data % 64 == 0)
                assert in_place == (force_zero_copy and name == "aligned") or name == "plain"
                assert any(b is arr for b in bound) == in_place, name
                assert len(bound) <= 1
            assert np.array_equal(aligned, x)  # the model never writes its inputs


def test_results_of_a_call_are_never_overwritten_or_shared(tiny):
    xs = inputs(6, seed=10)
    want = [legacy_run(tiny, x) for x in xs]
    held = []
    for x in xs:  # covers a thread's first, second (learning) and later calls
        (y,) = tiny.run(x)
        assert y.flags.writeable and y.dtype == np.float32
        assert not np.shares_memory(y, x)
        held.append(y)
    for i, y in enumerate(held):
        assert np.array_equal(y, want[i])
        assert not any(np.shares_memory(y, z) for z in held[i + 1:])
    held[0][...] = 1e9  # writing a result changes nothing else
    assert np.array_equal(tiny.run(xs[1])[0], want[1]) and np.array_equal(held[1], want[1])


def test_out_argument_receives_the_results(tiny):
    x = inputs(1, seed=20)[0]
    dst = [np.full((1, 10), np.nan, np.float32)]
    got = tiny.run(x, out=dst)
    assert got[0] is dst[0] and np.array_equal(dst[0], legacy_run(tiny, x))
    name = tiny.output_names[0]
    with pytest.raises(ShapeError, match=rf"out\[0\] \(output '{name}'\): expected shape \(1, 10\)"):
        tiny.run(x, out=[np.empty((1, 11), np.float32)])
    with pytest.raises(ShapeError, match="dtype float32"):
        tiny.run(x, out=[np.empty((1, 10), np.float64)])
    with pytest.raises(ShapeError, match=r"has 1 output\(s\).*got 2"):
        tiny.run(x, out=[np.empty((1, 10), np.float32)] * 2)
    ro = np.empty((1, 10), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ShapeError, match="read-only"):
        tiny.run(x, out=[ro])


def test_threads_each_get_their_own_buffers(tiny):
    xs = inputs(4, seed=30)
    want = [legacy_run(tiny, x) for x in xs]
    aligned = []
    for x in xs:
        a = tiny.empty_inputs()[0]
        a[...] = x
        aligned.append(a)

    def call(i):
        arr = (xs, aligned)[i % 2][i % 4]
        return i % 4, tiny.run(arr)[0]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(call, range(400)))
    assert all(np.array_equal(y, want[k]) for k, y in outs)
    # Results stay valid after the threads' later calls, and no two share memory.
    assert len({y.ctypes.data for _, y in outs}) == len(outs)


def test_bad_inputs_keep_their_named_errors(tiny):
    x = inputs(1, seed=40)[0]
    with pytest.raises(ShapeError, match=r"input 'input': expected shape \(1, 3, 7, 7\), got \(1, 3, 7, 8\)"):
        tiny.run(np.zeros((1, 3, 7, 8), np.float32))
    with pytest.raises(ShapeError, match="input 'input': expected dtype float32, got <U1"):
        tiny.run(np.full(SHAPE, "a"))
    with pytest.raises(ShapeError, match=r"takes 1 input\(s\) \['input'\], got 2"):
        tiny.run(x, x)
    for bad in (np.nan, np.inf, -np.inf):
        arr = tiny.empty_inputs()[0]
        arr[...] = x
        arr[0, 1, 2, 3] = bad
        with pytest.raises(InputValueError, match=r"input 'input' holds 1 non-finite value\(s\).*\(0, 1, 2, 3\)"):
            tiny.run(arr)
    # Huge finite values overflow the fast finiteness check: the exact check lets them run.
    big = x * np.float32(1e30)
    assert np.array_equal(tiny.run(big)[0], legacy_run(tiny, big))


def _graph_model(nodes, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outputs],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


ALIASING_MODELS = {
    # The VM returns the input tensor itself for an input that is an output...
    "identity": lambda: _graph_model([helper.make_node("Identity", ["x"], ["y"])], [("y", [1, 2, 4, 4])]),
    # ...one tensor for two outputs of the same value, and its own constant for a constant.
    "twice": lambda: _graph_model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["y"], ["z"])],
                                  [("y", [1, 2, 4, 4]), ("z", [1, 2, 4, 4])]),
    "constant": lambda: _graph_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["c"], ["z"])],
        [("y", [1, 2, 4, 4]), ("z", [1, 3])], [numpy_helper.from_array(np.arange(3, dtype=np.float32)[None], "c")]),
}


@pytest.mark.parametrize("kind", sorted(ALIASING_MODELS))
def test_outputs_the_vm_shares_are_copied(kind, monkeypatch):
    monkeypatch.setattr(vm_runner, "ZERO_COPY_MIN_BYTES", 0)  # the identity output would be the caller's array
    model = sparks_tvm.compile(ALIASING_MODELS[kind]())
    rng = np.random.default_rng(5)
    held = []
    for i in range(5):
        x = model.empty_inputs()[0] if i % 2 else np.empty((1, 2, 4, 4), np.float32)
        x[...] = rng.standard_normal((1, 2, 4, 4))
        outs = model.run(x)
        want = [np.maximum(x, 0) if kind != "identity" else x.copy()]
        want += {"twice": [want[0]], "constant": [np.arange(3, dtype=np.float32)[None]]}.get(kind, [])
        assert all(np.array_equal(o, w) for o, w in zip(outs, want)), i
        for j, o in enumerate(outs):
            assert not np.shares_memory(o, x)
            assert not any(np.shares_memory(o, p) for p in outs[j + 1:])
        held.append((outs, [w.copy() for w in want]))
        x[...] = -7.0  # the caller reuses its input array
    for outs, want in held:
        assert all(np.array_equal(o, w) for o, w in zip(outs, want))
        for o in outs:
            o[...] = 99.0  # the caller may write its results: the model's constant is not one of them
    x = np.ones((1, 2, 4, 4), np.float32)
    outs = model.run(x)
    assert np.array_equal(outs[0], x) and (kind != "constant" or np.array_equal(outs[1], [[0.0, 1.0, 2.0]]))


# compile's thread count (issue 22 (b)) ------------------------------------------------------

def test_tvm_num_threads_sets_the_kernels_split_and_is_reported(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    data = models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), SHAPE)
    with caplog.at_level(logging.INFO, logger="sparks_tvm"):
        model = sparks_tvm.compile(data)
    assert int(model.target.attrs["num-cores"]) == 1
    assert (model.num_threads, model.threads_source) == (1, "TVM_NUM_THREADS")
    assert any("compiling for 1 CPU thread(s) (TVM_NUM_THREADS)" in r.getMessage() for r in caplog.records)
    x = inputs(1, seed=50)[0]
    path = model.export_library(str(tmp_path / "m.so"))
    loaded = sparks_tvm.load(path)
    assert (loaded.num_threads, loaded.threads_source) == (1, "TVM_NUM_THREADS")
    assert np.array_equal(loaded.run(x)[0], model.run(x)[0])


def test_the_import_default_is_reported_as_host_cores(monkeypatch):
    # import sparks_tvm sets TVM_NUM_THREADS when the user has not; that is not the user's choice.
    monkeypatch.setenv("TVM_NUM_THREADS", "5")
    monkeypatch.setattr(sparks_tvm, "_DEFAULT_TVM_NUM_THREADS", "5")
    assert host_threads() == (host_cpu_count(), "host cores")
    monkeypatch.setattr(sparks_tvm, "_DEFAULT_TVM_NUM_THREADS", None)
    assert host_threads() == (5, "TVM_NUM_THREADS")
    assert int(host_target().attrs["num-cores"]) == 5
    monkeypatch.delenv("TVM_NUM_THREADS")
    assert host_threads() == (host_cpu_count(), "host cores")


def test_explicit_num_cores_wins_and_a_mismatch_is_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    data = models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), SHAPE)
    mcpu = str(host_target().attrs["mcpu"])
    with caplog.at_level(logging.INFO, logger="sparks_tvm"):
        model = sparks_tvm.compile(data, target={"kind": "llvm", "mcpu": mcpu, "num-cores": 3})
    assert (model.num_threads, model.threads_source) == (3, "target num-cores")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("num-cores=3" in m and "TVM runs 1 here" in m for m in warnings), warnings


@pytest.mark.parametrize("value", ["0", "-2", "abc", "", "1.5"])
def test_a_bad_tvm_num_threads_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("TVM_NUM_THREADS", value)
    data = models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), SHAPE)
    with pytest.raises(SparksError, match=rf"TVM_NUM_THREADS='{value}' is not a positive integer"):
        sparks_tvm.compile(data)
    assert os.environ["TVM_NUM_THREADS"] == value
