"""The NEON Sparks kernel (sparks_tvm.kernels.sparks_conv2d_neon) against the numpy reference.

The kernel is plain vector TIR, so it also builds for the x86 host: these run here, bit for
bit, on shapes that break naive code. tests/test_arm_emulated.py runs the same kernel
cross-compiled on the emulated Pi, through the ARM schedules.
"""

import numpy as np
import pytest
import tvm
from tvm import s_tir

from kernel_utils import run_on_host

from schedules.arm import ArmSchedules, apply_neon_out_schedule
from sparks_tvm import reference as ref
from sparks_tvm.kernels import ConvGeometry, pack_indices
from sparks_tvm.kernels.sparks_conv2d_neon import (NeonSparksPlan, accumulator_dtype, default_plan,
                                                   sparks_conv2d_neon_primfunc)
from sparks_tvm.models import random_codebook
from sparks_tvm.target import resolve_target

HOST = resolve_target("llvm")


def run(geom, k, mode, plan=None, zeros=0.2, shift=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(geom.in_shape).astype(np.float32)
    if zeros == "few":
        # a few exact zeros in about a third of the channels, other channels per image, corners
        # included: those channels take the masked formula, the others stay mask-free
        n, c, h, w = geom.in_shape
        for i in range(n):
            for ch in rng.choice(c, size=max(1, c // 3), replace=False):
                ys = [0, h - 1, rng.integers(h)]
                xs = [0, w - 1, rng.integers(w)]
                for _ in range(rng.integers(1, 4)):  # -0.0 too: a zero with the sign bit set
                    x[i, ch, ys[rng.integers(3)], xs[rng.integers(3)]] = rng.choice([0.0, -0.0])
    elif zeros == "tiny":
        # Values the zero test flags although they are not 0 (|v| < 2**-125: subnormals, the
        # smallest normals) in a few channels, exact zeros in others: the flagged channels
        # take the masked path, which must still give them their sign.
        n, c, h, w = geom.in_shape
        tiny = np.array([1e-45, -1e-40, 2.0 ** -126, -(2.0 ** -126), 2.0 ** -125 * 0.99], np.float32)
        x[:, 0].flat[rng.choice(h * w, size=5, replace=False)] = tiny
        x[:, c // 2, rng.integers(h), rng.integers(w)] = rng.choice(tiny)
        x[:, c - 1, rng.integers(h), rng.integers(w)] = 0.0
        x[:, 1, 0, 0] = 2.0 ** -125  # the smallest value the test does not flag
    else:
        x[rng.random(x.shape) < zeros] = 0.0  # exact zeros: Sign(0) = 0
    codebook = random_codebook(rng, k).astype(np.int8)
    idx = rng.integers(0, k, size=(geom.out_channels, geom.in_channels))
    args = [x, ref.codes_to_bits(codebook), pack_indices(idx, k)]
    binarized = x
    if shift:
        b = rng.standard_normal(geom.in_channels).astype(np.float32)
        binarized = x + b[None, :, None, None]  # the same float add as the kernel
        args.append(b)
    want = ref.sparks_conv2d_ref(ref.binarize(binarized, mode), codebook, idx, geom.stride, geom.padding)
    func = sparks_conv2d_neon_primfunc(geom, k, mode, plan, shift=shift)
    func = apply_neon_out_schedule(s_tir.Schedule(func)).mod["main"]
    return run_on_host(func, args, geom.out_shape), want


CASES = [
    # odd sizes, padded borders, zeros (Sign), a partial last tile
    (ConvGeometry(1, 8, 6, 7, 5), 16, "sign", None),
    # stride 2 (the paired-column triples), batch 2, channels not a multiple of 16
    (ConvGeometry(2, 30, 9, 11, 7, stride=(2, 2)), 16, "sign", None),
    (ConvGeometry(1, 57, 14, 14, 33, stride=(2, 2)), 32, "ge", None),
    # odd width at stride 2 (last column pair half padding), asymmetric padding
    (ConvGeometry(1, 5, 9, 13, 6, stride=(2, 2), padding=(0, 1, 2, 0)), 3, "gt", None),
    # no padding, K = 2 (1-bit indices, 8 per byte, blocks of 24 channels)
    (ConvGeometry(3, 29, 5, 5, 3, padding=(0, 0, 0, 0)), 2, "sign", None),
    # K = 64 (a byte per index), several channel blocks, tile 128 with two 64-pixel chunks
    (ConvGeometry(1, 70, 12, 12, 9), 64, "sign", NeonSparksPlan(128, 64, 28)),
    # K not a power of two, blocks that do not divide C, output-channel chunks as tasks
    (ConvGeometry(1, 45, 7, 7, 12), 5, "ge", NeonSparksPlan(16, 16, 12, o_chunks=3)),
    # all-zero input: every tap masked
    (ConvGeometry(1, 4, 4, 4, 4), 16, "sign", NeonSparksPlan(32, 32, 4)),
    # padding 2 on top and right, none at the bottom: border classes of the mask-free path
    (ConvGeometry(2, 20, 9, 9, 8, stride=(2, 2), padding=(2, 1, 0, 2)), 7, "sign", None),
    # stride 2, 19 output columns: whole 16-lane ld2 triples and an overlapping last vector
    (ConvGeometry(1, 9, 40, 37, 6, stride=(2, 2)), 16, "sign", None),
    # 12 output columns (8-lane vectors), batch 2; row stride 1 with column stride 2 (flat)
    (ConvGeometry(2, 11, 21, 23, 5, stride=(2, 2)), 9, "sign", None),
    (ConvGeometry(1, 6, 8, 20, 4, stride=(1, 2)), 16, "ge", None),
    # probe lanes at the end of a chunk that is not the tile's first (tile 128, chunk 32)
    (ConvGeometry(1, 12, 10, 10, 5), 16, "ge", NeonSparksPlan(128, 32, 12)),
    (ConvGeometry(1, 12, 10, 10, 5), 16, "sign", NeonSparksPlan(128, 32, 12)),
    # output-channel chunks as tasks with Sign (the mixed path's per-block real-tap sums), batch 2
    (ConvGeometry(2, 45, 7, 7, 12), 5, "sign", NeonSparksPlan(16, 16, 12, o_chunks=3)),
    # 28x28, batch 2: each image's last 128-pixel tile uses 26 lanes (784 pixels, 10 probes),
    # so stage 2 reads its rows' first 32 bytes (tail_bytes); two channel blocks
    (ConvGeometry(2, 21, 28, 28, 6), 16, "sign", NeonSparksPlan(128, 128, 12)),
    (ConvGeometry(1, 21, 28, 28, 6), 16, "ge", NeonSparksPlan(128, 128, 12, o_chunks=2)),
]


def _with_zeros(cases):
    """Each case without zeros, with many and (``Sign`` only: ge/gt have no zero state) with few."""
    for case in cases:
        for zeros in [0.0, 0.2] + (["few"] if case[2] == "sign" else []):
            yield pytest.param(*case, zeros, id=f"{case[0]}-K{case[1]}-{case[2]}-{zeros}")


@pytest.mark.parametrize("geom,k,mode,plan,zeros", list(_with_zeros(CASES)))
def test_neon_kernel_exact(geom, k, mode, plan, zeros):
    # Sign without a zero takes the mask-free path (padding corrected from the probe lanes);
    # with zeros, the channels that hold one take the masked formula and the others stay
    # mask-free ("few": a third of the channels, different per image; 0.2: nearly all).
    # ge/gt never see a zero, so every run of theirs is mask-free.
    if geom.in_channels == 4:
        zeros = 1.0
    got, want = run(geom, k, mode, plan, zeros=zeros)
    assert np.array_equal(got, want), int((got != want).sum())


@pytest.mark.parametrize("geom,k", [(ConvGeometry(2, 19, 11, 13, 21), 16), (ConvGeometry(1, 9, 40, 37, 6, stride=(2, 2)), 5)])
def test_neon_kernel_tiny_values_exact(geom, k):
    got, want = run(geom, k, "sign", zeros="tiny")
    assert np.array_equal(got, want), int((got != want).sum())


def test_neon_kernel_with_folded_shift_exact():
    got, want = run(ConvGeometry(2, 19, 11, 13, 21), 16, "sign", shift=True, zeros=0.0)
    assert np.array_equal(got, want)


def test_default_plan_choices():
    # 56x56 = 3136 pixels (+ 10 probe lanes): tile 128 (3200 padded) beats 64 (3200) on
    # per-row overheads; stage 1 runs the whole tile as one chunk.
    plan = default_plan(ConvGeometry(1, 64, 56, 56, 64), 16)
    assert (plan.tile, plan.chunk, plan.block, plan.o_chunks) == (128, 128, 22, 1)
    # 7x7: one tile of 64; on 4 cores the output channels split into tasks.
    plan = default_plan(ConvGeometry(1, 512, 7, 7, 512), 16, cores=4)
    assert plan.tile == 64 and plan.o_chunks == 8 and plan.block % 2 == 0 and plan.block <= 28
    # 1-bit indices: blocks start on an index byte (multiples of 8).
    assert default_plan(ConvGeometry(1, 100, 8, 8, 8), 2).block % 8 == 0


def test_bad_plans_are_refused():
    geom = ConvGeometry(1, 8, 6, 6, 4)
    with pytest.raises(ValueError, match="multiples of 16"):
        sparks_conv2d_neon_primfunc(geom, 16, "sign", NeonSparksPlan(40, 40, 8))
    with pytest.raises(ValueError, match="channel block"):
        sparks_conv2d_neon_primfunc(geom, 16, "sign", NeonSparksPlan(32, 32, 29))
    with pytest.raises(ValueError, match="multiple of 2"):
        sparks_conv2d_neon_primfunc(geom, 16, "sign", NeonSparksPlan(32, 32, 7))
    with pytest.raises(ValueError, match="3x3"):
        sparks_conv2d_neon_primfunc(ConvGeometry(1, 8, 6, 6, 4, kernel=(1, 1), padding=(0, 0, 0, 0)), 16, "sign")


def test_accumulator_width():
    # u <= 9 per channel: uint16 holds 7281 channels, int32 past that.
    assert accumulator_dtype(7281) == "uint16" and accumulator_dtype(7282) == "int32"


def test_arm_schedules_use_the_neon_kernel():
    sched = ArmSchedules.for_target(resolve_target("arm_cpu"))
    func = sched.schedule_sparks_conv2d(ConvGeometry(1, 16, 8, 8, 16), 16, "sign")
    sch = s_tir.Schedule(func)
    sch.get_sblock("sparks_neon")  # raises if the lowering built another kernel
    assert func.attrs["tirx.is_scheduled"]
    # aarch64 targets get the sli packing the emulated-Pi tests check; other targets the
    # portable expression (the host tests above).
    assert sched.aarch64 and "llvm.aarch64.neon.vsli" in func.script()
    geom = ConvGeometry(1, 16, 8, 8, 16)
    assert "vsli" not in sparks_conv2d_neon_primfunc(geom, 16, "sign").script()
    assert not ArmSchedules.for_target(resolve_target("llvm")).aarch64


def test_aarch64_build_walks_rows_with_post_indexed_ld1_and_st1():
    """The instructions the aarch64 kernel is written for, in its assembly: rows gathered by
    ``ld1`` post-indexed by the gather step, rows stored by ``st1`` post-indexed by the row,
    codeword ranks looked up by ``tbl`` (the emulated-Pi tests check the values)."""
    import re

    geom = ConvGeometry(1, 36, 18, 18, 20)
    func = sparks_conv2d_neon_primfunc(geom, 16, "sign", NeonSparksPlan(128, 128, 18), aarch64=True)
    target = resolve_target("arm_cpu")
    asm = tvm.compile(tvm.IRModule({"main": func}), target=target).mod.inspect_source("asm")
    quad = r"\{\s*v\d+\.16b,\s*v\d+\.16b,\s*v\d+\.16b,\s*v\d+\.16b\s*\}|\{\s*v\d+\.16b\s*-\s*v\d+\.16b\s*\}"
    assert re.search(rf"ld1\s+(?:{quad}),\s*\[x\d+\],\s*x\d+", asm)
    assert re.search(rf"st1\s+(?:{quad}),\s*\[x\d+\],\s*#64", asm)
    assert re.search(r"\btbl\s+v\d+\.(?:16|8)b", asm)


def test_last_tile_reads_only_the_rows_it_uses():
    from sparks_tvm.kernels.sparks_conv2d_neon import _Layout
    from sparks_tvm.kernels.sparks_neon_rows import tail_bytes

    def tail(geom, plan):
        return tail_bytes(_Layout(geom, 16, plan))

    assert tail(ConvGeometry(2, 21, 28, 28, 6), NeonSparksPlan(128, 128, 12)) == 32  # 26 lanes used
    assert tail(ConvGeometry(1, 64, 56, 56, 64), NeonSparksPlan(128, 128, 22)) is None  # 74: high nibbles too
    assert tail(ConvGeometry(1, 8, 6, 7, 5), NeonSparksPlan(64, 64, 8)) is None  # 52 of 64: no room
    assert tail(ConvGeometry(1, 12, 10, 10, 5), NeonSparksPlan(128, 32, 12)) is None  # several chunks


def test_probe_lanes_fit_in_one_chunk():
    from sparks_tvm.kernels.sparks_conv2d_neon import VIRTUAL, padded_pixels, virtual_base

    for pixels in range(1, 400):
        for tile, chunk in ((16, 16), (64, 32), (128, 128), (128, 16)):
            pp = padded_pixels(pixels, tile, chunk)
            v = virtual_base(pixels, pp, chunk)
            assert pp % tile == 0 and v is not None and v >= pixels and v + VIRTUAL <= pp
            assert v // chunk == (v + VIRTUAL - 1) // chunk


@pytest.mark.parametrize("n", [1, 3, 5, 7, 12, 14, 16, 28, 56, 97])
def test_whole_chunks_cover_rows_with_whole_vectors(n):
    """Every column once or more, inside the row, lanes powers of two, none short in a long row."""
    from sparks_tvm.kernels.vector_tir import whole_chunks

    chunks = whole_chunks(0, n)
    covered = [0] * n
    for start, lanes in chunks:
        assert 0 <= start and start + lanes <= n and lanes & (lanes - 1) == 0
        for x in range(start, start + lanes):
            covered[x] += 1
    assert min(covered) == 1
    least = 8 if n >= 8 else 4 if n >= 4 else 1
    assert all(lanes >= least for _, lanes in chunks)
