"""LowerBinaryConv2d: before/after structure, recognised binarizers, negative cases."""

import numpy as np
import pytest
import tvm
from tvm import relax

from relay_passes import LoweringOptions, lower_binary_conv2d
from schedules.host import HostSchedules
from sparks_tvm.errors import NonBinaryWeightsError
from sparks_tvm.kernels import ConvGeometry, pack_indices, sparks_out_shape
from sparks_tvm.models import random_codebook
from sparks_tvm.reference import codes_to_bits

X_SHAPE = (2, 10, 9, 7)


def sparks_weight(rng, o=12, c=10, k=5):
    codebook = random_codebook(rng, k)
    idx = rng.integers(0, k, size=(o, c))
    idx[:k, 0] = np.arange(k)
    alpha = rng.choice([0.5, 1.5], size=o).astype(np.float32)
    return (codebook[idx] * alpha.reshape(-1, 1, 1, 1)).astype(np.float32)


def f32(v):
    return relax.const(np.float32(v))


BINARIZERS = {
    "sign": (lambda bb, x: bb.emit(relax.op.sign(x)), "sign"),
    "where_ge": (lambda bb, x: bb.emit(relax.op.where(bb.emit(relax.op.greater_equal(x, f32(0))), f32(1), f32(-1))), "ge"),
    "where_less": (lambda bb, x: bb.emit(relax.op.where(bb.emit(relax.op.less(x, f32(0))), f32(-1), f32(1))), "ge"),
    "where_gt": (lambda bb, x: bb.emit(relax.op.where(bb.emit(relax.op.greater(x, f32(0))), f32(1), f32(-1))), "gt"),
    "cast_affine": (
        lambda bb, x: bb.emit(relax.op.subtract(bb.emit(relax.op.multiply(
            bb.emit(relax.op.astype(bb.emit(relax.op.greater_equal(x, f32(0))), "float32")), f32(2))), f32(1))),
        "ge",
    ),
    # x + (sign(x) - x).detach()
    "ste_detach": (lambda bb, x: bb.emit(relax.op.add(x, bb.emit(relax.op.subtract(bb.emit(relax.op.sign(x)), x)))), "sign"),
    # sign(x) - g(x) + g(x), g = tanh here
    "ste_residue": (
        lambda bb, x: (lambda g: bb.emit(relax.op.add(bb.emit(relax.op.subtract(bb.emit(relax.op.sign(x)), g)), g)))(
            bb.emit(relax.op.tanh(x))),
        "sign",
    ),
}


def before_module(weight, binarizer="sign", strides=(1, 1), padding=(1, 1), groups=1, x_shape=X_SHAPE):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            b = BINARIZERS[binarizer][0](bb, x) if binarizer else bb.emit(relax.op.nn.relu(x))
            y = bb.emit(relax.op.nn.conv2d(b, relax.const(weight), strides=strides, padding=padding, groups=groups))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def run_pass(mod, **kw):
    after, report = lower_binary_conv2d(mod, LoweringOptions(schedules=HostSchedules(), **kw))
    return relax.transform.DeadCodeElimination(["main"])(after), report


