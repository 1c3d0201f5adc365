"""CUDA target: built and checked without a GPU (source + nvcc PTX); run only where a GPU is.

Where the GPU kernels were run: ``scripts/gpu/make_cases.py`` + ``scripts/gpu/run_cases.py``
and ``benchmarks/bench_cuda.py`` on a lent GPU machine (results in ``benchmarks/results``).
Here the GPU form of the arithmetic is checked on the CPU, unscheduled, against the reference.
"""

import itertools
import re
import shutil

import numpy as np
import pytest
import tvm

import sparks_tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_utils import build, kernel_bodies as _kernel_bodies, random_activations, random_layer
from schedules.cuda import CudaSchedules, GpuSparksParams
from tvm import s_tir
from sparks_tvm import models
from sparks_tvm.cost import RESNET18_BINARY_LAYERS
from sparks_tvm import reference as ref
from sparks_tvm.kernels import ConvGeometry, pack_indices, sparks_out_shape
from sparks_tvm.kernels.sparks_conv2d_gpu import sparks_conv2d_gpu_primfunc

HAS_GPU = tvm.cuda(0).exist
NEEDS_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
NEEDS_GPU = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU visible to TVM on this machine")


def _assert_sparks_exact_on_cpu(func, geom, x, codebook, idx, mode):
    """Build a Sparks PrimFunc (any form, any schedule that runs on a CPU) and compare it with
    the numpy reference bit for bit."""
    lib = build(func, "llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(ref.codes_to_bits(codebook), dev),
                tvm.runtime.tensor(pack_indices(idx, codebook.shape[0]), dev), out)
    want = ref.sparks_conv2d_ref(ref.binarize(x, mode), codebook, idx, geom.stride, geom.padding)
    np.testing.assert_array_equal(out.numpy().reshape(geom.out_shape), want)
    return want


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path_factory.mktemp("cuda") / "tiny.onnx"
    models.export_onnx(net, (2, 3, 9, 9), path)
    return path, sparks_tvm.compile(path, target="cuda")


def test_cuda_alias_and_kernels_are_ours(tiny_cuda):
    _, compiled = tiny_cuda
    assert compiled.target.kind.name == "cuda" and str(compiled.target.attrs["arch"]).startswith("sm_")
    assert compiled.report.count("sparks") == 4
    src = compiled.cuda_source()
    sparks = _kernel_bodies(src, "sparks_conv2d_")
    assert sparks, "no Sparks kernels in the CUDA source"
    # Stage 1 of every Sparks layer is a popcount kernel: __popc on 32-bit words, not a fallback.
    for layer in {re.match(r"sparks_conv2d_\d+", n).group(0) for n in sparks}:
        assert any("__popc" in body for name, body in sparks.items() if name.startswith(layer + "_")), layer
    # Stock TVM convs appear only for the convs the report calls float (stem, shortcuts).
    stock = [n for n in _kernel_bodies(src, "") if "conv2d" in n and not n.startswith(("sparks", "binary"))]
    assert len(stock) <= compiled.report.count("float")


def test_dense_binary_kernel_for_cuda(tmp_path):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path / "tiny.onnx"
    models.export_onnx(net, (1, 3, 9, 9), path)
    compiled = sparks_tvm.compile(path, target="cuda", force_kind="binary")
    bodies = _kernel_bodies(compiled.cuda_source(), "binary_conv2d_")
    assert bodies and any("__popc" in b for b in bodies.values())


@NEEDS_NVCC
def test_resnet18_builds_to_ptx_with_nvcc(tmp_path):
    path = tmp_path / "r18.onnx"
    models.export_onnx(models.sparks_resnet18(k=16), (1, 3, 224, 224), path)
    compiled = sparks_tvm.compile(path, target="cuda")
    assert compiled.report.count("sparks") == 16
    ptx = compiled.cuda_ptx()
    text = ptx.decode(errors="replace")
    assert ".entry sparks_conv2d_" in text and "popc.b32" in text


def test_running_without_a_gpu_is_a_clear_error(tiny_cuda):
    if HAS_GPU:
        pytest.skip("a GPU is present: the model runs (see test_gpu_matches_host)")
    _, compiled = tiny_cuda
    with pytest.raises(sparks_tvm.SparksError, match="no GPU"):
        compiled.run(np.zeros((2, 3, 9, 9), np.float32))


