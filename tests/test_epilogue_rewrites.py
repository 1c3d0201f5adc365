"""Epilogue rewrites: FoldResidualBias (relay_passes/fold_residual_bias.py) and PReLUAsMax
(relay_passes/prelu_as_max.py), and the fused kernels that take in a residual's shift."""

import numpy as np
import pytest
import tvm
from tvm import relax

from kernel_utils import relax_ops as ops_of
from relay_passes.fold_residual_bias import FoldResidualBias
from relay_passes.prelu_as_max import PReLUAsMax

SHAPE = (2, 3, 4, 5)
CH = (1, 3, 1, 1)


def module(build, inputs=2):
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(SHAPE, "float32")) for i in range(inputs)]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *xs))
        bb.emit_func_output(out)
    return bb.get()


def c(value):
    return relax.const(np.asarray(value, dtype="float32"), "float32")


def run(mod, *xs):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()


def inputs(seed, n=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def block_tail(bb, conv, residual):
    """``((conv * S + B) + residual) + C``: BatchNorm, the shortcut, the PReLU's shift."""
    rng = np.random.default_rng(0)
    y = bb.emit(relax.op.multiply(conv, c(rng.uniform(0.5, 2, CH))))
    y = bb.emit(relax.op.add(y, c(rng.standard_normal(CH))))
    y = bb.emit(relax.op.add(y, residual))
    return relax.op.add(y, c(rng.standard_normal(CH)))


def test_residual_sum_takes_both_shifts():
    before = module(block_tail)
    after = FoldResidualBias()(before)
    # multiply, one add of the folded shift onto the residual, the sum: no add left on top.
    assert sorted(ops_of(after)) == ["relax.add", "relax.add", "relax.multiply"], ops_of(after)
    top = after["main"].body.blocks[0].bindings[-1].value
    assert top.op.name == "relax.add"
    xs = inputs(1)
    np.testing.assert_allclose(run(after, *xs), run(before, *xs), rtol=1e-6, atol=1e-6)


def test_residual_on_the_left_and_a_subtracted_shift():
    def build(bb, conv, residual):
        y = bb.emit(relax.op.add(bb.emit(relax.op.multiply(conv, c(2.0))), c(0.5)))
        y = bb.emit(relax.op.add(residual, y))
        return relax.op.subtract(y, c([[[1.0]], [[2.0]], [[3.0]]]))

    before = module(build)
    after = FoldResidualBias()(before)
    assert len(ops_of(after)) == 3
    xs = inputs(2)
    np.testing.assert_allclose(run(after, *xs), run(before, *xs), rtol=1e-6, atol=1e-6)


def test_scale_on_top_stays_on_top():
    """``((conv * 2 + 1) + r) * 3``: the inner sum is rewritten, the scale is not pulled in."""
    def build(bb, conv, r):
        y = bb.emit(relax.op.add(bb.emit(relax.op.add(bb.emit(relax.op.multiply(conv, c(2.0))), c(1.0))), r))
        return relax.op.multiply(y, c(3.0))

    before = module(build)
    after = FoldResidualBias()(before)
    assert len(ops_of(after)) == len(ops_of(before))
    assert after["main"].body.blocks[0].bindings[-1].value.op.name == "relax.multiply"
    xs = inputs(5)
    np.testing.assert_allclose(run(after, *xs), run(before, *xs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["no-scale", "shift-on-residual", "broadcast-side"])
def test_residual_sums_left_alone(case):
    if case == "no-scale":  # a plain sum of two tensors
        def build(bb, conv, r):
            return relax.op.add(conv, r)
    elif case == "shift-on-residual":  # already conv * S + (r + B)
        def build(bb, conv, r):
            return relax.op.add(bb.emit(relax.op.multiply(conv, c(2.0))), bb.emit(relax.op.add(r, c(1.0))))
    else:  # one side broadcasts up to the result's shape
        def build(bb, conv, r):
            small = bb.emit(relax.op.mean(r, axis=[0], keepdims=True))
            return relax.op.add(bb.emit(relax.op.add(bb.emit(relax.op.multiply(conv, c(2.0))), c(1.0))), small)
    before = module(build)
    after = FoldResidualBias()(before)
    assert ops_of(after) == ops_of(before)


def prelu(slopes):
    def build(bb, x):
        return relax.op.nn.prelu(x, c(slopes), axis=1)

    return module(build, inputs=1)


@pytest.mark.parametrize("maxnum", [False, True])
def test_prelu_with_slopes_in_unit_interval_is_a_max(maxnum):
    before = prelu([0.0, 0.25, 1.0])
    after = PReLUAsMax(maxnum=maxnum)(before)
    assert "relax.nn.prelu" not in ops_of(after)
    x = inputs(3, 1)[0]
    x[0, :, 0, :] = 0.0
    x[1, :, 0, :] = -0.0
    want = run(before, x)
    got = run(after, x)
    # The same values bit for bit, the sign of zeros included.
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("slopes", [[0.5, -0.1, 0.2], [0.5, 1.5, 0.2], [np.nan, 0.1, 0.2]])
def test_prelu_other_slopes_left_alone(slopes):
    before = prelu(slopes)
    after = PReLUAsMax(maxnum=True)(before)
    assert "relax.nn.prelu" in ops_of(after)


def test_block_epilogue_runs_inside_the_kernel_on_arm():
    """A Bi-Real block compiled for arm_cpu: the residual's shift (an in-function producer)
    is inlined into the Sparks kernel's epilogue, the PReLU is a max, and nothing runs after
    the kernel's output block; compiled for the host, the block equals onnxruntime."""
    import onnxruntime as ort
    from tvm import s_tir

    import sparks_tvm
    from sparks_tvm import models as zoo

    blk = zoo.make_modules()["BasicBinaryBlock"](np.random.default_rng(0), 19, 19, 1, 8).eval()
    data = zoo.export_onnx(blk, (2, 19, 9, 7))
    x = np.random.default_rng(4).standard_normal((2, 19, 9, 7)).astype(np.float32)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = sparks_tvm.compile(data, target="llvm").run(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    from relay_passes import pipeline
    from sparks_tvm import compiler, frontend
    from sparks_tvm.target import resolve_target

    target = resolve_target("arm_cpu")
    proto = frontend.load_onnx(data)
    mod, _ = compiler.build_relax(proto, frontend.input_specs(proto, None), target, fuse_epilogues=True)
    phases = pipeline.host_phases(target)
    with target:
        mod = tvm.transform.Sequential(phases[0][1] + phases[1][1])(mod)
    fused = [(g.name_hint, f) for g, f in mod.functions_items() if g.name_hint.startswith("fused_sparks")]
    assert len(fused) == 1 and "prelu_max" in fused[0][0], [g.name_hint for g, _ in mod.functions_items()]
    sch = s_tir.Schedule(fused[0][1])
    assert sch.get_consumers(sch.get_sblock("out")) == []
    assert "llvm.maxnum" in fused[0][1].script()