def test_sparks_rewrite_structure(rng):
    w = sparks_weight(rng)
    after, report = run_pass(before_module(w))
    from relay_passes.binary_weights import analyze_binary_weights

    bw = analyze_binary_weights(w)
    geom = ConvGeometry(*X_SHAPE, out_channels=12)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            func = HostSchedules().schedule_sparks_conv2d(geom, 5, "sign").with_attr("global_symbol", "sparks_conv2d_0")
            gv = bb.add_func(func, "sparks_conv2d_0")
            acc = bb.emit(relax.call_tir(gv, [x, relax.const(codes_to_bits(bw.codebook), "int32"),
                                              relax.const(pack_indices(bw.idx, 5), "uint8")], relax.TensorType(sparks_out_shape(geom), "int32")))
            flt = bb.emit(relax.op.astype(acc, "float32"))
            y = bb.emit(relax.op.multiply(flt, relax.const(bw.alpha.reshape(1, -1, 1, 1), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    (rec,) = report
    assert (rec.kind, rec.codewords, rec.binarizer, rec.stride) == ("sparks", 5, "sign", (1, 1))
    assert "R.sign" not in after.script() and "R.nn.conv2d" not in after.script()


@pytest.mark.parametrize("name", sorted(BINARIZERS))
def test_binarizer_forms_recognised(rng, name):
    after, report = run_pass(before_module(sparks_weight(rng), name))
    assert report[0].kind == "sparks" and report[0].binarizer == BINARIZERS[name][1]
    assert "R.nn.conv2d" not in after.script()


def test_large_k_uses_dense_binary(rng):
    w = sparks_weight(rng, o=8, c=10, k=8)  # K=8 with 8 output channels: dense is cheaper
    after, report = run_pass(before_module(w))
    assert report[0].kind == "binary" and report[0].codewords == 8 and "dense is cheaper" in report[0].reason
    assert any("binary_conv2d" in gv.name_hint for gv in after.get_global_vars())


def test_5x5_binary_conv_is_dense_binary(rng):
    w = np.where(rng.random((6, 10, 5, 5)) < 0.5, -0.5, 0.5).astype(np.float32)
    after, report = run_pass(before_module(w, padding=(2, 2)))
    assert report[0].kind == "binary" and report[0].codewords is None


def test_stride2_asymmetric_padding_shape(rng):
    after, report = run_pass(before_module(sparks_weight(rng), strides=(2, 2), padding=(0, 1, 1, 0)))
    assert report[0].kind == "sparks" and report[0].out_hw == (4, 3)  # (9+0+1-3)//2+1, (7+1+0-3)//2+1


def test_non_binary_weights_strict_raises(rng):
    w = sparks_weight(rng)
    w[3] *= np.linspace(1, 2, w[3].size).reshape(w[3].shape).astype(np.float32)
    with pytest.raises(NonBinaryWeightsError, match="output channel 3"):
        run_pass(before_module(w))


def test_non_binary_weights_lenient_left_alone(rng):
    w = sparks_weight(rng)
    w[3, 0, 0, 0] = 0.123
    mod = before_module(w)
    after, report = run_pass(mod, strict=False)
    tvm.ir.assert_structural_equal(after, relax.transform.DeadCodeElimination(["main"])(mod))
    assert report[0].kind == "float" and "output channel 3" in report[0].reason


def test_grouped_conv_left_alone(rng):
    w = np.where(rng.random((10, 5, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    mod = before_module(w, groups=2)
    after, report = run_pass(mod)
    tvm.ir.assert_structural_equal(after, relax.transform.DeadCodeElimination(["main"])(mod))
    assert report[0].kind == "float" and "grouped" in report[0].reason


def test_float_input_left_alone(rng):
    mod = before_module(sparks_weight(rng), binarizer=None)
    after, report = run_pass(mod)
    tvm.ir.assert_structural_equal(after, relax.transform.DeadCodeElimination(["main"])(mod))
    assert report[0].kind == "float" and report[0].reason == "input is not binarized"


def test_lowered_module_runs_exactly(host, rng):
    """The rewritten module, built, equals conv2d(sign(x), W) computed exactly in numpy."""
    from sparks_tvm.reference import binarize, binary_conv2d_ref

    w = sparks_weight(rng)
    after, _ = run_pass(before_module(w, strides=(2, 2)))
    ex = tvm.compile(after, target=host)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    x[rng.random(X_SHAPE) < 0.2] = 0
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    alpha = np.abs(w).reshape(12, -1).max(axis=1)
    ints = binary_conv2d_ref(binarize(x, "sign"), np.sign(w).astype(np.int8), (2, 2), (1, 1, 1, 1))
    assert np.array_equal(got, ints.astype(np.float32) * alpha.reshape(1, -1, 1, 1))


def test_weight_bytes_reported(rng):
    """A K=5 Sparks conv stores 4-bit indices + the 5 codewords, below 1 bit per weight."""
    w = sparks_weight(rng)
    _, report = run_pass(before_module(w))
    (rec,) = report
    o, c = w.shape[:2]
    assert rec.weight_bytes == o * -(-c * 4 // 8) + 5 * 4
    assert rec.weight_bytes < rec.dense_1bit_bytes < rec.float32_bytes == 4 * o * c * 9