@NEEDS_GPU
def test_gpu_matches_host(tiny_cuda):
    path, compiled = tiny_cuda
    x = models.example_input((2, 3, 9, 9), seed=3)
    host = sparks_tvm.compile(path, target="llvm")
    np.testing.assert_allclose(compiled.run(x)[0], host.run(x)[0], rtol=1e-5, atol=1e-5 * 100)


@st.composite
def gpu_layers(draw):
    stride = draw(st.sampled_from([1, 2]))
    geom = ConvGeometry(
        batch=draw(st.integers(1, 3)), in_channels=draw(st.integers(1, 45)),
        height=draw(st.integers(3, 12)), width=draw(st.integers(3, 12)), out_channels=draw(st.integers(1, 20)),
        stride=(stride, stride), padding=draw(st.sampled_from([(1, 1, 1, 1), (0, 0, 0, 0), (0, 1, 1, 0)])))
    group = draw(st.integers(1, 14))
    groups = -(-geom.in_channels // group)
    splits = draw(st.sampled_from([d for d in range(1, groups + 1) if groups % d == 0]))
    return (geom, draw(st.integers(2, 64)), draw(st.sampled_from(["sign", "ge", "gt"])),
            draw(st.sampled_from([1, 2, 8, 32])), group, splits, draw(st.integers(0, 2**31)),
            draw(st.sampled_from([0.2, 0.9])))


@settings(max_examples=25, deadline=None)
@given(gpu_layers())
def test_gpu_form_exact_on_cpu(case):
    """The packed-byte arithmetic of the GPU kernel (bias, carries, tail groups) is exact.

    A first version stored no bias for a patch without real taps (all zeros under ``Sign``):
    off by 9 at image corners on the GPU. The 90%-zeros draws reproduce it.

    Built unscheduled for the CPU: what the CUDA schedule then does is a loop transformation
    of this same computation.
    """
    geom, k, mode, tile_words, group, splits, seed, zeros = case
    rng = np.random.default_rng(seed)
    codebook, idx = random_layer(rng, geom, k)
    # Mostly-zero inputs give patches with no real tap at all (S = 0 must still carry the bias).
    x = random_activations(rng, geom.in_shape, zero_frac=zeros)
    func = sparks_conv2d_gpu_primfunc(geom, k, mode, tile_words, group, splits)
    _assert_sparks_exact_on_cpu(func, geom, x, codebook, idx, mode)


@pytest.mark.parametrize("splits", [1, 5])
def test_gpu_form_wide_layer_uses_32bit_lanes(splits):
    """Past 3640 input channels 16-bit lanes could overflow: the 4-lane accumulator is used and
    exact, also when the channels are split (265 groups of 14 = 5 x 53)."""
    geom = ConvGeometry(1, 3700, 3, 3, 2, padding=(1, 1, 1, 1))
    rng = np.random.default_rng(0)
    codebook, idx = random_layer(rng, geom, 2)
    x = np.full(geom.in_shape, -1.0, np.float32)  # every tap agrees with a codeword: the largest sums
    codebook[:] = -1
    func = sparks_conv2d_gpu_primfunc(geom, 2, "sign", 1, 14, splits)
    assert "stage2" in func.script() and "T.int64(4)" in func.script()
    want = _assert_sparks_exact_on_cpu(func, geom, x, codebook, idx, "sign")
    assert want.max() == 9 * 3700


@pytest.mark.parametrize("shape,k", [((64, 64, 56, 56, 64), 16), ((1, 512, 7, 7, 512), 64), ((2, 3, 5, 5, 1), 2),
                                     ((1, 8, 9, 70, 4), 16), ((64, 512, 7, 7, 512), 16)])
def test_sparks_cuda_kernel_structure(shape, k):
    """The Sparks kernel is the fused shared-memory kernel: __popc stage 1 in __shared__, one
    barrier per channel group, per-thread register accumulators; it builds with nvcc without spills."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    geom = ConvGeometry(*shape[:4], shape[4])
    params = GpuSparksParams.for_layer(geom, k)
    assert params.group * k * params.tile_words <= 8192  # 32 KB of shared stage 1
    func = CudaSchedules(target).schedule_sparks_conv2d(geom, k, "sign")
    src = tvm.compile(func.with_attr("global_symbol", "main"), target=target).mod.imports[0].inspect_source()
    bodies = _kernel_bodies(src, "main_kernel").values()
    fused = [b for b in bodies if "stage1_shared" in b]
    assert len(fused) == 1
    body = fused[0]
    assert "__popc" in body and "__syncthreads" in body and "threadIdx.y" in body
    assert "stage2_local_ptr[" in body and "stage2_local_ptr[(" not in body  # unrolled: registers, no dynamic index
    if params.splits > 1:  # split-K: the blocks' partial sums go to global memory, a second kernel adds them
        adders = [b for b in bodies if "stage2_ptr[" in b and "stage1_shared" not in b]
        assert len(adders) == 1 and "stage2_ptr[" in body
    else:
        assert "stage2_ptr[" not in src
    if params.group == 8:  # a group's eight indices: one 64-bit vector load
        assert "*(uint2*)(idx_unpack_local_ptr" in body
    if shape[3] + 2 <= 64:  # rows binarized into 64-bit words, patches assembled from them
        assert any("row_bits_local" in b for b in bodies) and "bin_pad" not in src
    else:  # wider rows: byte codes binarized in shared memory inside the patch kernel, never global
        patch = [b for b in bodies if "bin_pad_shared" in b]
        assert len(patch) == 1 and "patch_ptr[" in patch[0] and "bin_pad_ptr" not in src
    if shutil.which("nvcc"):
        from tvm.support import nvcc

        with target:
            cubin = nvcc.compile_cuda(src, target_format="cubin", arch="sm_90", compiler="nvcc")
        assert len(cubin) > 0


@pytest.mark.parametrize("width,stride", [(70, 1), (71, 2), (62, 1), (63, 2)])
def test_gpu_form_row_words_and_wide_rows(width, stride):
    """Both patch paths are exact: 64-bit row words (padded width <= 64) and byte codes (wider)."""
    geom = ConvGeometry(2, 5, 6, width, 3, stride=(stride, stride))
    rng = np.random.default_rng(width)
    codebook, idx = random_layer(rng, geom, 8)
    x = random_activations(rng, geom.in_shape, zero_frac=0.5)
    func = sparks_conv2d_gpu_primfunc(geom, 8, "sign", 4, 2)
    assert ("row_bits" in func.script()) == (width + 2 <= 64)
    _assert_sparks_exact_on_cpu(func, geom, x, codebook, idx, "sign")


def _unbound(apply, func, params):
    """Apply a GPU schedule with every ``bind`` a no-op: thread loops then run one after another
    and each 'thread' redoes the cooperative shared-memory stages in full, which keeps the
    meaning. Built for the CPU, this checks the schedule's loop transformations (tiling,
    compute_at regions, unrolling, vector loads, reduction init) without a GPU."""
    original = s_tir.Schedule.bind
    s_tir.Schedule.bind = lambda self, loop, thread: None
    try:
        sch = apply(s_tir.Schedule(func), params)
    finally:
        s_tir.Schedule.bind = original
    return sch.mod["main"]


SCHEDULED_SPARKS = [
    (ConvGeometry(2, 17, 11, 13, 9, stride=(2, 2)), 16, "sign", None),
    (ConvGeometry(1, 40, 9, 8, 33, padding=(0, 1, 1, 0)), 32, "ge", None),
    (ConvGeometry(1, 3, 5, 70, 4), 4, "gt", None),  # byte-code patch path
    (ConvGeometry(2, 21, 12, 12, 20), 8, "sign", GpuSparksParams(threads_x=4, vec=2, out_threads=2, out_regs=3, group=4)),
    (ConvGeometry(1, 300, 4, 4, 260), 16, "sign", None),  # small-grid knobs (batch 1)
    # The wide-layer knobs that large batches get (128 output channels per block).
    (ConvGeometry(1, 300, 4, 4, 260), 16, "sign", GpuSparksParams(threads_x=16, vec=1, out_threads=16, out_regs=8, group=8)),
    # Split-K: channel shares in separate blocks, added by a second kernel (tail group included).
    (ConvGeometry(2, 21, 9, 7, 11, stride=(2, 2)), 8, "sign",
     GpuSparksParams(threads_x=4, vec=2, out_threads=2, out_regs=3, group=4, splits=3)),
    (ConvGeometry(1, 64, 5, 5, 20), 16, "ge", GpuSparksParams(threads_x=8, vec=1, out_threads=4, out_regs=2, group=8,
                                                               splits=8)),
]


def test_small_grids_get_more_blocks():
    """Batch-1 grids that would leave most SMs idle take the small-grid knobs (deep layers split
    their input channels); batch 64 keeps the knobs measured there. Both stay within the
    shared-memory budget."""
    from schedules.cuda import SMALL_GRID_BLOCKS

    for (cin, cout, side, stride), batch in itertools.product(RESNET18_BINARY_LAYERS, (1, 4)):
        big = GpuSparksParams.for_layer(ConvGeometry(64, cin, side, side, cout, stride=(stride, stride)), 16)
        geom = ConvGeometry(batch, cin, side, side, cout, stride=(stride, stride))
        small = GpuSparksParams.for_layer(geom, 16)
        assert big.blocks(geom) < SMALL_GRID_BLOCKS  # the batch-64 knobs would underfill the GPU
        assert small == big.for_small_grid(geom)
        assert small.blocks(geom) >= 2 * big.blocks(geom)
        # 128+ input channels: split among blocks (measured slower on the 64-channel layers).
        assert (small.splits > 1) == (cin >= 128)
        assert -(-cin // small.group) % small.splits == 0
        small.validate(16)
        assert small.shared_words(16) <= big.shared_words(16)
    deep = ConvGeometry(64, 512, 7, 7, 512)
    assert GpuSparksParams.for_layer(deep, 16).blocks(deep) >= SMALL_GRID_BLOCKS


@pytest.mark.parametrize("many_planes", [False, True])
@pytest.mark.parametrize("geom,k,mode,params", SCHEDULED_SPARKS)
def test_scheduled_sparks_cuda_kernel_on_cpu(geom, k, mode, params, many_planes, monkeypatch):
    """The CUDA schedule of the Sparks op, threads serialized, equals the numpy reference.

    ``many_planes`` lowers the grid-y limit so that the (image, channel) planes of the
    patch kernel take the flat blockIdx.x mapping meant for more than 65535 planes."""
    import schedules.cuda
    from schedules.cuda import apply_sparks_gpu_schedule

    if many_planes:
        monkeypatch.setattr(schedules.cuda, "GRID_Y_LIMIT", 1)
    params = params or GpuSparksParams.for_layer(geom, k)
    rng = np.random.default_rng(k)
    codebook, idx = random_layer(rng, geom, k)
    x = random_activations(rng, geom.in_shape, zero_frac=0.5)
    func = _unbound(apply_sparks_gpu_schedule, sparks_conv2d_gpu_primfunc(geom, k, mode, params.tile_words, params.group,
                                                                  params.splits),
                    params)
    _assert_sparks_exact_on_cpu(func, geom, x, codebook, idx, mode)


@pytest.mark.parametrize("geom,mode,params", [
    (ConvGeometry(2, 40, 11, 13, 33, stride=(2, 2)), "ge", None),
    (ConvGeometry(1, 70, 14, 14, 64, padding=(0, 1, 1, 0)), "gt", None),
    (ConvGeometry(2, 70, 13, 15, 20), "sign", "odd"),
])
def test_scheduled_binary_cuda_kernel_on_cpu(geom, mode, params):
    """The tiled CUDA schedule of the dense binary conv, threads serialized, equals the reference."""
    from schedules.cuda_binary import GpuBinaryParams, apply_binary_gpu_schedule
    from sparks_tvm.kernels import binary_conv2d_primfunc, pack_binary_weights

    params = GpuBinaryParams(4, 2, 3, 2, 2, 3, 2) if params == "odd" else GpuBinaryParams.for_layer(geom)
    rng = np.random.default_rng(7)
    signs = np.where(rng.random((geom.out_channels, geom.in_channels, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    x = random_activations(rng, geom.in_shape)
    lib = build(_unbound(apply_binary_gpu_schedule, binary_conv2d_primfunc(geom, mode), params), "llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(pack_binary_weights(signs), dev), out)
    np.testing.assert_array_equal(out.numpy(), ref.binary_conv2d_ref(ref.binarize(x, mode), signs, geom.stride, geom.padding))


@pytest.mark.parametrize("kind", ["sparks", "sparks_split", "binary"])
@pytest.mark.parametrize("mode", ["sign", "ge"])
def test_cuda_kernels_fold_a_per_channel_input_shift(kind, mode):
    """The CUDA kernels take the binarizer's per-channel shift (``binarize(x + b)``) as on CPUs:
    threads serialized, bit for bit equal to the reference on the shifted input, including
    values the shift lands exactly on zero."""
    from schedules.cuda import apply_sparks_gpu_schedule
    from schedules.cuda_binary import GpuBinaryParams, apply_binary_gpu_schedule
    from sparks_tvm.kernels import binary_conv2d_primfunc, pack_binary_weights

    geom = ConvGeometry(2, 16, 7, 9, 6, stride=(2, 1), padding=(1, 0, 1, 1))
    rng = np.random.default_rng(11)
    x = random_activations(rng, geom.in_shape)
    shift = rng.choice([-0.5, 0.0, 0.25, 1.0], size=geom.in_channels).astype(np.float32)
    x[:, :, ::3, ::2] = -shift[None, :, None, None]
    shifted = x + shift[None, :, None, None]
    if kind.startswith("sparks"):
        params = GpuSparksParams(threads_x=4, vec=1, out_threads=2, out_regs=2, group=4,
                                 splits=4 if kind == "sparks_split" else 1)
        codebook, idx = random_layer(rng, geom, 8)
        func = sparks_conv2d_gpu_primfunc(geom, 8, mode, params.tile_words, params.group, params.splits, shift=True)
        func = _unbound(apply_sparks_gpu_schedule, func, params)
        inputs = [x, ref.codes_to_bits(codebook), pack_indices(idx, 8), shift]
        want = ref.sparks_conv2d_ref(ref.binarize(shifted, mode), codebook, idx, geom.stride, geom.padding)
    else:
        signs = np.where(rng.random((6, 16, 3, 3)) < 0.5, -1, 1).astype(np.int8)
        func = _unbound(apply_binary_gpu_schedule, binary_conv2d_primfunc(geom, mode, True),
                        GpuBinaryParams.for_layer(geom))
        inputs = [x, pack_binary_weights(signs), shift]
        want = ref.binary_conv2d_ref(ref.binarize(shifted, mode), signs, geom.stride, geom.padding)
    lib = build(func, "llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in inputs], out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_cuda_build_folds_binarizer_shifts():
    """For CUDA too, each Sparks conv's ``sign(x + b)`` moves into the kernel: no separate add
    kernel per layer (each was a ~3 us launch at batch 1 on the H100)."""
    from sparks_tvm import compiler, frontend
    from sparks_tvm.target import resolve_target

    net = models.sparks_resnet_tiny(k=8, seed=2, widths=(9, 17))
    proto = frontend.load_onnx(models.export_onnx(net, (1, 3, 10, 10)))
    target = resolve_target("cuda")
    mod, _ = compiler.build_relax(proto, frontend.input_specs(proto, None), target)
    arity = [line.count("metadata[") for line in mod["main"].script().splitlines() if "call_tir(sparks_conv2d" in line]
    assert arity == [3] * 4  # codes, indices and the shift


@pytest.mark.parametrize("tag", ["nvidia/nvidia-a100", "nvidia/nvidia-h100", "nvidia/geforce-rtx-4090"])
def test_nvidia_tags_compile(tag, tmp_path):
    """TVM's NVIDIA tags are accepted as targets and give our kernels for that architecture."""
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path / "tiny.onnx"
    models.export_onnx(net, (1, 3, 9, 9), path)
    compiled = sparks_tvm.compile(path, target=tag)
    assert compiled.target.kind.name == "cuda" and compiled.target.host is not None
    assert compiled.report.count("sparks") == 4 and "stage1_shared" in compiled.cuda_source()


