"""The float parts of a model: packed float conv kernel, its pass, and the CPU pipeline."""

import numpy as np
import pytest
import tvm
from tvm import relax

from schedules.host import HostSchedules
from sparks_tvm.compiler import relax_pipeline
from sparks_tvm.kernels import ConvGeometry, pack_float_weights
from sparks_tvm.target import host_target
from relay_passes import LowerFloatConv2d


def conv_ref(x, w, stride, padding):
    """float64 direct convolution (NCHW, OIHW), padding (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding[0], padding[2]), (padding[1], padding[3])))
    oh = (xp.shape[2] - kh) // stride[0] + 1
    ow = (xp.shape[3] - kw) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, :, dy:dy + stride[0] * oh:stride[0], dx:dx + stride[1] * ow:stride[1]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx].astype(np.float64))
    return out


GEOMS = [
    ConvGeometry(1, 3, 23, 29, 20, kernel=(7, 7), stride=(2, 2), padding=(3, 3, 3, 3)),  # stem-like, odd
    ConvGeometry(2, 17, 9, 7, 33, kernel=(1, 1), stride=(1, 1), padding=(0, 0, 0, 0)),  # shortcut-like
    ConvGeometry(1, 5, 11, 13, 7, kernel=(3, 3), stride=(1, 2), padding=(1, 0, 2, 1)),  # asymmetric
]


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"{g.in_channels}x{g.kernel[0]}s{g.stride[0]}")
@pytest.mark.parametrize("vector_bytes", [64, 16])
def test_float_conv_kernel_matches_reference(rng, geom, vector_bytes):
    sched = HostSchedules(cores=2, vector_bytes=vector_bytes)
    lib = tvm.compile(sched.schedule_float_conv2d(geom).with_attr("global_symbol", "main"), target=host_target()).jit()
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    x[..., 0] = 0.0
    w = rng.standard_normal((geom.out_channels, geom.in_channels) + geom.kernel).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.float32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(pack_float_weights(w, sched.float_lanes), dev), out)
    np.testing.assert_allclose(out.numpy(), conv_ref(x, w, geom.stride, geom.padding), rtol=1e-4, atol=1e-4)


def test_pack_float_weights_layout(rng):
    w = rng.standard_normal((20, 3, 2, 2)).astype(np.float32)
    packed = pack_float_weights(w, 16)
    assert packed.shape == (2, 3, 2, 2, 16)
    assert packed[1, 2, 1, 0, 3] == w[19, 2, 1, 0] and not packed[1, :, :, :, 4:].any()


def _conv_module(rng, shape, wshape, **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    w = relax.const(rng.standard_normal(wshape).astype(np.float32))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, **attrs))
            z = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(np.float32(0.5)))))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    return bb.get()


def test_float_conv_pass_rewrites_and_matches(rng):
    mod = _conv_module(rng, (2, 6, 15, 15), (10, 6, 3, 3), strides=(2, 2), padding=(1, 1))
    target = host_target()
    lowered = LowerFloatConv2d(HostSchedules.for_target(target))(mod)
    assert "R.nn.conv2d" in mod["main"].script() and "R.nn.conv2d" not in lowered["main"].script()
    assert any(gv.name_hint == "float_conv2d_0" for gv in lowered.get_global_vars())
    x = rng.standard_normal((2, 6, 15, 15)).astype(np.float32)
    dev = tvm.cpu()
    got = relax.VirtualMachine(tvm.compile(lowered, target, relax_pipeline=relax_pipeline(target)), dev)["main"](
        tvm.runtime.tensor(x, dev)).numpy()
    want = relax.VirtualMachine(tvm.compile(mod, target), dev)["main"](tvm.runtime.tensor(x, dev)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float_conv_pass_leaves_unsupported_convs(rng):
    mod = _conv_module(rng, (1, 4, 8, 8), (4, 2, 3, 3), groups=2, padding=(1, 1))
    lowered = LowerFloatConv2d(HostSchedules())(mod)
    assert "R.nn.conv2d" in lowered["main"].script()


def test_pipeline_schedules_elementwise(rng):
    """The fused add+relu gets parallel/vectorized loops (stock tvm.compile leaves it serial)."""
    target = host_target()
    mod = _conv_module(rng, (1, 64, 32, 32), (64, 64, 1, 1))
    mod = LowerFloatConv2d(HostSchedules.for_target(target))(mod)
    pipeline = relax_pipeline(target)
    with tvm.transform.PassContext():
        after = pipeline(mod)
    funcs = {gv.name_hint: f for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    elementwise = [f for name, f in funcs.items() if "relu" in name]
    assert elementwise, sorted(funcs)
    text = elementwise[0].script()
    assert "T.vectorized" in text and "T.parallel" in text
