"""FoldAffineChains (relay_passes/fold_affine.py): constant arithmetic chains as one multiply-add."""

import numpy as np
import pytest
import tvm
from tvm import relax

from kernel_utils import relax_ops as ops_of
from relay_passes.fold_affine import FoldAffineChains

SHAPE = (2, 3, 4, 5)


def module(build, shape=SHAPE, dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def c(value, dtype="float32"):
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def run(mod, x):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def batch_norm_chain(bb, x):
    """What DecomposeOpsForInference leaves after a conv: scale, then BatchNorm."""
    rng = np.random.default_rng(0)
    ch = (1, 3, 1, 1)
    alpha = rng.uniform(0.5, 2, ch)
    mean, std = rng.standard_normal(ch), rng.uniform(0.5, 2, ch)
    gamma, beta = rng.standard_normal(ch), rng.standard_normal(ch)
    y = bb.emit(relax.op.multiply(x, c(alpha)))
    y = bb.emit(relax.op.subtract(y, c(mean)))
    y = bb.emit(relax.op.divide(y, c(std)))
    y = bb.emit(relax.op.multiply(y, c(gamma)))
    return relax.op.add(y, c(beta))


def test_batch_norm_chain_becomes_one_multiply_add():
    before = module(batch_norm_chain)
    after = FoldAffineChains()(before)
    assert sorted(ops_of(after)) == ["relax.add", "relax.multiply"], ops_of(after)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-5, atol=1e-5)


def test_reversed_operands_and_scalars():
    def build(bb, x):
        y = bb.emit(relax.op.subtract(c(2.0), x))  # 2 - x
        y = bb.emit(relax.op.multiply(c([[[0.5]], [[1.5]], [[-2.0]]]), y))  # per channel, (3, 1, 1)
        y = bb.emit(relax.op.add(y, c(1.0)))
        return relax.op.divide(y, c(4.0))

    before = module(build)
    after = FoldAffineChains()(before)
    assert len(ops_of(after)) == 2
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["one-op", "const-over-x", "broadcast-up", "integer", "divide-by-zero"])
def test_left_alone(case):
    if case == "one-op":
        build = lambda bb, x: relax.op.multiply(x, c(2.0))  # noqa: E731
    elif case == "const-over-x":
        def build(bb, x):
            return relax.op.divide(c(1.0), bb.emit(relax.op.add(x, c(1.0))))
    elif case == "broadcast-up":  # the constant is larger than x: the result is not x's shape
        def build(bb, x):
            return relax.op.add(bb.emit(relax.op.multiply(x, c(2.0))), c(np.ones((2, 2, 3, 4, 5))))
    elif case == "integer":
        def build(bb, x):
            return relax.op.add(bb.emit(relax.op.multiply(x, c(2, "int32"))), c(1, "int32"))
    else:
        def build(bb, x):
            return relax.op.add(bb.emit(relax.op.divide(x, c(0.0))), c(1.0))
    dtype = "int32" if case == "integer" else "float32"
    before = module(build, dtype=dtype)
    after = FoldAffineChains()(before)
    assert ops_of(after) == ops_of(before)