def test_cuda_design_space_points_build_and_are_exact():
    """Random points of the CUDA Sparks design space build for the GPU and, threads serialized,
    equal the reference on the CPU (the space only re-maps the default computation)."""
    from schedules.tuning import make_task

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    geom, k = ConvGeometry(2, 24, 10, 10, 20), 8
    task = make_task(CudaSchedules(target), "sparks", geom, k, "sign")
    assert task.name.endswith("_cuda")
    rng = np.random.default_rng(0)
    codebook, idx = random_layer(rng, geom, k)
    x = random_activations(rng, geom.in_shape, zero_frac=0.5)
    seen = set()
    for seed in range(1, 4):
        for sch in task.space(s_tir.Schedule(task.mod, seed=seed)):
            tvm.compile(sch.mod["main"], target=target)  # a valid GPU kernel
            seen.add(tuple(int(v) for v in dict(sch.trace.decisions.items()).values()))
            sch.trace.as_python()  # MetaSchedule prints candidates' traces
        original = s_tir.Schedule.bind
        s_tir.Schedule.bind = lambda self, loop, thread: None
        try:
            points = task.space(s_tir.Schedule(task.mod, seed=seed))
        finally:
            s_tir.Schedule.bind = original
        for sch in points:
            _assert_sparks_exact_on_cpu(sch.mod["main"], geom, x, codebook, idx, "sign")
    assert len(seen) > 1  # the decisions vary


