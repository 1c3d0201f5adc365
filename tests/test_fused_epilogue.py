"""Epilogue fusion on LLVM targets: deferred kernels, FuseOps + FuseTIR, ScheduleFusedKernels."""

import numpy as np
import pytest
import tvm
from tvm import s_tir

import sparks_tvm
from relay_passes import ScheduleFusedKernels
from schedules.host import DEFERRED_SCHEDULE, HostSchedules
from sparks_tvm import compiler, frontend, models
from sparks_tvm.kernels import ConvGeometry
from sparks_tvm.target import resolve_target


def _fused_module(net, shape, fuse: bool):
    """Lower + FuseOps/FuseTIR + ScheduleFusedKernels, as compile's LLVM pipeline does."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    proto = frontend.load_onnx(models.export_onnx(net, shape))
    target = resolve_target("llvm")
    mod, _ = compiler.build_relax(proto, frontend.input_specs(proto, None), target, fuse_epilogues=fuse)
    sched = ScheduleFusedKernels()
    with target:
        mod = tvm.transform.Sequential(cpu_generic.legalize_passes(target) + [sched])(mod)
    return mod, sched


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 15, 13)])
def test_each_kernel_takes_in_its_epilogue(shape):
    # (15, 13): output tiles that do not divide the pixels, the path where `out` runs after the tiles.
    net = models.sparks_resnet_tiny(k=8, seed=2, widths=(9, 17))
    mod, sched = _fused_module(net, shape, fuse=True)
    kernels = {name: n for name, n in sched.inlined.items() if name.startswith("fused_")}
    # 4 Sparks convs and the stem + shortcut float convs, each fused with what follows it.
    assert sum("sparks_conv2d" in name for name in kernels) == 4
    # cast, alpha, BatchNorm's two affine ops, the residual add, PReLU and the next shift.
    assert all(n >= 5 for name, n in kernels.items() if "sparks" in name), kernels
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and gvar.name_hint in kernels:
            assert func.attrs["tirx.is_scheduled"]
            sch = s_tir.Schedule(func)
            # Nothing runs after the kernel's output block: the epilogue is inside it.
            assert sch.get_consumers(sch.get_sblock("out")) == []


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 15, 13), (3, 3, 7, 9)])
def test_fused_equals_unfused(shape):
    net = models.sparks_resnet_tiny(k=8, seed=4, widths=(9, 17))
    data = models.export_onnx(net, shape)
    x = models.example_input(shape, seed=1)
    target = resolve_target("llvm")
    compiled = sparks_tvm.compile(data, target="llvm")
    fused = compiled.run(x)[0]
    # compile() did fuse: the model's kernels are the fused functions, the Sparks ones included.
    from sparks_tvm.bench import layer_times

    kernels = [row["kernel"] for row in layer_times(compiled, [x], repeat=1)]
    assert sum(k.startswith("fused_sparks_conv2d") for k in kernels) == 4, kernels
    proto = frontend.load_onnx(data)
    mod, _ = compiler.build_relax(proto, frontend.input_specs(proto, None), target, fuse_epilogues=False)
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=compiler.relax_pipeline(target)),
                                  tvm.cpu())
    unfused = vm["main"](tvm.runtime.tensor(x)).numpy()
    # Same float ops on the same integers, in the same order.
    np.testing.assert_allclose(fused, unfused, rtol=1e-6, atol=1e-6 * np.abs(unfused).max())


def test_deferred_kernel_without_epilogue_is_scheduled_alone():
    geom = ConvGeometry(1, 19, 9, 7, 5, stride=(2, 2), padding=(1, 1, 1, 1))
    sched = HostSchedules(cores=2)
    sched.defer = True
    func = sched.schedule_sparks_conv2d(geom, 4, "sign")
    assert int(func.attrs["op_pattern"]) == 4 and "tirx.is_scheduled" not in func.attrs
    sch = s_tir.Schedule(func)
    assert DEFERRED_SCHEDULE in sch.get(sch.get_sblock("out")).annotations
    passed = ScheduleFusedKernels()
    mod = passed(tvm.IRModule({"sparks": func}))
    assert passed.inlined == {"sparks": 0}
    assert mod["sparks"].attrs["tirx.is_scheduled"]
    # Bit for bit the reference.
    from kernel_utils import random_activations, random_layer
    from sparks_tvm import reference as ref
    from sparks_tvm.kernels import pack_indices

    rng = np.random.default_rng(0)
    codebook, idx = random_layer(rng, geom, 4)
    x = random_activations(rng, geom.in_shape)
    lib = tvm.compile(mod["sparks"].with_attr("global_symbol", "main"), target=resolve_target("llvm")).jit()
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ref.codes_to_bits(codebook)),
                tvm.runtime.tensor(pack_indices(idx, 4)), out)
    want = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    np.testing.assert_array_equal(out.numpy(), want)


def test_undeferred_kernels_stay_opaque():
    func = HostSchedules(cores=1).schedule_sparks_conv2d(ConvGeometry(1, 8, 6, 6, 4), 4, "sign")
    # Scheduled directly (benchmarks, tests, tuning): not fusable, nothing deferred.
    assert int(func.attrs["op_pattern"]) == 8 and func.attrs["tirx.is_scheduled"]


@pytest.mark.parametrize("kind", ["sparks", "binary"])
@pytest.mark.parametrize("mode", ["sign", "ge", "gt"])
def test_kernels_fold_a_per_channel_input_shift(kind, mode):
    """``binarize(x + b)`` inside the kernel equals the reference on the shifted input, bit
    for bit, including values the shift lands exactly on zero (Sign's third value)."""
    from kernel_utils import random_activations, random_layer
    from sparks_tvm import reference as ref
    from sparks_tvm.kernels import pack_binary_weights, pack_indices

    geom = ConvGeometry(2, 13, 7, 9, 6, stride=(2, 1), padding=(1, 0, 1, 1))
    rng = np.random.default_rng(7)
    x = random_activations(rng, geom.in_shape)
    shift = rng.choice([-0.5, 0.0, 0.25, 1.0], size=geom.in_channels).astype(np.float32)
    x[:, :, ::3, ::2] = -shift[None, :, None, None]  # lands exactly on 0 after the shift
    shifted = x + shift[None, :, None, None]
    sched = HostSchedules(cores=2)
    if kind == "sparks":
        codebook, idx = random_layer(rng, geom, 4)
        func = sched.schedule_sparks_conv2d(geom, 4, mode, shift=True)
        inputs = [x, ref.codes_to_bits(codebook), pack_indices(idx, 4), shift]
        want = ref.sparks_conv2d_ref(ref.binarize(shifted, mode), codebook, idx, geom.stride, geom.padding)
    else:
        signs = np.where(rng.random((6, 13, 3, 3)) < 0.5, -1, 1).astype(np.int8)
        func = sched.schedule_binary_conv2d(geom, mode, shift=True)
        inputs = [x, pack_binary_weights(signs), shift]
        want = ref.binary_conv2d_ref(ref.binarize(shifted, mode), signs, geom.stride, geom.padding)
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=resolve_target("llvm")).jit()
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32))
    lib["main"](*[tvm.runtime.tensor(a) for a in inputs], out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_binarizer_shifts_are_folded_into_the_kernels():
    net = models.sparks_resnet_tiny(k=8, seed=2, widths=(9, 17))
    proto = frontend.load_onnx(models.export_onnx(net, (1, 3, 10, 10)))
    target = resolve_target("llvm")

    def adds_and_kernel_arity(fuse):
        mod, _ = compiler.build_relax(proto, frontend.input_specs(proto, None), target, fuse_epilogues=fuse)
        text = mod["main"].script()
        arity = [line.count("metadata[") for line in text.splitlines() if "call_tir(sparks_conv2d" in line]
        return text.count("R.add("), arity

    adds_plain, arity_plain = adds_and_kernel_arity(False)
    adds_folded, arity_folded = adds_and_kernel_arity(True)
    # Each of the 4 Sparks convs reads sign(x + b): b moves into the kernel as a 4th input.
    assert arity_plain == [2] * 4 and arity_folded == [3] * 4
    assert adds_folded == adds_plain - 4
