"""The NEON max pool (sparks_tvm.kernels.max_pool2d_neon) and the pass that lowers to it.

The kernel is plain vector TIR, so it builds for the x86 host too: exact here against the
readable reference on shapes that break naive code; the emulated-Pi ResNet-18 test runs it
cross-compiled inside the whole model.
"""

import numpy as np
import pytest
import tvm
from tvm import relax

from kernel_utils import run_on_host
from relay_passes import LowerMaxPool2d
from schedules.arm import ArmSchedules
from schedules.host import HostSchedules
from sparks_tvm.kernels.max_pool2d_neon import max_pool2d_neon_primfunc, max_pool2d_ref, out_size, supports
from sparks_tvm.target import resolve_target

HOST = resolve_target("llvm")


def out_shape(shape, k, s, p):
    return (shape[0], shape[1], out_size(shape[2], k[0], s[0], p[0], p[2]), out_size(shape[3], k[1], s[1], p[1], p[3]))


CASES = [
    ((1, 3, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)),  # the ResNet-18 stem pool
    ((2, 5, 13, 17), (3, 3), (2, 2), (1, 1, 1, 1)),  # odd sizes, batch 2
    ((1, 4, 9, 11), (2, 2), (2, 2), (0, 0, 0, 0)),  # even window, no padding
    ((1, 2, 10, 30), (3, 3), (1, 1), (1, 1, 1, 1)),  # stride 1
    ((1, 2, 7, 9), (3, 2), (3, 3), (1, 0, 1, 0)),  # stride 3 (scalar), asymmetric window
    ((1, 1, 5, 6), (5, 5), (2, 2), (2, 2, 2, 2)),  # window as large as the image
]


@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_neon_max_pool_exact(shape, k, s, p):
    osh = out_shape(shape, k, s, p)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x[0, 0, 0, :3] = -np.inf  # edges that must not win
    got = run_on_host(max_pool2d_neon_primfunc(shape, k, s, p, osh), [x], osh, "float32")
    assert np.array_equal(got, max_pool2d_ref(x, k, s, p, osh))


def test_windows_outside_the_image_are_refused():
    assert not supports((1, 1, 4, 4), (2, 2), (1, 1), (2, 2, 2, 2), (1, 1, 7, 7))
    with pytest.raises(ValueError, match="outside the image"):
        max_pool2d_neon_primfunc((1, 1, 4, 4), (2, 2), (1, 1), (2, 2, 2, 2), (1, 1, 7, 7))


def _pool_module(shape, **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.max_pool2d(x, **attrs))
        bb.emit_func_output(y)
    return bb.get()


def test_pass_lowers_pools_on_arm_and_keeps_the_rest():
    mod = _pool_module((2, 8, 15, 15), pool_size=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1))
    lowered = LowerMaxPool2d(ArmSchedules())(mod)
    assert "max_pool2d_0" in [g.name_hint for g in lowered.get_global_vars()]
    x = np.random.default_rng(1).standard_normal((2, 8, 15, 15)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=HOST), tvm.cpu())
    want = max_pool2d_ref(x, (3, 3), (2, 2), (1, 1, 1, 1), (2, 8, 8, 8))
    assert np.array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), want)
    # the host has no pooling kernel; dilated pools stay with stock TVM
    tvm.ir.assert_structural_equal(LowerMaxPool2d(HostSchedules())(mod), mod)
    dilated = _pool_module((1, 4, 9, 9), pool_size=(2, 2), dilation=(2, 2))
    tvm.ir.assert_structural_equal(LowerMaxPool2d(ArmSchedules())(dilated), dilated)