def test_cuda_tuning_tasks_and_no_gpu_error(tmp_path):
    """Tuning a CUDA target extracts the CUDA tasks (our design spaces) and, with no GPU to
    measure on, stops with a clear error before any trial."""
    import onnx

    from sparks_tvm import frontend
    from sparks_tvm.target import resolve_target
    from sparks_tvm.tune import TuningError, extract_tasks

    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path / "tiny.onnx"
    models.export_onnx(net, (1, 3, 9, 9), path)
    proto = onnx.load(str(path))
    tasks = extract_tasks(proto, frontend.input_specs(proto), resolve_target("cuda"))
    assert sum(count for _, count in tasks) == 4
    assert all(task.name.startswith("sparks_") and task.name.endswith("_cuda") for task, _ in tasks)
    if HAS_GPU:
        pytest.skip("a GPU is present: tuning would run")
    with pytest.raises(TuningError, match="GPU"):
        sparks_tvm.tune(path, "cuda", str(tmp_path / "work"), trials=1, progress=False)


def test_cuda_tuning_record_replays_on_the_shift_kernel(tmp_path):
    """A CUDA tuning record, recorded on the task kernel (no shift), replayed by compile onto
    the kernel the model needs (its binarizer shift folded in): the result is exactly the
    default schedule of the shift kernel, which the threads-serialized tests check bit for bit."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from sparks_tvm import frontend
    from sparks_tvm.compiler import build_relax
    from sparks_tvm.target import resolve_target
    from schedules.tuning import TunedSchedules
    from sparks_tvm.tune import extract_tasks, open_database

    target = resolve_target("cuda")
    path = tmp_path / "tiny.onnx"
    models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), (1, 3, 9, 9), path)
    proto = frontend.load_onnx(str(path))
    specs = frontend.input_specs(proto, None)
    work = str(tmp_path / "work")
    db = open_database(work)
    tasks = [task for task, _ in extract_tasks(proto, specs, target)]
    for task in tasks:
        db.commit_tuning_record(ms.database.TuningRecord(
            task.default_schedule().trace, db.commit_workload(task.mod), [tvm.tirx.FloatImm("float32", 1e-9)], target,
            ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
    sched = TunedSchedules(CudaSchedules(target), db, target)
    mod, _ = build_relax(proto, specs, target, kernel_schedules=sched)
    assert set(sched.applied) == {task.name for task in tasks} and not sched.missed
    funcs = sorted((int(gv.name_hint.rsplit("_", 1)[1]), f) for gv, f in mod.functions_items()
                   if gv.name_hint.startswith("sparks_conv2d"))
    assert len(funcs) == len(sched.calls) == 4
    cuda = CudaSchedules(target)
    for (_, func), (kind, geom, k, mode) in zip(funcs, sched.calls):  # both in the order of the convs
        want = cuda.schedule_sparks_conv2d(geom, k, mode, shift=True)
        assert len(func.params) == 5  # data, codes, indices, shift, out
        assert tvm_ffi.structural_equal(func.without_attr("global_symbol"), want.without_attr("global_symbol"))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="aarch64 cross linker not installed")
def test_jetson_tag_exports_an_aarch64_library(tmp_path):
    """A Jetson tag has an aarch64 host: the library is cross-linked for the board."""
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path / "tiny.onnx"
    models.export_onnx(net, (1, 3, 9, 9), path)
    compiled = sparks_tvm.compile(path, target="nvidia/jetson-orin-nano")
    assert str(compiled.target.attrs["arch"]) == "sm_87" and compiled.report.count("sparks") == 4
    lib = compiled.export_library(tmp_path / "tiny_jetson.so")
    with open(lib, "rb") as fh:
        header = fh.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
