"""Binary tensor-core kernels (issue 24): built and checked here without a GPU.

What runs here: the kernels' own TIR built for the CPU with the threads one after another and
the MMA emulated (``emulate_on_cpu=True``), and the numpy references of the same tiling, both
against the plain references, bit for bit; the CUDA source and nvcc's PTX for sm_80 and sm_90
(the ``mma.sync ... b1 ... xor.popc`` instructions are there and ptxas assembles them). What
does not run here: any of it on a GPU. The fragment layouts come from the PTX ISA text.
"""

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax
from tvm.script.ir_builder import IRBuilder
from tvm.support import nvcc
from tvm.tirx.script.builder import ir as T

import sparks_tvm
from kernel_utils import build, kernel_bodies, random_activations, random_layer
from schedules import cuda as cuda_schedules
from schedules import target_info
from schedules.cuda import CudaSchedules, GpuSparksParams
from schedules.host import HostSchedules
from schedules.target_info import TargetInfo
from sparks_tvm import compiler, frontend, models
from sparks_tvm import reference as ref
from sparks_tvm.cost import RESNET18_BINARY_LAYERS
from sparks_tvm.kernels import ConvGeometry, pack_binary_weights, pack_indices
from sparks_tvm.kernels.binary_conv2d_mma_gpu import MmaBinaryParams, binary_conv2d_mma_primfunc
from sparks_tvm.kernels.binary_conv2d_mma_gpu import binary_conv2d_mma_reference
from sparks_tvm.kernels.mma_b1_gpu import SHAPES, KernelIR, a_fragment, b_fragment, d_fragment, emulate_mma_b1
from sparks_tvm.kernels.mma_b1_gpu import pair_word, store
from sparks_tvm.kernels.sparks_conv2d_mma_gpu import MmaSparksParams, sparks_conv2d_mma_primfunc
from sparks_tvm.kernels.sparks_conv2d_mma_gpu import sparks_conv2d_mma_reference

NEEDS_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
XOR_POPC = r"mma\.sync\.aligned\.(m16n8k\d+)\.row\.col\.s32\.b1\.b1\.s32\.xor\.popc"


def _cuda(arch: str = "sm_80"):
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm")


