"""The GPU pooling rule (schedules/cuda_window_reduction.py): what it claims, and exactness."""

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir
from tvm.script import relax as R

from kernel_utils import kernel_bodies
from schedules.cuda_window_reduction import MAX_TAPS, WindowReduction, window_taps

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")


@tvm.script.ir_module
class Ops:
    @R.function
    def avg(x: R.Tensor((2, 5, 13, 14), "float32")):
        with R.dataflow():
            y = R.nn.avg_pool2d(x, pool_size=(2, 2), strides=(2, 2), ceil_mode=True, count_include_pad=False)
            R.output(y)
        return y

    @R.function
    def mx(x: R.Tensor((2, 5, 13, 14), "float32")):
        with R.dataflow():
            y = R.nn.max_pool2d(x, pool_size=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1))
            R.output(y)
        return y

    @R.function
    def ln(x: R.Tensor((64, 8), "float32"), g: R.Tensor((8,), "float32"), b: R.Tensor((8,), "float32")):
        with R.dataflow():
            y = R.nn.layer_norm(x, g, b, axes=[-1])
            R.output(y)
        return y

    @R.function
    def mm(x: R.Tensor((8, 256), "float32"), w: R.Tensor((256, 16), "float32")):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


def _prim_funcs():
    mod = relax.transform.LegalizeOps()(Ops)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _serialized(func):
    """The rule's schedule with thread bindings dropped, so that it builds and runs on a CPU."""
    original = s_tir.Schedule.bind
    s_tir.Schedule.bind = lambda self, loop, thread: None
    try:
        return WindowReduction().apply(func, CUDA, False)
    finally:
        s_tir.Schedule.bind = original


def test_claims_pooling_windows_not_matmuls():
    funcs = _prim_funcs()
    assert window_taps(funcs["avg_pool2d"]) == 4 and window_taps(funcs["max_pool2d"]) == 9
    assert window_taps(funcs["matmul"]) == 256 > MAX_TAPS
    assert WindowReduction().apply(funcs["matmul"], CUDA, False) is None
    for name in ("avg_pool2d", "max_pool2d"):
        assert WindowReduction().apply(funcs[name], CUDA, False) is not None


@pytest.mark.parametrize("name", ["avg_pool2d", "max_pool2d"])
def test_pools_exact_with_threads_serialized(name):
    """Same result as TVM's unscheduled compute of the op, bit for bit (same tap order)."""
    func = _prim_funcs()[name]
    x = np.random.default_rng(0).standard_normal((2, 5, 13, 14)).astype(np.float32)
    x[:, :, ::4, ::3] = 0.0
    outs = []
    for f in (func, _serialized(func).mod["main"]):
        lib = tvm.compile(f.with_attr("global_symbol", "main"), target="llvm")
        out = tvm.runtime.tensor(np.zeros((2, 5, 7, 7), np.float32))
        lib["main"](tvm.runtime.tensor(x), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    if name == "avg_pool2d":  # ceil mode, padding not counted: the last row averages 2 taps
        np.testing.assert_allclose(outs[1][:, :, 6, 0], x[:, :, 12, 0:2].mean(axis=-1), rtol=1e-6)


def test_average_pool_is_one_kernel_with_a_register_accumulator():
    sch = WindowReduction().apply(_prim_funcs()["avg_pool2d"], CUDA, False)
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=CUDA)
    src = lib.mod.imports[0].inspect_source()
    assert src.count("__global__ void") == 2  # declaration + definition of one kernel
    assert "pool_sum_local" in src and "__shfl" not in src


def test_two_small_reductions_take_the_block_by_block_mapping():
    """A layer norm over 8 values has two small reductions (mean, variance): not the one-kernel
    case, so the rule maps block by block (dlight's Fallback) -- still exact."""
    func = _prim_funcs()["layer_norm"]
    assert window_taps(func) == 8
    with pytest.raises(s_tir.ScheduleError):
        WindowReduction._one_kernel(func, CUDA)
    rng = np.random.default_rng(1)
    args = [rng.standard_normal(shape).astype(np.float32) for shape in ((64, 8), (8,), (8,))]
    outs = []
    for f in (func, _serialized(func).mod["main"]):
        lib = tvm.compile(f.with_attr("global_symbol", "main"), target="llvm")
        out = tvm.runtime.tensor(np.zeros((64, 8), np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])


def test_model_pools_use_the_rule(tmp_path):
    """In a compiled model (the tiny net's downsampling shortcut), the average pool is the
    rule's one-thread-per-output kernel, not dlight's shuffle reduction."""
    import sparks_tvm
    from sparks_tvm import models

    path = tmp_path / "tiny.onnx"
    models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), (1, 3, 9, 9), path)
    compiled = sparks_tvm.compile(path, target="cuda")
    pools = kernel_bodies(compiled.cuda_source(), "avg_pool2d").values()
    assert pools and all("pool_sum_local" in k and "__shfl" not in k for k in pools)
