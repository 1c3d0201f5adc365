"""The NEON float conv (sparks_tvm.kernels.float_conv2d_neon) against a float64 reference.

Plain vector TIR, so it builds for the x86 host too; the emulated-Pi ResNet-18 test runs it
cross-compiled inside the whole model (stem and shortcuts).
"""

import numpy as np
import pytest
from tvm import s_tir

from kernel_utils import run_on_host

from schedules.arm import ArmSchedules, apply_neon_out_schedule
from sparks_tvm.kernels import ConvGeometry, pack_float_weights
from sparks_tvm.kernels.float_conv2d_neon import float_conv2d_neon_primfunc, supports


def conv_ref(x, w, stride, padding):
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding[0], padding[2]), (padding[1], padding[3])))
    n, c, h, wd = xp.shape
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride[0] + 1, (wd - kw) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, :, dy:dy + stride[0] * (oh - 1) + 1:stride[0], dx:dx + stride[1] * (ow - 1) + 1:stride[1]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx].astype(np.float64))
    return out


CASES = [
    ConvGeometry(1, 3, 20, 22, 10, kernel=(7, 7), stride=(2, 2), padding=(3, 3, 3, 3)),  # a stem, odd O
    ConvGeometry(2, 5, 9, 13, 8),  # 3x3 stride 1, batch 2, a 5-column tail tile
    ConvGeometry(1, 16, 14, 14, 20, kernel=(1, 1), stride=(2, 2), padding=(0, 0, 0, 0)),  # shortcut
    ConvGeometry(1, 4, 3, 5, 3, padding=(1, 0, 2, 1)),  # asymmetric padding, one-column tail
    ConvGeometry(1, 40, 9, 9, 16, stride=(2, 1)),  # many channels (the channel loop), mixed strides
    # 1x1 stride 1: flattened pixels (7 * 9 = 63: 5 whole tiles in a loop and a 3-lane tail), odd C
    ConvGeometry(2, 7, 7, 9, 10, kernel=(1, 1), padding=(0, 0, 0, 0)),
    ConvGeometry(1, 6, 2, 5, 3, kernel=(1, 1), padding=(0, 0, 0, 0)),  # one short tile
    # more than 9 taps (row tiles): 8 + 5 columns, batch 2; asymmetric padding, 8 + 1 columns
    ConvGeometry(2, 2, 9, 13, 9, kernel=(5, 5), padding=(2, 2, 2, 2)),
    ConvGeometry(1, 3, 15, 19, 16, kernel=(7, 7), stride=(2, 2), padding=(3, 2, 1, 3)),
]


@pytest.mark.parametrize("geom", CASES)
def test_neon_float_conv_matches_reference(geom):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    w = rng.standard_normal((geom.out_channels, geom.in_channels, *geom.kernel)).astype(np.float32)
    func = apply_neon_out_schedule(s_tir.Schedule(float_conv2d_neon_primfunc(geom))).mod["main"]
    got = run_on_host(func, [x, pack_float_weights(w, 8)], geom.out_shape, "float32")
    np.testing.assert_allclose(got, conv_ref(x, w, geom.stride, geom.padding), rtol=1e-4, atol=1e-4)


def test_arm_schedules_pick_the_neon_float_conv():
    sched = ArmSchedules()
    assert sched.float_lanes == 8
    s_tir.Schedule(sched.schedule_float_conv2d(CASES[0])).get_sblock("float_neon")
    odd = ConvGeometry(1, 3, 20, 20, 8, stride=(3, 3))
    assert not supports(odd) and "float_neon" not in str(sched.schedule_float_conv2d(odd))
