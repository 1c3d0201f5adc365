"""The architecture goals (issue 18), measured by scripts/check_architecture.py, and the seams
the layers rely on: the lazy API, the callable tune package, the deferred-schedule registry,
TargetInfo and the pipeline's phases and IR dumps."""

import os
import subprocess
import sys

import numpy as np
import pytest
from tvm import s_tir

import schedules
import sparks_tvm
from relay_passes import pipeline
from schedules import host
from schedules.target_info import TargetInfo
from sparks_tvm import frontend, models
from sparks_tvm.inspect import inspect_model
from sparks_tvm.kernels import ConvGeometry, sparks_conv2d_primfunc
from sparks_tvm.target import resolve_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_goals_hold():
    # No import cycle, no upward import, no module over 600 lines or function over 80, at most 15
    # in-function imports of the project's modules (outside cli.py).
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_architecture.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("first", ["relay_passes", "schedules", "sparks_tvm.kernels", "sparks_tvm.tune",
                                   "sparks_tvm.compiler", "relay_passes.pipeline", "schedules.tuning"])
def test_any_module_imports_first(first):
    # The middle layers import the kernels (inside sparks_tvm): importing them first must not
    # pull the compiler above them in half-initialized.
    code = f"import {first}; import sparks_tvm; sparks_tvm.compile; sparks_tvm.tune.rpc_runner"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]


def test_kernels_import_without_the_compiler():
    code = ("import sys, sparks_tvm.kernels, sparks_tvm.errors; "
            "assert 'sparks_tvm.compiler' not in sys.modules and 'relay_passes' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]


def test_tune_is_the_package_and_callable():
    import sparks_tvm.tune as tune_pkg

    assert sparks_tvm.tune is tune_pkg and callable(sparks_tvm.tune)
    assert sparks_tvm.TuningError is tune_pkg.TuningError is sparks_tvm.errors.TuningError
    assert tune_pkg.rpc_runner is tune_pkg.runners.rpc_runner


def test_deferred_kind_registry():
    geom = ConvGeometry(1, 8, 6, 6, 8)
    func = sparks_conv2d_primfunc(geom, 4, "sign", 32)
    seen = []

    def my_kind(sch, spec):
        seen.append(spec["knob"])
        return host.apply_deferred(sch, {"kind": "sparks", "tile": 32, "block": 1, "o_chunks": 1})

    host.register_deferred_kind("test_kind", my_kind)
    try:
        sch = host.apply_deferred(s_tir.Schedule(func), {"kind": "test_kind", "knob": 3})
        ref = host.apply_deferred(s_tir.Schedule(func), {"kind": "sparks", "tile": 32, "block": 1, "o_chunks": 1})
        assert seen == [3]
        assert sch.mod.script() == ref.mod.script()
    finally:
        host._DEFERRED_KINDS.pop("test_kind")
    with pytest.raises(ValueError, match="unknown deferred kernel kind"):
        host.apply_deferred(s_tir.Schedule(func), {"kind": "test_kind"})


def test_target_info():
    h = TargetInfo.from_target(resolve_target({"kind": "llvm", "mcpu": "znver4", "num-cores": 3}))
    assert (h.family, h.cores, h.vector_bytes, h.popcount, h.table_lookup) == ("host", 3, 64, "vpopcnt", True)
    avx2 = TargetInfo.from_target(resolve_target({"kind": "llvm", "mcpu": "haswell"}))
    assert (avx2.vector_bytes, avx2.popcount, avx2.cores) == (32, "pshufb", None)
    arm = TargetInfo.from_target(resolve_target("arm_cpu"))
    assert (arm.family, arm.vector_bytes, arm.popcount, arm.table_lookup) == ("arm", 16, "cnt", True)
    cuda = TargetInfo.from_target(resolve_target("cuda"))
    assert cuda.family == "cuda" and cuda.sm_count > 0 and cuda.shared_bytes == 48 * 1024
    assert isinstance(schedules.for_target(resolve_target("arm_cpu")), schedules.ArmSchedules)
    for name in ("llvm", "arm_cpu", "cuda"):
        assert isinstance(schedules.for_target(resolve_target(name)), schedules.KernelSchedules)
    assert type(schedules.for_target(resolve_target("llvm"))) is schedules.HostSchedules


def test_pipeline_dumps_each_phase(tmp_path, monkeypatch):
    net = models.sparks_resnet_tiny(k=4, seed=1, widths=(8, 8))
    data = models.export_onnx(net, (1, 3, 8, 8))
    x = models.example_input((1, 3, 8, 8), seed=2)
    plain = sparks_tvm.compile(data).run(x)[0]
    monkeypatch.setenv(pipeline.DUMP_ENV, str(tmp_path))
    dumped = sparks_tvm.compile(data).run(x)[0]
    np.testing.assert_array_equal(plain, dumped)
    files = sorted(os.listdir(tmp_path))
    assert files == [f"{i:02d}_{p}.py" for i, p in enumerate(pipeline.PHASES)], files
    text = {p: open(tmp_path / f"{i:02d}_{p}.py").read() for i, p in enumerate(pipeline.PHASES)}
    assert "R.sign" in text["import"] and "def sparks_conv2d_" not in text["import"]
    assert "def sparks_conv2d_" in text["lower_binary"] and "R.nn.conv2d" in text["lower_binary"]
    assert "R.nn.conv2d" not in text["lower_float"]
    assert "fused_sparks_conv2d" in text["fuse"]
    assert "tirx.is_scheduled" not in text["fuse"].split("fused_sparks_conv2d")[1][:2000]
    assert "tirx.is_scheduled" in text["schedule"] and "R.call_tir" not in text["finalize"]


def test_inspect_and_tune_run_the_same_lowering():
    net = models.sparks_resnet_tiny(k=4, seed=1, widths=(8, 8))
    proto = frontend.load_onnx(models.export_onnx(net, (1, 3, 8, 8)))
    specs = frontend.input_specs(proto, None)
    target = resolve_target("llvm")
    _, full = pipeline.lower(frontend.import_graph(proto, specs),
                             pipeline.PipelineOptions(schedules=schedules.for_target(target)))
    _, early = pipeline.lower(frontend.import_graph(proto, specs), pipeline.PipelineOptions(), until="lower_binary")
    assert [(r.kind, r.codewords) for r in full] == [(r.kind, r.codewords) for r in early]
    assert [r.kind for r in inspect_model(proto).convs] == [r.kind for r in full]
