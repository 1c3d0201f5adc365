"""The NEON dense binary kernel (sparks_tvm.kernels.binary_conv2d_neon) against the numpy reference.

The kernel is plain vector TIR, so it also builds for the x86 host: these run here, bit for
bit, on shapes that break naive code (both of its paths: the padding-corrected one and the
masked one taken when an activation is 0). tests/test_arm_emulated.py runs whole compiled
layers with it on the emulated Pi.
"""

import numpy as np
import pytest
from tvm import s_tir

from kernel_utils import run_on_host

from schedules.arm import ArmSchedules, apply_neon_out_schedule
from schedules.host import HostSchedules
from sparks_tvm import reference as ref
from sparks_tvm.kernels import ConvGeometry
from sparks_tvm.kernels.binary_conv2d_neon import (NeonBinaryPlan, accumulator_dtype, binary_conv2d_neon_primfunc,
                                                   default_plan, pack_weights, supports)
from sparks_tvm.target import resolve_target

HOST = resolve_target("llvm")


def run(geom, mode, plan=None, zeros=0.0, shift=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    hit = rng.random(x.shape) < zeros
    x[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0.0, -0.0)  # exact zeros of both signs: Sign(0) = 0
    w = np.where(rng.random((geom.out_channels, geom.in_channels, *geom.kernel)) < 0.5, -1, 1).astype(np.int8)
    args = [x, pack_weights(geom, w, plan)]
    binarized = x
    if shift:
        b = rng.standard_normal(geom.in_channels).astype(np.float32)
        binarized = x + b[None, :, None, None]  # the same float add as the kernel
        args.append(b)
    want = ref.binary_conv2d_ref(ref.binarize(binarized, mode), w, geom.stride, geom.padding)
    func = binary_conv2d_neon_primfunc(geom, mode, plan, shift=shift)
    func = apply_neon_out_schedule(s_tir.Schedule(func)).mod["main"]
    return run_on_host(func, args, geom.out_shape), want


CASES = [
    # odd sizes, padded borders, C not a multiple of 8 (a partial channel byte), O < 8
    (ConvGeometry(1, 13, 6, 7, 5), "sign", None),
    # stride 2, batch 2, odd width, O not a multiple of the output block
    (ConvGeometry(2, 30, 9, 11, 7, stride=(2, 2)), "ge", None),
    # asymmetric padding at stride 2, "gt" binarizer
    (ConvGeometry(1, 5, 9, 13, 6, stride=(2, 2), padding=(0, 1, 2, 0)), "gt", None),
    # no padding, batch 3, an odd count of channel bytes (C = 200: 25 bytes, 13 pairs)
    (ConvGeometry(3, 200, 5, 5, 3, padding=(0, 0, 0, 0)), "sign", None),
    # 1x1 kernel, stride 2
    (ConvGeometry(1, 70, 8, 8, 9, kernel=(1, 1), stride=(2, 2), padding=(0, 0, 0, 0)), "ge", None),
    # 7-pixel tiles, output-channel chunks as tasks, a last block of fewer registers (40 = 16 + 16 + 8)
    (ConvGeometry(1, 64, 7, 7, 40), "sign", NeonBinaryPlan(7, 2, 3)),
    # 3-pixel tiles over a 10-wide row (a last tile of 1), 3 registers, O = 45
    (ConvGeometry(1, 33, 10, 10, 45), "ge", NeonBinaryPlan(3, 3, 1)),
    # one pixel, 5x5 kernel
    (ConvGeometry(1, 9, 1, 1, 11, kernel=(5, 5), padding=(2, 2, 2, 2)), "ge", None),
]


@pytest.mark.parametrize("zeros", [0.0, 0.2])
@pytest.mark.parametrize("geom,mode,plan", CASES)
def test_neon_binary_kernel_exact(geom, mode, plan, zeros):
    got, want = run(geom, mode, plan, zeros=zeros)
    assert np.array_equal(got, want), int((got != want).sum())


@pytest.mark.parametrize("geom", [ConvGeometry(2, 13, 6, 21, 5), ConvGeometry(1, 20, 9, 17, 6, stride=(2, 2))])
def test_tiny_values_take_the_masked_path_exactly(geom):
    # The zero test flags |v| < 2**-125 (subnormals, the smallest normals) as a possible 0: the
    # flagged channel bytes take the masked path, which must still give such values their sign.
    rng = np.random.default_rng(3)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    tiny = np.array([1e-45, -1e-40, 2.0 ** -126, -(2.0 ** -126), -(2.0 ** -125) * 0.99], np.float32)
    n, c, h, w = geom.in_shape
    x[:, c - 1].flat[rng.choice(h * w, size=5, replace=False)] = tiny  # the partial last byte
    x[:, 2, 1, 3] = 2.0 ** -125  # the smallest value the test does not flag
    x[-1, 9, 0, w - 1] = -0.0
    w8 = np.where(rng.random((geom.out_channels, c, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    want = ref.binary_conv2d_ref(ref.binarize(x, "sign"), w8, geom.stride, geom.padding)
    func = apply_neon_out_schedule(s_tir.Schedule(binary_conv2d_neon_primfunc(geom, "sign"))).mod["main"]
    got = run_on_host(func, [x, pack_weights(geom, w8)], geom.out_shape)
    assert np.array_equal(got, want), int((got != want).sum())


def test_all_zero_input_and_folded_shift():
    got, want = run(ConvGeometry(1, 4, 4, 4, 4), "sign", zeros=1.0)
    assert np.array_equal(got, want) and not want.any()
    got, want = run(ConvGeometry(2, 19, 11, 13, 21), "sign", shift=True)
    assert np.array_equal(got, want)


def test_default_plan_and_limits():
    # rows of a multiple of 4: 4 pixels x 32 output channels
    assert default_plan(ConvGeometry(1, 64, 56, 56, 64)) == NeonBinaryPlan(4, 4, 1)
    # 7- and 14-wide rows: 7 pixels x 16 channels (no padding pixels); 7x7 on 4 cores: 7 tiles,
    # so output blocks split into tasks
    assert default_plan(ConvGeometry(1, 256, 14, 14, 256)) == NeonBinaryPlan(7, 2, 1)
    plan = default_plan(ConvGeometry(1, 512, 7, 7, 512), cores=4)
    assert (plan.pixels, plan.o_regs, plan.o_chunks) == (7, 2, 2)
    assert default_plan(ConvGeometry(1, 8, 3, 3, 8)).o_regs == 1
    assert supports(ConvGeometry(1, 8, 9, 9, 8, kernel=(5, 5), padding=(2, 2, 2, 2)))
    assert not supports(ConvGeometry(1, 8, 9, 9, 8, kernel=(7, 7), padding=(3, 3, 3, 3)))
    with pytest.raises(ValueError, match="at most 25 taps"):
        binary_conv2d_neon_primfunc(ConvGeometry(1, 8, 9, 9, 8, kernel=(7, 7), padding=(3, 3, 3, 3)), "sign")
    with pytest.raises(ValueError, match="o_chunks"):
        binary_conv2d_neon_primfunc(ConvGeometry(1, 8, 9, 9, 8), "sign", NeonBinaryPlan(4, 1, 3))
    with pytest.raises(ValueError, match="shape"):
        pack_weights(ConvGeometry(1, 8, 9, 9, 8), np.ones((8, 9, 3, 3), np.int8))
    # mismatches <= C * taps: uint16 up to 7281 channels at 3x3
    assert accumulator_dtype(ConvGeometry(1, 7281, 3, 3, 1)) == "uint16"
    assert accumulator_dtype(ConvGeometry(1, 7282, 3, 3, 1)) == "int32"
    assert not supports(ConvGeometry(1, 7282, 3, 3, 1))


def test_arm_schedules_pick_the_neon_binary_kernel():
    sched = ArmSchedules.for_target(resolve_target("arm_cpu"))
    assert sched.tuned_kinds == ()
    s_tir.Schedule(sched.schedule_binary_conv2d(ConvGeometry(1, 16, 8, 8, 16), "sign")).get_sblock("binary_neon")
    # 7x7 binary kernels: the host core's kernel
    wide = ConvGeometry(1, 16, 9, 9, 16, kernel=(7, 7), padding=(3, 3, 3, 3))
    blocks = str(sched.schedule_binary_conv2d(wide, "sign"))
    assert "binary_neon" not in blocks and "mismatch" in blocks
    generic = ArmSchedules(neon_binary=False)
    assert generic.tuned_kinds == ("binary",)
    assert "binary_neon" not in str(generic.schedule_binary_conv2d(ConvGeometry(1, 16, 8, 8, 16), "sign"))


def test_arm_picks_sparks_or_dense_by_its_instruction_model():
    """The ARM model reproduces the counted choice (benchmarks/results/arm_icount.json) and
    the lowering follows it; the host keeps the BOPs model."""
    from relay_passes import pipeline
    from sparks_tvm import frontend
    from sparks_tvm.cost import RESNET18_BINARY_LAYERS
    from sparks_tvm.models import random_codebook

    sched = ArmSchedules()
    geoms = [ConvGeometry(1, c, s, s, o, stride=(st, st)) for c, o, s, st in RESNET18_BINARY_LAYERS]
    assert all(sched.sparks_is_cheaper(g, 16) for g in geoms)  # K=16: Sparks everywhere
    assert sched.sparks_is_cheaper(geoms[0], 32) and not sched.sparks_is_cheaper(geoms[0], 64)
    assert sched.sparks_is_cheaper(geoms[-1], 64)  # 512->512 7x7: Sparks even at K=64
    # 128->128 28x28 K=64: dense (3.31 M counted, kernel) below Sparks (3.42 M, whole layer)
    assert not sched.sparks_is_cheaper(geoms[2], 64)
    assert sched.sparks_is_cheaper(geoms[3], 64)  # 128->256 stride 2 K=64: 1.58 vs 1.86 M
    assert ArmSchedules(neon_binary=False).sparks_is_cheaper(geoms[0], 64)

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = random_codebook(rng, 64)[rng.integers(0, 64, size=(80, 128))].astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Sign", ["input"], ["a"]), helper.make_node("Conv", ["a", "w"], ["output"], pads=[1] * 4)],
        "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 128, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 80, 28, 28])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    kinds = {}
    for name, target_sched in (("arm", ArmSchedules()), ("host", HostSchedules())):
        _, records = pipeline.lower(frontend.import_graph(proto, frontend.input_specs(proto)),
                                    pipeline.PipelineOptions(schedules=target_sched))
        kinds[name] = [r.kind for r in records]
    # K=64 128->80 28x28: BOPs say Sparks, the NEON instruction model dense
    assert kinds == {"arm": ["binary"], "host": ["sparks"]}


@pytest.mark.parametrize("geom", [ConvGeometry(1, 64, 8, 8, 64), ConvGeometry(1, 64, 9, 14, 32, stride=(2, 2))])
def test_aarch64_build_is_the_register_tiled_block(geom):
    """The aarch64 build's fast path in its assembly: each tap row's words broadcast by
    post-indexed ``ld1r``, the weight registers in one post-indexed ``ld1``, ``eor``/``cnt``/
    ``uadalp`` per accumulator, and no vector register spilled to the stack inside the block
    (the emulated-Pi tests check the values and the counts)."""
    import re

    import tvm

    from sparks_tvm.kernels import binary_neon_asm

    plan = default_plan(geom)
    func = binary_conv2d_neon_primfunc(geom, "ge", plan, aarch64=True)
    asm = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("arm_cpu")).mod.inspect_source("asm")
    post = "#2" if geom.stride[1] == 1 else r"x\d+"
    assert re.search(rf"ld1r\s+\{{\s*v\d+\.8h\s*\}},\s*\[x\d+\],\s*{post}", asm)
    assert re.search(rf"ld1\s+\{{[^}}]*\}},\s*\[x\d+\],\s*#{16 * plan.o_regs}", asm)
    steps = len(re.findall(r"\buadalp\s+v\d+\.8h,\s*v\d+\.16b", asm))
    rows = geom.kernel[0]
    assert steps >= rows * geom.kernel[1] * plan.pixels * plan.o_regs  # one block per tap row, at least
    block = binary_neon_asm._asm_text(plan.pixels, plan.o_regs, geom.stride[1], geom.kernel[1])
    assert "str" not in block and block.count("uadalp") == geom.kernel[1] * plan.pixels * plan.o_regs