def _run_cpu(func, inputs, out_shape):
    lib = build(func, "llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in inputs], out)
    return out.numpy()


def test_fragment_layouts_follow_the_isa():
    """The kernels' fragment helpers, the emulation (written from the ISA's per-element formulas)
    and the ISA's examples agree: one random 16 x K x 8 product through fragments equals the
    product of the matrices, at both shapes."""
    # ISA 9.7.14.5: lane 5 is groupID 1, threadID_in_group 1.
    assert [a_fragment(5, r) for r in range(4)] == [(1, 1), (9, 1), (1, 5), (9, 5)]
    assert [b_fragment(5, r) for r in range(2)] == [(1, 1), (1, 5)]
    assert [d_fragment(5, r) for r in range(4)] == [(1, 2), (1, 3), (9, 2), (9, 3)]
    rng = np.random.default_rng(0)
    lanes = np.arange(32)
    for shape, (a_regs, b_regs, slots) in SHAPES.items():
        mat_a = rng.integers(0, 2**32, (16, slots), dtype=np.uint64).astype(np.uint32)
        mat_b = rng.integers(0, 2**32, (8, slots), dtype=np.uint64).astype(np.uint32)  # B as (column, slot)
        frag_a = np.stack([mat_a[a_fragment(lanes, r)] for r in range(a_regs)], 1)
        frag_b = np.stack([mat_b[b_fragment(lanes, r)] for r in range(b_regs)], 1)
        for op, fn in (("xor", np.bitwise_xor), ("and", np.bitwise_and)):
            d = emulate_mma_b1(shape, frag_a, frag_b, np.full((32, 4), 7, np.int32), op)
            want = np.array([[sum(int(v).bit_count() for v in fn(mat_a[m], mat_b[n])) for n in range(8)]
                             for m in range(16)]) + 7
            for r in range(4):
                np.testing.assert_array_equal(d[:, r], want[d_fragment(lanes, r)])
    # KernelIR.mma (the CPU build) finds A[row, slot] at lane (row % 8) * 4 + slot % 4, register
    # row // 8 + 2 * (slot // 4), and B[slot, col] at lane col * 4 + slot % 4, register slot // 4.
    for lane in range(32):
        for r in range(4):
            row, slot = a_fragment(lane, r)
            assert ((row % 8) * 4 + slot % 4, row // 8 + 2 * (slot // 4)) == (lane, r)
        for r in range(2):
            col, slot = b_fragment(lane, r)
            assert (col * 4 + slot % 4, slot // 4) == (lane, r)


def test_pair_encoding_makes_xor_popc_the_product():
    """(neg, pos) pairs: popc(a xor w) = 1 - w * a for a in {-1, 0, +1} (0: ONNX Sign or padding)
    and w in {-1, +1}; a missing channel is (0, 0) on both sides and adds 0."""
    for a in (-1, 0, 1):
        for w in (-1, 1):
            aw = pair_word(np.array([[a < 0]]), np.array([[a != 0]]), 1)[0]
            ww = pair_word(np.array([[w < 0]]), np.array([[True]]), 1)[0]
            assert int(aw ^ ww).bit_count() == 1 - w * a
    assert pair_word(np.array([[False]]), np.array([[False]]), 1)[0] == 0


DENSE = [
    (ConvGeometry(2, 40, 9, 9, 20, stride=(2, 2)), "sign", None),
    (ConvGeometry(1, 70, 6, 7, 33, padding=(0, 1, 1, 0)), "ge", None),
    (ConvGeometry(3, 5, 4, 5, 3), "gt", MmaBinaryParams(tiles_m=1, tiles_n=3, warps_m=3, warps_n=1)),
    (ConvGeometry(1, 129, 5, 5, 17, stride=(2, 2)), "sign", MmaBinaryParams(1, 1, 1, 1)),
]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("geom,mode,params", DENSE)
def test_dense_mma_kernel_exact_on_cpu(geom, mode, params, shift):
    """The tensor-core dense conv, its own TIR run on the CPU (MMA emulated) and its numpy
    reference, equal the reference bit for bit: odd channel counts (tail slots), stride 2,
    asymmetric padding, pixel tiles across images, zeros, a folded binarizer shift."""
    rng = np.random.default_rng(geom.in_channels)
    signs = np.where(rng.random((geom.out_channels, geom.in_channels, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    x = random_activations(rng, geom.in_shape, zero_frac=0.3)
    offset = rng.choice([-0.5, 0.0, 0.25], size=geom.in_channels).astype(np.float32) if shift else None
    binarized = ref.binarize(x if offset is None else x + offset[None, :, None, None], mode)
    want = ref.binary_conv2d_ref(binarized, signs, geom.stride, geom.padding)
    wbits = pack_binary_weights(signs)
    func = binary_conv2d_mma_primfunc(geom, mode, params, shift, emulate_on_cpu=True)
    inputs = [x, wbits] + ([offset] if shift else [])
    np.testing.assert_array_equal(_run_cpu(func, inputs, geom.out_shape), want)
    np.testing.assert_array_equal(binary_conv2d_mma_reference(x, wbits, geom, mode, params, offset), want)


SPARKS = [
    (ConvGeometry(2, 17, 11, 13, 9, stride=(2, 2)), 16, "sign", None),
    (ConvGeometry(1, 40, 9, 8, 33, padding=(0, 1, 1, 0)), 32, "ge", None),
    (ConvGeometry(3, 5, 4, 5, 3), 4, "gt", MmaSparksParams(tiles_m=2, warps=3, out_regs=3, group=3)),
    (ConvGeometry(1, 3, 3, 3, 2), 2, "sign", None),
    (ConvGeometry(4, 30, 3, 3, 20), 64, "sign", MmaSparksParams(tiles_m=1, warps=1, out_regs=2, group=14)),
    (ConvGeometry(1, 9, 5, 5, 7), 256, "ge", MmaSparksParams(group=1, out_regs=1)),
]


def _sparks_case(geom, k, mode, shift, zeros=0.5):
    rng = np.random.default_rng(k + geom.in_channels)
    codebook, idx = random_layer(rng, geom, k)
    x = random_activations(rng, geom.in_shape, zero_frac=zeros)
    offset = rng.choice([-0.5, 0.0, 0.25], size=geom.in_channels).astype(np.float32) if shift else None
    binarized = ref.binarize(x if offset is None else x + offset[None, :, None, None], mode)
    want = ref.sparks_conv2d_ref(binarized, codebook, idx, geom.stride, geom.padding)
    inputs = [x, ref.codes_to_bits(codebook), pack_indices(idx, k)] + ([offset] if shift else [])
    return x, codebook, idx, offset, inputs, want


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("geom,k,mode,params", SPARKS)
def test_sparks_mma_kernel_exact_on_cpu(geom, k, mode, params, shift):
    """The Sparks kernel with tensor-core stage 1, its own TIR on the CPU (threads serialized
    between barriers, MMA emulated) and its numpy reference, equal the reference bit for bit:
    K from 2 to 256 (codeword tiles padded past K), tail channel groups, groups of 14 (the
    largest that cannot carry), pixel tiles across images, stride 2, folded shifts."""
    x, codebook, idx, offset, inputs, want = _sparks_case(geom, k, mode, shift)
    func = sparks_conv2d_mma_primfunc(geom, k, mode, params, shift, emulate_on_cpu=True)
    np.testing.assert_array_equal(_run_cpu(func, inputs, geom.out_shape), want)
    np.testing.assert_array_equal(sparks_conv2d_mma_reference(x, codebook, idx, geom, mode, params, offset), want)


@st.composite
def mma_layers(draw):
    stride = draw(st.sampled_from([1, 2]))
    geom = ConvGeometry(
        batch=draw(st.integers(1, 3)), in_channels=draw(st.integers(1, 33)), height=draw(st.integers(3, 9)),
        width=draw(st.integers(3, 9)), out_channels=draw(st.integers(1, 19)), stride=(stride, stride),
        padding=draw(st.sampled_from([(1, 1, 1, 1), (0, 0, 0, 0), (0, 1, 1, 0)])))
    tiles_m = draw(st.sampled_from([1, 2, 4]))
    params = MmaSparksParams(tiles_m=tiles_m, warps=draw(st.sampled_from([1, 2, 4])),
                             out_regs=draw(st.integers(1, 4)), group=draw(st.integers(1, 14)))
    return geom, draw(st.sampled_from([2, 4, 8, 16, 32])), draw(st.sampled_from(["sign", "ge", "gt"])), params


@settings(max_examples=12, deadline=None)
@given(mma_layers(), st.sampled_from([0.1, 0.9]))
def test_sparks_mma_kernel_fuzz_on_cpu(case, zeros):
    """Random layers and tilings (mostly-zero inputs included: patches with no real tap)."""
    geom, k, mode, params = case
    _, _, _, _, inputs, want = _sparks_case(geom, k, mode, False, zeros)
    func = sparks_conv2d_mma_primfunc(geom, k, mode, params, emulate_on_cpu=True)
    np.testing.assert_array_equal(_run_cpu(func, inputs, geom.out_shape), want)


def _ptx_and_ptxas_report(src: str, arch: str, tmp_path):
    """nvcc's PTX of ``src``, and ptxas's resource report from assembling it to a cubin."""
    with _cuda(arch):
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch=arch, compiler="nvcc").decode()
    (tmp_path / "k.cu").write_text(src)
    done = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
                           str(tmp_path / "k.cu")], capture_output=True, text=True, check=True)
    return ptx, done.stderr


def _one_mma_kernel(shape: str, op: str, cpu: bool = False):
    """A one-warp kernel: fragments from ``A``/``B``, one MMA, ``D`` out, built by KernelIR for
    CUDA or (``cpu``) for the CPU with the MMA emulated."""
    a_regs, b_regs, _ = SHAPES[shape]
    ir = KernelIR(cpu)
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name("one_mma")
            a_in = T.arg("A", T.buffer((32, a_regs), "uint32"))
            b_in = T.arg("B", T.buffer((32, b_regs), "uint32"))
            d_out = T.arg("D", T.buffer((32, 4), "int32"))
            with ir.grid({"blockIdx.x": 1}, {"threadIdx.x": 32}):
                a, b, d = ir.local("a", a_regs, "uint32"), ir.local("b", b_regs, "uint32"), ir.local("d", 4, "int32")
                with ir.phase("threadIdx.x") as (lane,):
                    for r in range(a_regs):
                        a.set(r, a_in[lane, r])
                    for r in range(b_regs):
                        b.set(r, b_in[lane, r])
                    for r in range(4):
                        d.set(r, T.int32(r))
                ir.mma(shape, a, 0, b, 0, d, 0, op)  # on CUDA still the lane's code: phases open no loop
                with ir.phase("threadIdx.x") as (lane,):
                    for r in range(4):
                        store(d_out, d[r], lane, r)
    return ib.get()


@pytest.mark.parametrize("op", ["xor", "and"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_mma_emulation_matches_the_isa_emulation(shape, op):
    """KernelIR's TIR emulation of the MMA (what the CPU builds of the kernels run) equals the
    numpy emulation written from the ISA's per-element formulas, on random fragments."""
    a_regs, b_regs, _ = SHAPES[shape]
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**32, (32, a_regs), dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, (32, b_regs), dtype=np.uint64).astype(np.uint32)
    got = _run_cpu(_one_mma_kernel(shape, op, cpu=True), [a, b], (32, 4))
    np.testing.assert_array_equal(got, emulate_mma_b1(shape, a, b, np.tile(np.arange(4, dtype=np.int32), (32, 1)), op))


@NEEDS_NVCC
@pytest.mark.parametrize("op", ["xor", "and"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_both_bit_ops_and_shapes_assemble(shape, op, tmp_path):
    """``mma_b1`` emits ``.xor.popc`` and ``.and.popc`` at m16n8k128 and m16n8k256; ptxas takes
    each for sm_80 (the first architecture with them)."""
    src = tvm.compile(_one_mma_kernel(shape, op).with_attr("global_symbol", "main"),
                      target=_cuda("sm_80")).mod.imports[0].inspect_source()
    want = f"mma.sync.aligned.{shape}.row.col.s32.b1.b1.s32.{op}.popc"
    assert want in src
    ptx, report = _ptx_and_ptxas_report(src, "sm_80", tmp_path)
    assert want in ptx and "0 bytes spill stores" in report


@NEEDS_NVCC
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind", ["sparks", "binary"])
def test_mma_kernels_compile_for_sm80_and_sm90(kind, arch, tmp_path):
    """A ResNet-18 layer at batch 64: the CUDA source has the binary MMA, nvcc's PTX keeps it,
    and ptxas assembles it for the architecture without spilling (no GPU needed, none used)."""
    geom = ConvGeometry(64, 128, 28, 28, 128)
    schedules = CudaSchedules(_cuda(arch), binary_mma=True)
    func = (schedules.schedule_sparks_conv2d(geom, 16, "sign", shift=True) if kind == "sparks"
            else schedules.schedule_binary_conv2d(geom, "sign", shift=True))
    src = tvm.compile(func.with_attr("global_symbol", "main"), target=_cuda(arch)).mod.imports[0].inspect_source()
    want = "m16n8k128" if kind == "sparks" else "m16n8k256"
    assert set(re.findall(XOR_POPC, src)) == {want}
    if kind == "sparks":  # stage 1 in shared memory, one barrier pair per channel group
        fused = [b for b in kernel_bodies(src, "main_kernel").values() if "stage1" in b]
        assert len(fused) == 1 and fused[0].count("__syncthreads()") == 2 and "__shared__" in fused[0]
    ptx, report = _ptx_and_ptxas_report(src, arch, tmp_path)
    assert re.search(XOR_POPC, ptx) and f".target {arch}" in ptx
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(kernels) == (2 if kind == "sparks" else 3)
    assert report.count("0 bytes spill stores") == len(kernels)


def test_mma_kernels_are_chosen_only_when_asked_on_sm80_and_later(monkeypatch):
    """Off by default (not yet run on a GPU); asked for, sm_80+ gets them, sm_75 keeps the
    SIMT kernels, and layers the MMA kernel cannot take (3641+ channels) fall back."""
    monkeypatch.delenv(cuda_schedules.MMA_ENV, raising=False)
    geom = ConvGeometry(1, 16, 8, 8, 16)
    assert not CudaSchedules(_cuda("sm_90")).binary_mma
    assert not CudaSchedules(_cuda("sm_75"), binary_mma=True).binary_mma
    asked = CudaSchedules(_cuda("sm_80"), binary_mma=True)
    assert asked.mma_sparks_params(geom, 16) is not None and asked.mma_binary_params(geom) is not None
    assert asked.mma_sparks_params(ConvGeometry(1, 3700, 3, 3, 2), 2) is None
    monkeypatch.setenv(cuda_schedules.MMA_ENV, "1")
    assert CudaSchedules(_cuda("sm_90")).binary_mma
    names = {p.name for p in CudaSchedules(_cuda("sm_90")).schedule_sparks_conv2d(geom, 16, "sign").params}
    assert names == {"data", "codes", "idx", "out"}
    fallback = CudaSchedules(_cuda("sm_75")).schedule_sparks_conv2d(geom, 16, "sign")
    assert "stage1" in fallback.script() and "ptx_legacy.mma" not in fallback.script()


class _FakeGPU:
    exist, multi_processor_count, max_shared_memory_per_block = True, 108, 49152

    def __init__(self, compute_version):
        self.compute_version = compute_version


@pytest.mark.parametrize("device,sms,source", [(None, 132, "default"), ("8.0", 108, "device"), ("9.0", 132, "default")])
def test_sm_count_and_shared_memory_come_from_the_device(device, sms, source, monkeypatch):
    """The visible GPU's SM count and shared memory are used when it is the target's
    architecture; otherwise the target's attributes (a tag's shared memory) and the default."""
    if device is not None:
        monkeypatch.setattr(target_info.tvm, "cuda", lambda index=0: _FakeGPU(device))
    elif tvm.cuda(0).exist:
        pytest.skip("a GPU is visible")
    info = TargetInfo.from_target(tvm.target.Target("nvidia/nvidia-a100"))
    assert (info.arch, info.binary_mma, info.sm_count, info.sm_source) == (80, True, sms, source)
    assert info.shared_bytes == 49152 and info.shared_source == ("device" if source == "device" else "target")
    assert CudaSchedules(tvm.target.Target("nvidia/nvidia-a100")).info.sm_count == sms


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_mma_knobs_for_every_resnet18_layer(batch):
    """Every ResNet-18 binary layer at K=16 gets valid knobs; on a 132-SM GPU, grids too small
    for two blocks per SM take smaller blocks (never larger than the batch-256 ones)."""
    for cin, cout, side, stride in RESNET18_BINARY_LAYERS:
        geom = ConvGeometry(batch, cin, side, side, cout, stride=(stride, stride))
        params = MmaSparksParams.for_layer(geom, 16, sms=132)
        params.validate(geom, 16)
        plain = MmaSparksParams.for_layer(geom, 16)
        assert params.blocks(geom) >= min(2 * 132, plain.blocks(geom) * 8) or params.tiles_m == 1
        dense = MmaBinaryParams.for_layer(geom, sms=132)
        assert dense.blocks(geom) >= MmaBinaryParams().blocks(geom)


@NEEDS_NVCC
def test_model_compiles_with_mma_kernels(tmp_path, monkeypatch):
    """With the switch on, an A100 build of a small model has every Sparks layer on the MMA
    kernel (one m16n8k128 per layer in the source) and its PTX assembles."""
    monkeypatch.setenv(cuda_schedules.MMA_ENV, "1")
    path = tmp_path / "tiny.onnx"
    models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), (2, 3, 9, 9), path)
    compiled = sparks_tvm.compile(path, target="nvidia/nvidia-a100")
    assert compiled.report.count("sparks") == 4
    assert re.findall(XOR_POPC, compiled.cuda_source()) == ["m16n8k128"] * 4
    assert re.search(XOR_POPC, compiled.cuda_ptx().decode())


def _gpu_arch() -> int:
    dev = tvm.cuda(0)
    return TargetInfo.from_target(tvm.target.Target({"kind": "cuda", "arch": "sm_" + dev.compute_version.replace(
        ".", "")})).arch if dev.exist else 0


@pytest.mark.skipif(_gpu_arch() < 80, reason="needs an sm_80+ NVIDIA GPU and full TVM (none here)")
@pytest.mark.parametrize("kind", ["sparks", "binary"])
@pytest.mark.parametrize("geom", [ConvGeometry(64, 64, 56, 56, 64), ConvGeometry(3, 17, 11, 13, 9, stride=(2, 2)),
                                  ConvGeometry(64, 256, 14, 14, 512, stride=(2, 2))])
def test_mma_kernels_exact_on_the_gpu(kind, geom):
    """The check this file cannot make here: the tensor-core kernels on an sm_80+ GPU, bit for
    bit against the reference (ResNet-18 shapes at batch 64, odd channels, stride 2)."""
    dev = tvm.cuda(0)
    target = tvm.target.Target({"kind": "cuda", "arch": f"sm_{_gpu_arch()}"}, host="llvm")
    schedules = CudaSchedules(target, binary_mma=True)
    rng = np.random.default_rng(1)
    x = random_activations(rng, geom.in_shape, zero_frac=0.2)
    if kind == "sparks":
        _, _, _, _, inputs, want = _sparks_case(geom, 16, "sign", False)
        func = schedules.schedule_sparks_conv2d(geom, 16, "sign")
    else:
        signs = np.where(rng.random((geom.out_channels, geom.in_channels, 3, 3)) < 0.5, -1, 1).astype(np.int8)
        inputs, want = [x, pack_binary_weights(signs)], ref.binary_conv2d_ref(ref.binarize(x, "sign"), signs,
                                                                                 geom.stride, geom.padding)
        func = schedules.schedule_binary_conv2d(geom, "sign")
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in inputs], out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_small_grid_rule_scales_with_the_sm_count():
    """The SIMT kernel's small-grid threshold (256 blocks, measured on a 132-SM H100) scales with
    the GPU's SM count: a grid of 196 blocks is small for 132 SMs, not for 66."""
    geom = ConvGeometry(4, 64, 56, 56, 64)
    big = GpuSparksParams.for_layer(geom, 16, sms=66)
    assert 128 <= big.blocks(geom) < 256
    assert GpuSparksParams.for_layer(geom, 16, sms=132) == big.for_small_grid(geom)


class _EmulatedMmaSchedules:
    """The tensor-core kernels built for the CPU (MMA emulated) as a schedules object; float
    convs from the host's."""

    name, folds_shift = "emulated_mma", True

    def __init__(self, target):
        self.host = HostSchedules.for_target(target)

    def __getattr__(self, key):
        return getattr(self.host, key)

    def schedule_sparks_conv2d(self, geom, num_codewords, mode, shift=False):
        return sparks_conv2d_mma_primfunc(geom, num_codewords, mode, shift=shift, emulate_on_cpu=True)

    def schedule_binary_conv2d(self, geom, mode, shift=False):
        return binary_conv2d_mma_primfunc(geom, mode, shift=shift, emulate_on_cpu=True)


@pytest.mark.parametrize("force_kind", [None, "binary"])
def test_model_with_mma_kernels_matches_the_host_build(force_kind, tmp_path):
    """The whole lowering with the tensor-core kernels (CPU builds, MMA emulated) in every binary
    conv, binarizer shifts folded into them, run through the Relax VM: the same output as the
    host build, exactly (the kernels' arguments, layout and epilogue fit the graph)."""
    path = tmp_path / "tiny.onnx"
    models.export_onnx(models.sparks_resnet_tiny(k=8, seed=2, widths=(9, 17)), (2, 3, 10, 10), path)
    proto = frontend.load_onnx(str(path))
    target = tvm.target.Target({"kind": "llvm"})
    x = models.example_input((2, 3, 10, 10), seed=3)
    want = sparks_tvm.compile(path, target="llvm", force_kind=force_kind).run(x)[0]
    mod, report = compiler.build_relax(proto, frontend.input_specs(proto, None), target,
                                       kernel_schedules=_EmulatedMmaSchedules(target), force_kind=force_kind)
    assert report.count("binary" if force_kind else "sparks") == 4
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=compiler.relax_pipeline(target)),
                              tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu()))
    np.testing.assert_array_equal((got.numpy() if hasattr(got, "numpy") else got[0].numpy()), want)
